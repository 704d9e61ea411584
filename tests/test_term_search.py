"""`search_terms`: the families' spaces, equal budgets, the confirmation's numbers."""

import glob
import json
import math
import os
import types

import keras
import numpy as np
import pytest

from keras_gramkd.relational import FitNetTerm, ModalitySPTerm, PKTTerm, RKDTerm, SPTerm
from keras_gramkd.study.result import MethodResult, StudyResult
from keras_gramkd.study.stats import paired_difference, t_interval, t_quantile
from keras_gramkd.terms import GramTerm, KDTerm
from keras_gramkd.tuning.families import (
    FAMILIES,
    PUBLISHED_SCALES,
    SPREAD,
    FamilySpace,
    available_families,
)
from keras_gramkd.tuning.term_result import TermSearchResult

kt = pytest.importorskip("keras_tuner")

from keras_gramkd.tuning import search_terms  # noqa: E402

FEATURES = {"feat": ("t_feat", "s_feat")}
MODALITIES = {"views": ({"a": "t_a", "b": "t_b"}, {"a": "s_a", "b": "s_b"})}
N_CLASSES, WIDTH, RANK = 3, 40, 3


# --- the families' spaces -------------------------------------------------------


def _fixed(**values):
    hp = kt.HyperParameters()
    for name, value in values.items():
        hp.Fixed(name, value)
    return hp


@pytest.mark.parametrize(
    "family, term_class",
    [
        ("sp", SPTerm),
        ("rkd", RKDTerm),
        ("pkt", PKTTerm),
        ("fitnet", FitNetTerm),
        ("gram", GramTerm),
        ("modality_sp", ModalitySPTerm),
    ],
)
def test_a_family_builds_kd_and_its_term_from_the_trial_values(family, term_class):
    space = FamilySpace(family, FEATURES, MODALITIES)
    feature = "views" if family in ("gram", "modality_sp") else "feat"
    values = {
        "kd_weight": 0.5,
        "temperature": 2.0,
        f"{family}_weight": 7.0,
        f"{family}_feature": feature,
    }
    if family == "gram":
        values["gram_normalize"] = "centered"
    kd, term = space.terms(_fixed(**values))
    assert isinstance(kd, KDTerm) and isinstance(term, term_class)
    assert (kd.weight, kd.temperature, term.weight) == (0.5, 2.0, 7.0)
    if family == "gram":
        assert term.get_config()["loss"]["config"]["normalize"] == "centered"
    assert space.settings(_fixed(**values)) == values


@pytest.mark.parametrize("family", sorted(PUBLISHED_SCALES))
def test_each_family_searches_two_decades_around_its_published_scale(family):
    hp = kt.HyperParameters()
    FamilySpace(family, FEATURES, MODALITIES).terms(hp)
    weight = hp.get_config()["space"]
    (entry,) = [e for e in weight if e["config"]["name"] == f"{family}_weight"]
    scale = PUBLISHED_SCALES[family]
    assert entry["config"]["min_value"] == pytest.approx(scale / SPREAD)
    assert entry["config"]["max_value"] == pytest.approx(scale * SPREAD)
    assert entry["config"]["sampling"] == "log"


def test_the_candidates_decide_which_families_can_run():
    assert available_families() == ["kd"]
    assert available_families(modalities=MODALITIES) == ["kd", "gram", "modality_sp"]
    assert available_families(FEATURES, MODALITIES) == list(FAMILIES)
    with pytest.raises(ValueError, match="'sp' family needs candidate features"):
        FamilySpace("sp", modalities=MODALITIES)
    with pytest.raises(ValueError, match="Unknown term family 'kdd'"):
        FamilySpace("kdd")
    with pytest.raises(ValueError, match=r"\(teacher, student\) pair"):
        FamilySpace("sp", features={"feat": "t_feat"})


# --- the statistics ---------------------------------------------------------------


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30, 200])
def test_t_quantile_equals_scipys(df):
    stats = pytest.importorskip("scipy.stats")
    for p in (0.9, 0.975, 0.995):
        assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_t_interval_equals_scipys_and_is_nan_for_one_seed():
    stats = pytest.importorskip("scipy.stats")
    a, b = [0.71, 0.69, 0.75, 0.70], [0.66, 0.69, 0.70, 0.61]
    low, high = t_interval(paired_difference(a, b))
    d = np.subtract(a, b)
    ref = stats.t.interval(0.95, len(d) - 1, d.mean(), stats.sem(d))
    assert (low, high) == pytest.approx(ref, rel=1e-9)
    assert all(math.isnan(v) for v in t_interval(paired_difference([0.7], [0.6])))
    with pytest.raises(ValueError, match="probability < 1"):
        t_quantile(1.0, 3)


# --- the result ---------------------------------------------------------------


def _study(accuracies):
    methods = {}
    for name, values in accuracies.items():
        methods[name] = MethodResult(name)
        for seed, accuracy in enumerate(values, 1):
            report = types.SimpleNamespace(accuracy=accuracy, dropped={})
            methods[name].add(seed, report, None, 1.0, 10)
    config = {"seeds": list(range(1, len(accuracies["kd"]) + 1))}
    return StudyResult(methods, "kd", 0.9, {}, 100, config)


SEARCHED = {
    "kd": {"settings": {"kd_weight": 1.0, "temperature": 4.0}, "trials": 2,
           "val": 0.6, "search_seconds": 1.0},
    "sp": {"settings": {"kd_weight": 2.0, "temperature": 1.0, "sp_weight": 300.0,
                        "sp_feature": "feat"}, "trials": 2, "val": 0.7,
           "search_seconds": 1.0},
}  # fmt: skip
CONFIG = {"trials": 2, "epochs": 3, "tuner": "random", "objective": "val_accuracy",
          "search_seconds": 2.0, "confirm_seconds": 3.0, "backend": "jax"}  # fmt: skip


def test_the_result_recommends_a_family_whose_interval_lies_above_zero():
    study = _study({"kd": [0.60, 0.62, 0.61], "sp": [0.70, 0.71, 0.69]})
    result = TermSearchResult.from_search(SEARCHED, study, CONFIG)
    (sp,) = [r for r in result.rows if r["family"] == "sp"]
    d = np.array([0.10, 0.09, 0.08])
    assert sp["delta"] == pytest.approx(d.mean())
    assert sp["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3))
    assert sp["won"] == 3 and sp["excludes_zero"]
    assert result.recommended == ["sp"]
    assert result.recommendation.startswith("Recommended on top of KD: sp (+9.00 ±")
    text = result.to_markdown()
    assert "| sp | kd 2, T 1, sp 300, feat | 2 | 0.7000 | +9.00 ± 0.58 | 3/3 |" in text
    back = TermSearchResult.from_json(result.to_json())
    assert back.rows == result.rows and back.recommended == ["sp"]


def test_the_result_says_no_term_beats_kd_when_no_interval_lies_above_zero():
    study = _study({"kd": [0.60, 0.62, 0.61], "sp": [0.70, 0.55, 0.61]})
    result = TermSearchResult.from_search(SEARCHED, study, CONFIG)
    assert result.recommended == []
    assert result.recommendation.startswith("No term beats KD on this model")
    data = json.loads(result.to_json())
    assert data["recommended"] == [] and data["rows"][1]["excludes_zero"] is False


# --- the arguments --------------------------------------------------------------


def _student():
    x = keras.Input((WIDTH,), name="x")
    feature = keras.layers.Dense(RANK, name="s_feat")(x)
    return keras.Model({"x": x}, keras.layers.Dense(N_CLASSES)(feature), name="s")


def _task(seed=0, hint_helps=True):
    """Labels are a linear function of a rank-3 projection P of the inputs.

    `hint_helps`: the teacher's feature is P itself and its logits are
    constant (no information); 3 labels per class and 600 unlabelled rows.
    Neither the labels nor KD give the student P; a feature hint gives it P
    on every row. Otherwise the teacher's feature is an unrelated projection,
    its logits are exact and every row is labelled: no hint can help.
    """
    rng = np.random.default_rng(seed)
    projection = rng.normal(size=(WIDTH, RANK)).astype("float32") / np.sqrt(WIDTH)
    head = rng.normal(size=(RANK, N_CLASSES)).astype("float32")

    def split(n):
        x = rng.normal(size=(n, WIDTH)).astype("float32")
        return {"x": x}, np.argmax(x @ projection @ head, -1).astype("int32")

    x_in = keras.Input((WIDTH,), name="x")
    feature = keras.layers.Dense(RANK, use_bias=False, name="t_feat")(x_in)
    logits = keras.layers.Dense(N_CLASSES, use_bias=False, name="t_logits")(x_in)
    # The feature is an output too, so that it is computed (and addressable).
    teacher = keras.Model({"x": x_in}, logits + 0.0 * keras.ops.sum(feature), name="t")
    unrelated = rng.normal(size=(WIDTH, RANK)).astype("float32") / np.sqrt(WIDTH)
    teacher.get_layer("t_feat").set_weights([projection if hint_helps else unrelated])
    exact = projection @ head
    teacher.get_layer("t_logits").set_weights(
        [np.zeros_like(exact) if hint_helps else exact]
    )
    x, y = split(600)
    if hint_helps:
        keep = np.concatenate([np.flatnonzero(y == c)[:3] for c in range(N_CLASSES)])
        partial = np.full_like(y, -1)
        partial[keep] = y[keep]
        y = partial
    return teacher, (x, y), split(200), split(500)


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)


def _search(task, **kwargs):
    teacher, train, val, test = task
    kwargs = {
        "features": FEATURES,
        "trials": 2,
        "epochs": 10,
        "seeds": 3,
        "loss": _loss,
        "optimizer": lambda: keras.optimizers.Adam(1e-2),
        "verbose": 0,
        **kwargs,
    }
    return search_terms(teacher, _student, train, val, test, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"families": ["sp", "kdd"]}, r"Unknown term famil\(ies\) \['kdd'\]"),
        ({"families": ["gram"]}, "'gram' family needs candidate modalities"),
        ({"tuner": "hyperband"}, "Hyperband gives each family a different budget"),
        ({"seeds": [0, 4]}, "seeds holds the search's seed 0"),
        ({"seeds": 1}, "at least 2 seeds"),
        ({"trials": 0}, "trials"),
    ],
)
def test_bad_arguments_are_refused_before_anything_trains(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _search(_task(), **kwargs)


def test_unlabelled_validation_rows_are_refused():
    teacher, train, _, test = _task()
    with pytest.raises(ValueError, match=r"validation has 591 unlabelled row\(s\)"):
        _search((teacher, train, train, test))


# --- the search, end to end -----------------------------------------------------


@pytest.mark.slow
def test_the_search_finds_the_hint_that_must_help_with_equal_budgets(tmp_path):
    result = _search(
        _task(),
        families=["fitnet"],
        directory=str(tmp_path),
        keep_students=True,
        epochs=20,  # measured lower ends of the interval: +18 to +31 points
        seeds=4,
    )
    assert [r["family"] for r in result.rows] == ["kd", "fitnet"]
    # The same budget for every family: in the rows and in the tuners' folders.
    assert [r["trials"] for r in result.rows] == [2, 2]
    for family in ("kd", "fitnet"):
        trials = glob.glob(os.path.join(tmp_path, family, "trial_*", "trial.json"))
        assert len(trials) == 2
    assert "fitnet" in result.recommended
    assert result.recommendation.startswith("Recommended on top of KD:")

    # The confirmation's numbers equal numpy's on the kept students.
    stats = pytest.importorskip("scipy.stats")
    (x_test, y_test) = _task()[3]
    seeds = result.config["seeds"]
    assert seeds == [1, 2, 3, 4]

    def accuracy(family, seed):
        student = result.confirmation.students[(family, seed)]
        logits = keras.ops.convert_to_numpy(student(x_test))
        return np.mean(np.argmax(logits, -1) == y_test)

    for row in result.rows[1:]:
        d = np.array([accuracy(row["family"], s) - accuracy("kd", s) for s in seeds])
        assert row["delta"] == pytest.approx(d.mean(), abs=1e-12)
        assert row["se"] == pytest.approx(stats.sem(d), rel=1e-9)
        assert row["won"] == int(np.sum(d > 0))
        if row["se"] > 0:
            interval = stats.t.interval(0.95, len(d) - 1, d.mean(), stats.sem(d))
            assert (row["low"], row["high"]) == pytest.approx(interval, rel=1e-9)


@pytest.mark.slow
def test_the_search_says_no_term_beats_kd_where_none_can():
    result = _search(_task(hint_helps=False), families=["fitnet"], trials=1)
    (fitnet,) = [r for r in result.rows if r["family"] == "fitnet"]
    assert not fitnet["low"] > 0
    assert result.recommended == []
    assert result.recommendation.startswith("No term beats KD on this model")


# --- gramkd tune --terms --------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--setting", "few-labels"], "The weight search runs on --setting clean or"),
        (["--terms", "sp", "--tuner", "hyperband"], "--terms takes --tuner random or"),
    ],
)
def test_gramkd_tune_refuses_what_its_search_cannot_do(argv, message, capsys):
    from gramkd import cli

    assert cli.main(["tune", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_gramkd_tune_terms_prints_each_trial_and_writes_the_table(tmp_path, capsys):
    from gramkd import cli

    directory = tmp_path / "tune"
    argv = ["tune", "--terms", "sp", "--setting", "few-labels", "--trials", "1"]
    argv += ["--epochs", "2", "--teacher-epochs", "1", "--confirm-seeds", "2"]
    argv += ["--views", "fou", "mor", "--directory", str(directory)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for family in ("kd", "sp"):
        assert f"[{family}] trial 1/1: kd " in out
    assert out.count("[confirm] ") == 4
    data = json.loads((directory / "terms.json").read_text())
    assert [r["family"] for r in data["rows"]] == ["kd", "sp"]
    assert data["rows"][1]["settings"]["sp_feature"] == "pooled"
    assert data["config"]["setting"] == "few-labels"
    assert data["config"]["seeds"] == [1, 2]
    assert data["confirmation"]["config"]["n_train"] < 1000  # validation held out
    table = (directory / "terms.md").read_text()
    assert table.startswith("Setting few-labels, views fou, mor.")
    assert data["recommendation"] in table
