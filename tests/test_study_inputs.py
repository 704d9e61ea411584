"""compare_methods on users' own models: a stacked (batch, M, d) address for
|ΔG|, named test sets, batch seeds apart from weight seeds, and a warning
when two seeds start from the same weights."""

import json
import warnings

import keras
import numpy as np
import pytest
from helpers import WIDTHS, make_data

from keras_gramkd import GramTerm, KDTerm, ModalityStack
from keras_gramkd.study import compare_methods, modality_grams

MODS = ("a", "b", "c")


def _fused_net(prefix, width):
    """Dense encoders per modality stacked into `<prefix>_fused` (batch, 3, d)."""
    inputs = {m: keras.Input((WIDTHS[m],), name=m) for m in MODS}
    embeds = [
        keras.layers.Dense(width, activation="tanh", name=f"{prefix}_{m}")(inputs[m])
        for m in MODS
    ]
    fused = ModalityStack(name=f"{prefix}_fused")(embeds)
    logits = keras.layers.Dense(3)(keras.layers.Flatten()(fused))
    return keras.Model(inputs, logits, name=f"{prefix}_net")


@pytest.fixture(scope="module")
def teacher():
    keras.utils.set_random_seed(1)
    return _fused_net("t", 8)


def _student():
    return _fused_net("s", 3)


def _np(model, x, layer=None):
    """The model's logits, or the output of `layer`, as numpy."""
    if layer is not None:
        model = keras.Model(model.input, model.get_layer(layer).output)
    return keras.ops.convert_to_numpy(model(x, training=False))


def _grams_numpy(features):
    """Cosine Gram per sample, in float64, from (n, M, d) features."""
    unit = features / np.linalg.norm(features, axis=-1, keepdims=True)
    return np.einsum("nmd,nkd->nmk", unit.astype(np.float64), unit)


def _accuracy(model, split):
    x, y = split
    return np.mean(_np(model, x).argmax(-1) == y)


def _tiny(teacher, **kwargs):
    args = dict(
        teacher=teacher,
        build_student=_student,
        train=make_data(16, seed=2),
        test=make_data(8, seed=3),
        methods={"labels": []},
        seeds=2,
        epochs=1,
        batch_size=8,
    )
    return {**args, **kwargs}


def test_modality_grams_of_a_stacked_address_match_numpy(teacher):
    x, _ = make_data(10, seed=4)
    expected = _grams_numpy(_np(teacher, x, "t_fused"))
    grams = modality_grams(teacher, "t_fused", x, batch_size=4)
    assert grams.shape == (10, 3, 3)
    np.testing.assert_allclose(grams, expected, atol=1e-5)


@pytest.fixture(scope="module")
def named_study(teacher):
    """Two methods, two seeds, two named test sets (the teacher sees clean
    inputs where the students see noisy ones), |ΔG| on the fused tokens."""
    clean = make_data(12, seed=3)
    noisy = ({k: v + 0.5 for k, v in clean[0].items()}, clean[1])
    tests = {"clean": clean, "noisy": noisy}
    result = compare_methods(
        teacher,
        _student,
        make_data(16, seed=2),
        tests,
        methods={"kd": [KDTerm()], "gram": [GramTerm("t_fused", "s_fused")]},
        seeds=2,
        epochs=1,
        batch_size=8,
        teacher_modalities="t_fused",
        student_modalities="s_fused",
        teacher_test={"noisy": clean},
        keep_students=True,
    )
    return result, tests


def test_stacked_address_gram_gap_matches_numpy(teacher, named_study):
    result, tests = named_study
    teacher_grams = _grams_numpy(_np(teacher, tests["clean"][0], "t_fused"))
    for (method, seed), student in result.students.items():
        run = result.methods[method]
        i = run.seeds.index(seed)
        for name, (x, _) in tests.items():
            grams = _grams_numpy(_np(student, x, "s_fused"))
            gap = np.mean(np.abs(teacher_grams - grams))
            assert run.tests[name]["gram_gap"][i] == pytest.approx(gap, abs=1e-5)
        assert run.gram_gap[i] == run.tests["clean"]["gram_gap"][i]


def test_each_named_test_set_is_scored_and_reported(teacher, named_study):
    result, tests = named_study
    assert sorted(result.students) == [("gram", 0), ("gram", 1), ("kd", 0), ("kd", 1)]
    for name, split in tests.items():
        on = result.on(name)
        for method in ("kd", "gram"):
            expected = [_accuracy(result.students[(method, s)], split) for s in (0, 1)]
            assert on.methods[method].accuracy == pytest.approx(expected)
            assert result.methods[method].tests[name]["accuracy"] == pytest.approx(
                expected
            )
    # The headline numbers are the first set's; the teacher saw clean inputs.
    assert result.methods["kd"].accuracy == result.on("clean").methods["kd"].accuracy
    clean_teacher = _accuracy(teacher, tests["clean"])
    assert result.teacher_accuracy == pytest.approx(clean_teacher)
    assert result.teacher_tests["noisy"]["accuracy"] == pytest.approx(clean_teacher)
    assert result.config["n_test"] == {"clean": 12, "noisy": 12}

    data = json.loads(result.to_json())
    noisy = data["tests"]["noisy"]
    accs = result.on("noisy").methods["gram"].accuracy
    assert noisy["methods"]["gram"]["accuracy_mean"] == pytest.approx(np.mean(accs))
    assert noisy["methods"]["gram"]["accuracy_se"] == pytest.approx(
        np.std(accs, ddof=1) / np.sqrt(2)
    )
    diffs = np.subtract(accs, result.on("noisy").methods["kd"].accuracy)
    assert noisy["paired_vs_reference"]["gram"]["diffs"] == pytest.approx(diffs)
    again = type(result).from_json(result.to_json())
    assert again.to_dict() == result.to_dict()

    text = result.to_markdown()
    assert text.startswith("**clean**\n\n| method |")
    clean_part, noisy_part = text.split("\n\n**noisy**\n\n")
    assert clean_part.endswith(result.on("clean").to_markdown())
    assert noisy_part == result.on("noisy").to_markdown()
    with pytest.raises(ValueError, match=r"No test set 'other'.*\['clean', 'noisy'\]"):
        result.on("other")


class _InitialWeights(keras.callbacks.Callback):
    """Keeps each run's student weights at the start of training."""

    def __init__(self, store, key):
        super().__init__()
        self.store, self.key = store, key

    def on_train_begin(self, logs=None):
        self.store[self.key] = self.model.student.get_weights()


def _batch_seed_run(teacher, batch_seeds):
    initial = {}
    result = compare_methods(
        **_tiny(
            teacher,
            seeds=[5],
            batch_seeds=batch_seeds,
            batch_size=4,
            keep_students=True,
            callbacks=lambda m, s: [_InitialWeights(initial, (m, s))],
        )
    )
    return result, initial[("labels", 5)], result.students[("labels", 5)].get_weights()


def _same(a, b):
    return all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))


def test_batch_seeds_set_the_batch_order_apart_from_the_weights(teacher):
    default, start, trained = _batch_seed_run(teacher, None)
    same, same_start, same_trained = _batch_seed_run(teacher, [5])
    other, other_start, other_trained = _batch_seed_run(teacher, [0])
    assert _same(start, same_start) and _same(start, other_start)
    assert _same(trained, same_trained)  # batch seeds default to the seeds
    assert not _same(trained, other_trained)
    assert default.config["seeds"] == other.config["seeds"] == [5]
    assert default.config["batch_seeds"] == [5]
    assert json.loads(other.to_json())["config"]["batch_seeds"] == [0]
    # One unnamed test set: no per-set sections.
    assert "tests" not in default.to_dict() and default.config["n_test"] == 8


def _reseeding_student():
    keras.utils.set_random_seed(0)
    return _student()


def test_identical_initial_weights_across_seeds_warn(teacher):
    args = _tiny(teacher, build_student=_reseeding_student, steps_per_epoch=1)
    with pytest.warns(UserWarning) as caught:
        compare_methods(**args)
    messages = [str(w.message) for w in caught if "identical" in str(w.message)]
    assert messages == [
        "Seeds 0 and 1 give identical initial student weights, so their runs "
        "differ at most by the batch order and the seeds are not independent. "
        "Likely cause: build_student() sets a seed itself "
        "(keras.utils.set_random_seed or a seeded initializer). Fix: leave the "
        "seeding out of build_student(); compare_methods seeds each run before "
        "calling it."
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compare_methods(**{**args, "build_student": _student})
    assert not [w for w in caught if "identical" in str(w.message)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"test": {"clean": make_data(8), "noisy": make_data(8)[0]}},
            r"test must be one \(x, y\) or a dict name -> \(x, y\) .*; "
            r"test\['noisy'\] is dict, not a pair \(x, y\)",
        ),
        (
            {"test": {"clean": (make_data(8)[0], np.zeros(5))}},
            r"test\['clean'\]'s x and y must have the same number of rows: y has 5",
        ),
        (
            {"test": {"clean": make_data(8)}, "teacher_test": make_data(8)},
            r"With named test sets, teacher_test must be a dict test set name -> "
            r"\(x, y\) with names among \['clean'\] .*; got tuple\.",
        ),
        (
            {"test": {"clean": make_data(8)}, "teacher_test": {"dirty": make_data(8)}},
            r"names among \['clean'\] .*; got a dict with keys \['dirty'\]\.",
        ),
        (
            {"test": {"clean": make_data(8)}, "teacher_test": {"clean": make_data(5)}},
            r"teacher_test\['clean'\] must hold the same samples as test\['clean'\], "
            r"row for row: test\['clean'\] has 8 rows, teacher_test\['clean'\] has 5",
        ),
        (
            {"batch_seeds": [0, 1, 2]},
            r"batch_seeds must give one batch-order seed per seed: there are 2 "
            r"seeds \(\[0, 1\]\) but 3 batch seeds \(\[0, 1, 2\]\)\. Give 2 of them",
        ),
        (
            {"batch_seeds": [0, 1.5]},
            r"batch_seeds must be a list of whole numbers in \[0, 2\*\*32\), one "
            r"per seed; got \[0, 1\.5\]\. Give e\.g\. batch_seeds=\[0\] \* 2",
        ),
        (
            {"teacher_modalities": "t_fused", "student_modalities": "s_a"},
            r"modalities is one address, 's_a', whose output has shape "
            r"\(None, 3\); a single address must output the stacked",
        ),
        (
            {
                "teacher_modalities": "t_fused",
                "student_modalities": {"a": "s_a", "b": "s_b"},
            },
            r"The teacher's modality Gram matrices are 3×3 but the student's are "
            r"2×2: teacher_modalities and student_modalities must name as many",
        ),
        (
            {
                "teacher_modalities": {"address": "t_fused", "pooling": "mean"},
                "student_modalities": "s_fused",
            },
            r"teacher_modalities and student_modalities \(for \|ΔG\|\) take what a "
            r"GramTerm takes: In GramTerm 'gram_gap', teacher_features is one "
            r"address with pool='mean'",
        ),
    ],
)
def test_bad_inputs_fail_clearly_before_training(teacher, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compare_methods(**_tiny(teacher, **kwargs))
