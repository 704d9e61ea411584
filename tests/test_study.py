"""keras_gramkd.study: paired comparisons of methods on a user's own models."""

import json

import keras
import numpy as np
import pytest
from helpers import make_data, make_net, modality_map, net_outputs, sparse_ce

from keras_gramkd import GramTerm, KDTerm
from keras_gramkd.study import (
    SeededBatches,
    StudyResult,
    compare_methods,
    modality_grams,
    paired_difference,
)

MODS = ("a", "b", "c")


@pytest.fixture(scope="module")
def teacher():
    keras.utils.set_random_seed(1)
    model = make_net("t", 8)
    model.compile("adam", sparse_ce())
    x, y = make_data(96, seed=1)
    model.fit(x, y, epochs=3, verbose=0)
    return model


def _student():
    return make_net("s", 3)


def _grams_numpy(features):
    """Cosine Gram per sample, in float64, from (n, M, d) features."""
    unit = features / np.maximum(
        np.linalg.norm(features, axis=-1, keepdims=True), 1e-12
    )
    return np.einsum("nmd,nkd->nmk", unit.astype(np.float64), unit)


def _kept(store):
    """A `callbacks` argument that keeps each run's trained student."""

    class Keep(keras.callbacks.Callback):
        def __init__(self, key):
            super().__init__()
            self.key = key

        def on_train_end(self, logs=None):
            store[self.key] = self.model.student

    return lambda method, seed: [Keep((method, seed))]


@pytest.mark.slow  # fast tier: under 3 min per backend
def test_identical_methods_are_identical_per_seed(teacher):
    # Same initial weights, batches, optimizer and random streams per seed:
    # two copies of one method must give the same numbers bit for bit.
    result = compare_methods(
        teacher,
        _student,
        make_data(60, seed=2),
        make_data(40, seed=3),
        methods={"kd": [KDTerm()], "kd_again": [KDTerm()]},
        seeds=[0, 5],
        epochs=2,
        batch_size=16,
        teacher_modalities=modality_map("t"),
        student_modalities=modality_map("s"),
    )
    a, b = result.methods["kd"], result.methods["kd_again"]
    assert a.seeds == b.seeds == [0, 5]
    assert a.accuracy == b.accuracy and a.gram_gap == b.gram_gap
    assert a.dropped == b.dropped
    assert result.paired("kd_again")["diffs"] == [0.0, 0.0]
    # Different seeds start from different weights.
    assert result.methods["kd"].gram_gap[0] != result.methods["kd"].gram_gap[1]


def test_measures_match_independent_references(teacher):
    students = {}
    x_test, y_test = make_data(40, seed=3)
    result = compare_methods(
        teacher,
        _student,
        make_data(60, seed=2),
        (x_test, y_test),
        methods={
            "labels": [],
            "kd+gram": [KDTerm(), GramTerm(modality_map("t"), modality_map("s"))],
        },
        seeds=2,
        epochs=1,
        batch_size=16,
        teacher_modalities=modality_map("t"),
        student_modalities=modality_map("s"),
        callbacks=_kept(students),
    )
    _, t_feats = net_outputs(teacher, "t", x_test)
    t_grams = _grams_numpy(t_feats)
    for (method, seed), student in students.items():
        run = result.methods[method]
        i = run.seeds.index(seed)
        logits, s_feats = net_outputs(student, "s", x_test)
        assert run.accuracy[i] == pytest.approx(np.mean(logits.argmax(-1) == y_test))
        gap = np.mean(np.abs(t_grams - _grams_numpy(s_feats)))
        assert run.gram_gap[i] == pytest.approx(gap, abs=1e-5)
        for m in MODS:
            dropped = {
                k: (np.zeros_like(v) if k == m else v) for k, v in x_test.items()
            }
            out = keras.ops.convert_to_numpy(student(dropped, training=False))
            assert run.dropped[m][i] == pytest.approx(np.mean(out.argmax(-1) == y_test))
        assert run.params == student.count_params()
        assert run.train_time_s[i] > 0
    assert len(students) == 4
    teacher_logits, _ = net_outputs(teacher, "t", x_test)
    assert result.teacher_accuracy == pytest.approx(
        np.mean(teacher_logits.argmax(-1) == y_test)
    )


@pytest.mark.slow  # fast tier: under 3 min per backend
def test_custom_trainers_teacher_split_steps_and_kept_students(teacher):
    # A method may be any (teacher, student) -> keras.Model trainer, here
    # Keras' own Distiller; the teacher may be scored on its own split.
    x_test, y_test = make_data(40, seed=3)
    x_teacher = {k: v * 0.0 for k, v in x_test.items()}
    seen = []

    def keras_distiller(t, s):
        return keras.distillation.Distiller(
            teacher=t,
            student=s,
            distillation_losses=keras.distillation.LogitsDistillation(temperature=2),
        )

    result = compare_methods(
        teacher,
        _student,
        make_data(60, seed=2),
        (x_test, y_test),
        methods={"kd": [KDTerm()], "keras": keras_distiller},
        seeds=[3],
        epochs=2,
        batch_size=16,
        steps_per_epoch=5,
        teacher_test=(x_teacher, y_test),
        on_run_end=lambda method, seed, acc: seen.append((method, seed, acc)),
        keep_students=True,
        jit_compile=False,
    )
    assert result.config["steps_per_epoch"] == 5
    assert [(m, s) for m, s, _ in seen] == [("kd", 3), ("keras", 3)]
    for method, seed, accuracy in seen:
        student = result.students[(method, seed)]
        logits = keras.ops.convert_to_numpy(student(x_test, training=False))
        assert accuracy == pytest.approx(np.mean(logits.argmax(-1) == y_test))
        assert result.methods[method].accuracy == [accuracy]
    assert result.students[("kd", 3)] is not result.students[("keras", 3)]
    history = result.methods["kd"].histories[0]
    assert len(history["loss"]) == 2 and "kd_loss" in history
    assert len(result.methods["keras"].histories[0]["loss"]) == 2
    teacher_logits = keras.ops.convert_to_numpy(teacher(x_teacher, training=False))
    assert result.teacher_accuracy == pytest.approx(
        np.mean(teacher_logits.argmax(-1) == y_test)
    )
    again = StudyResult.from_json(result.to_json())
    assert again.methods["kd"].histories == result.methods["kd"].histories
    assert again.students == {}


def test_validation_split_adds_val_curves_only(teacher):
    # `validation` is observed after each epoch: val_ entries and accuracy
    # (labelled rows only) in every method's history, the same training and
    # scores as without it.
    def keras_distiller(t, s):
        return keras.distillation.Distiller(
            teacher=t,
            student=s,
            distillation_losses=keras.distillation.LogitsDistillation(temperature=2),
        )

    args = dict(
        teacher=teacher,
        build_student=_student,
        train=make_data(32, seed=2),
        test=make_data(16, seed=3),
        methods={"labels": [], "kd": [KDTerm()], "keras": keras_distiller},
        seeds=[1],
        epochs=2,
        batch_size=16,
        loss=lambda: keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=-1
        ),
        keep_students=True,
        jit_compile=False,
    )
    x_val, y_val = make_data(12, seed=4)
    y_val[:4] = -1  # unlabelled rows: left out of the accuracy
    result = compare_methods(**args, validation=(x_val, y_val))
    for name in ("labels", "kd", "keras"):
        history = result.methods[name].histories[0]
        assert len(history["val_loss"]) == 2 and len(history["val_accuracy"]) == 2
        logits = keras.ops.convert_to_numpy(result.students[(name, 1)](x_val))
        labelled = y_val >= 0
        expected = np.mean(logits[labelled].argmax(-1) == y_val[labelled])
        assert history["val_accuracy"][-1] == pytest.approx(expected)
    assert "val_kd_loss" in result.methods["kd"].histories[0]
    plain = compare_methods(**args)
    assert plain.methods["kd"].accuracy == result.methods["kd"].accuracy
    assert not any(k.startswith("val_") for k in plain.methods["kd"].histories[0])
    assert "accuracy" not in plain.methods["kd"].histories[0]


def test_paired_statistics_match_numpy():
    values, reference = [0.91, 0.88, 0.90, 0.86], [0.90, 0.89, 0.87, 0.86]
    p = paired_difference(values, reference)
    diffs = np.array(values) - np.array(reference)
    assert p["diffs"] == pytest.approx(diffs.tolist())
    assert p["mean"] == pytest.approx(diffs.mean())
    assert p["se"] == pytest.approx(diffs.std(ddof=1) / 2.0)
    assert p["better"] == 2
    assert np.isnan(paired_difference([0.9], [0.8])["se"])
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference([0.9, 0.8], [0.8])


def _result():
    from keras_gramkd.robustness import RobustnessReport
    from keras_gramkd.study import MethodResult

    methods = {}
    for name, accs in {"kd": [0.80, 0.82, 0.81], "gram": [0.81, 0.84, 0.80]}.items():
        methods[name] = MethodResult(name)
        for seed, acc in enumerate(accs):
            report = RobustnessReport(
                acc, {"a": acc - 0.1, "b": acc - 0.2}, {}, 40, 0.0
            )
            methods[name].add(seed, report, 0.1 * (seed + 1), 1.5, 123)
    return StudyResult(
        methods, "kd", 0.95, {"a": 0.9, "b": 0.85}, 999, {"seeds": [0, 1, 2]}
    )


def test_markdown_json_and_plot():
    result = _result()
    text = result.to_markdown()
    lines = text.splitlines()
    assert lines[0].startswith("| method | acc % (mean ± sd, 3 seeds) | Δ vs kd")
    gram = next(line for line in lines if line.startswith("| gram |"))
    diffs = np.array([0.01, 0.02, -0.01])
    se = 100 * diffs.std(ddof=1) / np.sqrt(3)
    assert f"+{100 * diffs.mean():.2f} ± {se:.2f}" in gram
    assert "| 2 of 3 |" in gram and "| 0.200 |" in gram
    assert result.values("gram", "dropped") == pytest.approx([0.66, 0.69, 0.65])
    with pytest.raises(ValueError, match="Unknown measure 'f1'"):
        result.values("gram", "f1")
    data = json.loads(result.to_json())
    assert data["paired_vs_reference"]["gram"]["better"] == 2
    again = StudyResult.from_json(result.to_json())
    assert again.to_dict() == result.to_dict()
    fig = result.plot()
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["gram"]


def test_one_seed_says_its_standard_error_is_undefined():
    result = _result()
    for r in result.methods.values():
        r.seeds, r.accuracy = r.seeds[:1], r.accuracy[:1]
        r.dropped = {k: v[:1] for k, v in r.dropped.items()}
    assert "± n/a" in result.to_markdown()
    assert json.loads(result.to_json())["paired_vs_reference"]["gram"]["se"] is None


def test_modality_grams_match_numpy(teacher):
    x, _ = make_data(30, seed=4)
    grams = modality_grams(teacher, modality_map("t"), x, batch_size=7)
    _, feats = net_outputs(teacher, "t", x)
    np.testing.assert_allclose(grams, _grams_numpy(feats), atol=1e-5)


def test_seeded_batches_repeat_per_seed_and_cover_every_row():
    x, y = {"a": np.arange(10.0)[:, None]}, np.arange(10)
    one, two = SeededBatches(x, y, 4, seed=3), SeededBatches(x, y, 4, seed=3)
    assert len(one) == 3
    rows = np.concatenate([one[i][1] for i in range(3)])
    assert sorted(rows[:10].tolist()) == list(range(10))
    np.testing.assert_array_equal(rows, np.concatenate([two[i][1] for i in range(3)]))
    assert not np.array_equal(one[0][1], SeededBatches(x, y, 4, seed=4)[0][1])
    # More batches than one pass: permutations follow each other; each epoch
    # draws a new order, the same for the same seed.
    long_a, long_b = (SeededBatches(x, y, 4, num_batches=5, seed=3) for _ in "ab")
    rows = np.concatenate([long_a[i][1] for i in range(5)])
    assert len(long_a) == 5 and sorted(rows[10:].tolist()) == list(range(10))
    before = long_a[0][1]
    long_a.on_epoch_end()
    long_b.on_epoch_end()
    np.testing.assert_array_equal(long_a[0][1], long_b[0][1])
    assert not np.array_equal(long_a[0][1], before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"methods": []}, "methods must be a non-empty dict"),
        ({"methods": {"kd": "KDTerm"}}, r"methods\['kd'\] must be a list"),
        ({"reference": "nope"}, "reference 'nope' is not one of the methods"),
        ({"seeds": 0}, "seeds must be >= 1"),
        ({"seeds": [1, 1]}, "seeds must be distinct"),
        ({"teacher_modalities": {"a": "t_a"}}, "Give both teacher_modalities"),
        (
            {"validation": (make_data(8)[0], np.zeros(5))},
            r"validation's x and y must have the same number of rows: y has 5",
        ),
        ({"validation": make_data(8)[0]}, r"validation must be a pair \(x, y\)"),
    ],
)
def test_bad_arguments_fail_clearly(teacher, kwargs, message):
    args = dict(
        teacher=teacher,
        build_student=_student,
        train=make_data(8),
        test=make_data(8),
        methods={"kd": [KDTerm()]},
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        compare_methods(**args)
