"""Tests for `gramkd demo`: its settings, methods, options and a tiny study."""

import argparse
import io
import json
import os
import struct
import subprocess
import sys

import keras
import numpy as np
import pytest

from gramkd.options import add_demo_arguments
from keras_gramkd import demo, zoo
from keras_gramkd.console import make_console
from keras_gramkd.demo import cli as demo_cli
from keras_gramkd.demo import report, settings
from keras_gramkd.demo import study as demo_study
from keras_gramkd.demo.methods import (
    METHOD_COST,
    RELATIONAL_WEIGHTS,
    demo_methods,
    method_cost,
)
from keras_gramkd.relational import FitNetTerm, PKTTerm, RKDTerm, SPTerm
from keras_gramkd.study import StudyResult
from keras_gramkd.terms import GramTerm, KDTerm

TRAIN_PER_CLASS = 20
VIEWS = ["fou", "mor"]  # two small views keep the run short
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CFG = {"kd_weight": 1.0, "temperature": 4.0, "gram_weight": 3.0, "gram_normalize": "l2"}
STUDY_METHODS = ["labels", "kd", "keras_kd", "gram", "gram_batch_mean", "sp"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    results = demo.run_study(
        views=VIEWS,
        setting="noisy",
        seeds=2,
        epochs=1,
        teacher_epochs=1,
        methods=STUDY_METHODS,
        train_per_class=TRAIN_PER_CLASS,
        out=str(out),
        verbose=False,
    )
    return results, out


@pytest.mark.slow
def test_results_json_holds_the_study_and_its_setting(study):
    results, out = study
    stored = json.loads((out / "results.json").read_text())
    assert stored == json.loads(json.dumps(results))
    assert stored["config"]["methods"] == STUDY_METHODS
    assert stored["backend"] == keras.backend.backend()
    assert set(stored["skipped_controls"]) == {"gram_diagonal"}
    assert stored["data"]["noise_std"] == demo.NOISE_STD
    assert stored["data"]["n_train_student"] == 10 * TRAIN_PER_CLASS
    assert stored["data"]["n_test"] == 1000
    result = StudyResult.from_json(json.dumps(stored["study"]))
    assert list(result.methods) == STUDY_METHODS and result.reference == "kd"
    for name, runs in result.methods.items():
        assert runs.seeds == [0, 1], name
        assert all(0.0 <= a <= 1.0 for a in runs.accuracy)
        assert set(runs.dropped) == set(VIEWS)
        assert runs.params == stored["student"]["params"]
        assert len(runs.histories) == 2 and len(runs.histories[0]["loss"]) == 1
    assert stored["teacher"]["params"] > 20 * stored["student"]["params"]


@pytest.mark.slow
def test_conclusion_reports_the_paired_differences(study):
    results, _ = study
    result = StudyResult.from_json(json.dumps(results["study"]))
    gram = result.paired("gram")
    kd = result.methods["kd"].accuracy
    np.testing.assert_allclose(
        gram["diffs"], np.subtract(result.methods["gram"].accuracy, kd)
    )
    text = results["conclusion"]
    assert f"{100 * gram['mean']:+.2f} ± {100 * gram['se']:.2f}" in text
    control = result.paired("gram_batch_mean")
    assert f"batch-mean control: {100 * control['mean']:+.2f}" in text
    assert "noisy setting" in text and "paired over 2 seed(s)" in text
    keras_kd = result.paired("keras_kd")
    note = text[text.index("keras_kd, Keras' own") :]
    assert f"differs from kd by {100 * keras_kd['mean']:+.2f} ±" in note
    assert "w = 1/(1 + kd_weight) = 0.5" in note and "divided by 2" in note
    assert "trains like kd with ε = 2 × 1e-7" in note


def test_keras_kd_note_only_when_keras_kd_ran():
    from keras_gramkd.study.result import MethodResult

    def runs(name, accuracy):
        return MethodResult.from_dict(
            name,
            {
                "seeds": [0, 1],
                "accuracy": accuracy,
                "dropped": {},
                "gram_gap": [0.0, 0.0],
                "train_time_s": [1.0, 1.0],
                "params": 1,
            },
        )

    methods = {
        "kd": runs("kd", [0.8, 0.9]),
        "gram": runs("gram", [0.81, 0.92]),
        "keras_kd": runs("keras_kd", [0.79, 0.91]),
    }
    result = StudyResult(methods, "kd", 0.95, {}, 10, {"seeds": [0, 1]})
    data = settings.load_setting("clean", ["mor"], train_per_class=1)
    text = report.conclusion(result, data, "gram", kd_weight=3.0)
    assert "differs from kd by +0.00 ± 1.00 points" in text
    assert "w = 1/(1 + kd_weight) = 0.25" in text and "divided by 4" in text
    assert "ε = 4 × 1e-7" in text
    del methods["keras_kd"]
    assert "keras_kd" not in report.conclusion(result, data, "gram")


@pytest.mark.slow
def test_files_exist_and_pngs_are_valid(study):
    results, out = study
    for name in ("gram.png", "curves.png", "paired.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
        width, height = struct.unpack(">II", data[16:24])
        assert width > 100 and height > 100
    markdown = (out / "results.md").read_text()
    assert "| gram_batch_mean |" in markdown
    assert results["conclusion"] in markdown


@pytest.mark.slow
def test_saved_student_reloads_with_its_stored_accuracy(study):
    results, out = study
    student = keras.saving.load_model(out / "student.keras")
    data = settings.load_setting("noisy", VIEWS, train_per_class=TRAIN_PER_CLASS)
    x, y = data.student_test
    accuracy = np.mean(np.argmax(student.predict(x, verbose=0), -1) == y)
    best = results["best_student"]
    runs = results["study"]["methods"][best["method"]]
    assert accuracy == pytest.approx(
        runs["accuracy"][runs["seeds"].index(best["seed"])]
    )


@pytest.mark.slow
@pytest.mark.parametrize("fusion", zoo.FUSIONS)
def test_demo_students_load_with_only_keras_imported(tmp_path, fusion):
    # The file a user ships: no keras_gramkd class may be needed to load it, and
    # the training noise is the identity at inference.
    student = zoo.build_student(
        {"fou": 76, "mor": 6}, noise_std=demo.NOISE_STD, fusion=fusion
    )
    x = {"fou": np.ones((2, 76), "float32"), "mor": np.ones((2, 6), "float32")}
    expected = keras.ops.convert_to_numpy(student(x))
    student.save(tmp_path / "student.keras")
    np.savez(tmp_path / "x.npz", **x)
    code = (
        "import sys, keras, numpy as np\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "assert not any(k.startswith('keras_gramkd') for k in sys.modules)\n"
        "x = dict(np.load(sys.argv[2]))\n"
        "np.save(sys.argv[3], keras.ops.convert_to_numpy(m(x)))\n"
    )
    args = [str(tmp_path / f) for f in ("student.keras", "x.npz", "y.npy")]
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(np.load(args[2]), expected, rtol=1e-5, atol=1e-5)
    noisy = keras.ops.convert_to_numpy(student(x, training=True))
    assert np.abs(noisy - expected).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize(
    ("setting", "methods", "headline", "labelled"),
    [
        ("unreliable", ["kd", "gram_fused", "gram_fused_batch_mean"], "accuracy", 200),
        ("missing", ["kd", "gram"], "dropped", 200),
        ("few-labels", ["labels", "kd", "sp"], "accuracy", 100),
    ],
)
def test_each_setting_runs_its_quick_study(
    tmp_path, setting, methods, headline, labelled
):
    results = demo.run_study(
        views=VIEWS,
        setting=setting,
        seeds=1,
        epochs=1,
        teacher_epochs=1,
        methods=methods,
        train_per_class=TRAIN_PER_CLASS,
        out=str(tmp_path),
        verbose=False,
    )
    data = results["data"]
    assert data["setting"] == setting and results["headline"] == headline
    assert data["n_train_student"] == 200 and data["n_labelled_student"] == labelled
    assert list(results["study"]["methods"]) == methods
    measure = {"accuracy": "test accuracy", "dropped": "accuracy with one view missing"}
    assert f"{setting} setting ({measure[headline]}" in results["conclusion"]
    fusion = "attention" if setting == "unreliable" else "concat"
    assert results["student"]["fusion"] == fusion
    student = keras.saving.load_model(tmp_path / "student.keras")
    assert student.count_params() == results["student"]["params"]


def test_noisy_test_split_is_fixed_and_teacher_split_is_clean():
    a = settings.load_setting("noisy", ["mor"], train_per_class=2)
    b = settings.load_setting("noisy", ["mor"], train_per_class=2)
    np.testing.assert_array_equal(a.student_test[0]["mor"], b.student_test[0]["mor"])
    np.testing.assert_array_equal(a.student_test[1], a.teacher_test[1])
    noise = a.student_test[0]["mor"] - a.teacher_test[0]["mor"]
    assert noise.std() == pytest.approx(demo.NOISE_STD, rel=0.1)
    assert a.student_noise == demo.NOISE_STD and a.headline == "accuracy"


def test_few_labels_keeps_the_unlabelled_rows():
    full = settings.load_setting("clean", ["mor"])
    few = settings.load_setting("few-labels", ["mor"])
    y = few.student_train[1]
    labelled = y != settings.UNLABELLED
    assert np.bincount(y[labelled]).tolist() == [demo.FEW_LABELS_PER_CLASS] * 10
    np.testing.assert_array_equal(y[labelled], full.student_train[1][labelled])
    np.testing.assert_array_equal(
        few.student_train[0]["mor"], full.teacher_train[0]["mor"]
    )
    assert few.has_unlabelled and not full.has_unlabelled


def test_unreliable_swaps_views_between_samples_for_teacher_and_student():
    clean = settings.load_setting("clean", ["fou", "mor"])
    data = settings.load_setting("unreliable", ["fou", "mor"])
    assert data.teacher_train is data.student_train and data.fusion == "attention"
    for split, original in (
        (data.student_train, clean.teacher_train),
        (data.student_test, clean.teacher_test),
    ):
        for view in ("fou", "mor"):
            x, x0 = split[0][view], original[0][view]
            swapped = np.any(x != x0, axis=1)
            assert swapped.mean() == pytest.approx(settings.SWAP_PROBABILITY, abs=0.05)
            # each swapped row is another sample's row of the same view
            rows = {r.tobytes(): i for i, r in enumerate(x0)}
            donors = [rows.get(r.tobytes()) for r in x[swapped]]
            assert None not in donors
            if view == "fou":  # 76 features: its rows are unique
                assert not np.any(np.equal(donors, np.flatnonzero(swapped)))
    mor_swaps = np.any(data.student_train[0]["mor"] != clean.teacher_train[0]["mor"], 1)
    fou_swaps = np.any(data.student_train[0]["fou"] != clean.teacher_train[0]["fou"], 1)
    assert (mor_swaps != fou_swaps).any()  # drawn per view, not per sample


def test_missing_setting_trains_with_modality_dropout():
    data = settings.load_setting("missing", ["mor"])
    noisy = settings.load_setting("noisy", ["mor"])
    assert data.modality_dropout == settings.MISSING_DROPOUT
    assert data.headline == "dropped" and data.student_noise == demo.NOISE_STD
    np.testing.assert_array_equal(
        data.student_test[0]["mor"], noisy.student_test[0]["mor"]
    )
    np.testing.assert_array_equal(
        data.teacher_test[0]["mor"], noisy.teacher_test[0]["mor"]
    )


def test_methods_add_each_term_to_kd_at_the_reference_weights():
    methods, skipped = demo_methods(CFG, VIEWS, fusion="concat")
    assert list(methods) == ALL_CONCAT
    assert set(skipped) == {"gram_diagonal"}
    assert methods["labels"] == [] and callable(methods["keras_kd"])
    for name, cls in (
        ("sp", SPTerm),
        ("rkd", RKDTerm),
        ("pkt", PKTTerm),
        ("fitnet", FitNetTerm),
    ):
        kd, term = methods[name]
        assert isinstance(kd, KDTerm) and isinstance(term, cls)
        assert term.weight == RELATIONAL_WEIGHTS[name]
        t, s = term.teacher_features, term.student_features
        assert (t.address, s.address) == ("t_pool", "s_pool")
    gram = methods["gram"][1]
    assert {k: f.address for k, f in gram.teacher_features.items()} == {
        "fou": "t_fou",
        "mor": "t_mor",
    }
    assert methods["gram_batch_mean"][1].gram_loss.target == "batch_mean"
    attention, skipped = demo_methods(
        {**CFG, "gram_normalize": "dim"}, VIEWS, fusion="attention"
    )
    fused = attention["gram_fused"][1]
    assert isinstance(fused, GramTerm)
    t, s = fused.teacher_features, fused.student_features
    assert (t.address, s.address) == ("t_fused", "s_fused")
    assert "gram_fused_diagonal" in attention and skipped == {}
    assert attention["gram_fused_diagonal"][1].gram_loss.entries == "diagonal"


def test_keras_kd_method_is_keras_own_distiller():
    teacher = zoo.build_teacher({"mor": 6})
    student = zoo.build_student({"mor": 6})
    methods, _ = demo_methods(CFG, ["mor"])
    model = methods["keras_kd"](teacher, student)
    assert isinstance(model, keras.distillation.Distiller)
    assert model.student_loss_weight == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"setting": "foggy"}, "Unknown setting 'foggy'"),
        ({"views": ["pix", "nope"]}, "nope"),
        ({"views": "pix,pix"}, "duplicates"),
        ({"epochs": 0}, "--epochs must be >= 1"),
        ({"gram_weight": -1.0}, "--gram-weight"),
        ({"temperature": float("nan")}, "--temperature"),
        ({"gram_normalize": "cosine"}, "--gram-normalize"),
        ({"methods": ["gram"]}, "include kd"),
        ({"methods": ["kd", "gram_fused"]}, "unknown: \\['gram_fused'\\]"),
        ({"methods": ["kd", "kd"]}, "distinct"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        demo.run_study(out=str(tmp_path), verbose=False, **kwargs)
    assert not (tmp_path / "results.json").exists()


def _parser():
    parser = argparse.ArgumentParser(prog="gramkd demo")
    add_demo_arguments(parser)
    return parser


def test_cli_arguments_and_errors(capsys):
    args = _parser().parse_args([])
    assert args.setting == demo.DEFAULT_SETTING and args.out is None
    with pytest.raises(SystemExit):
        _parser().parse_args(["--setting", "foggy"])
    assert "invalid choice: 'foggy'" in capsys.readouterr().err
    assert demo.run_demo(_parser().parse_args(["--views", "pix,bogus"])) == 2
    assert "bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["--seeds", "0"])
    assert "argument --seeds: must be at least 1, got 0" in capsys.readouterr().err
    assert demo.run_demo(_parser().parse_args(["--methods", "kd,nope"])) == 2
    assert "nope" in capsys.readouterr().err


ALL_CONCAT = [
    "labels",
    "kd",
    "keras_kd",
    "gram",
    "gram_batch_mean",
    "gram_off_diagonal",
    "sp",
    "rkd",
    "pkt",
    "fitnet",
    "modality_sp",
]


def test_default_runs_the_chosen_methods_and_full_runs_all():
    default = demo_study.resolve_config(None, "noisy")
    assert default["methods"] == ["labels", "kd", "gram", "gram_batch_mean", "sp"]
    assert (default["seeds"], default["epochs"], default["teacher_epochs"]) == (
        3,
        30,
        30,
    )
    fused = demo_study.resolve_config(None, "unreliable")["methods"]
    assert fused == [
        "labels",
        "kd",
        "gram",
        "gram_fused",
        "gram_fused_batch_mean",
        "sp",
    ]
    full = demo_study.resolve_config(None, "noisy", full=True)
    assert full["methods"] == ALL_CONCAT and full["full"]
    assert (full["seeds"], full["epochs"], full["teacher_epochs"]) == (3, 30, 30)
    every, _ = demo_methods(full, full["views"], fusion="attention")
    unreliable = demo_study.resolve_config(None, "unreliable", full=True)["methods"]
    assert unreliable == list(every)
    # explicit options still override --full
    mine = demo_study.resolve_config(
        None, "noisy", full=True, methods=["kd", "rkd"], seeds=5, epochs=7
    )
    assert mine["methods"] == ["kd", "rkd"] and (mine["seeds"], mine["epochs"]) == (
        5,
        7,
    )
    with pytest.raises(ValueError, match="exclude each other"):
        demo_study.resolve_config(None, "noisy", full=True, quick=True)


def test_expected_time_is_the_measured_formula():
    cfg = {
        "teacher_epochs": 20,
        "epochs": 10,
        "seeds": 2,
        "methods": ["kd", "rkd", "gram_fused_batch_mean"],
    }
    per_seed = 3 * demo_study.KD_RUN_S + demo_study.KD_EPOCH_S * 10 * (
        METHOD_COST["kd"] + METHOD_COST["rkd"] + METHOD_COST["gram"]
    )
    expected = demo_study.STARTUP_S + 20 * demo_study.TEACHER_EPOCH_S + 2 * per_seed
    assert demo_study.expected_seconds(cfg) == pytest.approx(expected)
    assert method_cost("gram_fused_batch_mean") == METHOD_COST["gram"]
    assert METHOD_COST["rkd"] > 2 * METHOD_COST["kd"]  # RKD's B x B x B angles
    default = demo_study.expected_seconds(demo_study.resolve_config(None, "noisy"))
    full = demo_study.expected_seconds(
        demo_study.resolve_config(None, "noisy", full=True)
    )
    assert default <= 240 < full  # the default fits in 4 minutes; --full does not
    line = demo_study.expected_line(demo_study.resolve_config(None, "noisy"))
    assert line == (
        f"Expected: about {default / 60:.0f} min on 2 idle CPU cores (teacher 30 "
        "epochs, 5 methods × 3 seeds × 30 epochs)"
    )


def test_cli_full_and_overrides_reach_the_study(monkeypatch, capsys):
    calls = []

    def fake_run_study(views, setting, **kwargs):
        calls.append(kwargs)
        return {}

    monkeypatch.setattr(demo_cli, "run_study", fake_run_study)
    assert demo.run_demo(_parser().parse_args(["--full", "--seeds", "4"])) == 0
    assert calls[-1]["full"] and calls[-1]["seeds"] == 4 and not calls[-1]["quick"]
    assert demo.run_demo(_parser().parse_args([])) == 0
    assert not calls[-1]["full"] and calls[-1]["methods"] is None
    with pytest.raises(SystemExit):
        _parser().parse_args(["--full", "--quick"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow
def test_verbose_run_prints_the_expected_time_first_and_the_folder_last(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    console = make_console(file=io.StringIO())
    results = demo.run_study(
        views=VIEWS,
        seeds=1,
        epochs=1,
        teacher_epochs=1,
        methods=["kd", "keras_kd"],
        train_per_class=TRAIN_PER_CLASS,
        out="run",
        console=console,
    )
    lines = console.file.getvalue().strip().splitlines()
    assert lines[0] == demo_study.expected_line(results["config"])
    assert lines[-1] == f"Wrote {tmp_path / 'run'}{os.sep}"
    assert results["expected_time_s"] == demo_study.expected_seconds(results["config"])
    assert (
        "keras_kd, Keras' own keras.distillation.Distiller" in (results["conclusion"])
    )
