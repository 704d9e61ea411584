"""evaluate_robustness against an independent NumPy computation, and its errors."""

import dataclasses
import itertools

import keras
import numpy as np
import pytest
from helpers import make_data, make_net, modality_map

import keras_gramkd
from keras_gramkd import Distiller, robustness
from keras_gramkd.robustness import RobustnessReport, evaluate_robustness

# The hand-built model: logits = sum over inputs of WEIGHTS[key] * x[key].
WEIGHTS = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.5}
CLASSES = 4


def weighted_model(keys=tuple(WEIGHTS)):
    inputs = {k: keras.Input((CLASSES,), name=k) for k in keys}
    scaled = [keras.layers.Rescaling(WEIGHTS[k])(inputs[k]) for k in keys]
    logits = keras.layers.Add()(scaled) if len(keys) > 1 else scaled[0]
    return keras.Model(inputs, logits)


def weighted_data(n=64, keys=tuple(WEIGHTS), seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, size=n)
    # Each input votes for the right class, plus noise: stronger inputs matter more.
    x = {
        k: (np.eye(CLASSES)[y] + rng.normal(size=(n, CLASSES))).astype("float32")
        for k in keys
    }
    return x, y


def numpy_accuracy(x, y, dropped_keys, fill_value):
    """Accuracy of the weighted model, computed without keras, in float64."""
    logits = sum(
        WEIGHTS[k] * (fill_value if k in dropped_keys else v.astype(np.float64))
        for k, v in x.items()
    )
    return float(np.mean(np.argmax(logits, axis=-1) == y))


@pytest.mark.parametrize("fill_value", [0.0, 0.5])
def test_accuracies_match_numpy(fill_value):
    x, y = weighted_data()
    report = evaluate_robustness(weighted_model(), x, y, fill_value=fill_value)
    assert report.accuracy == numpy_accuracy(x, y, (), fill_value)
    assert report.dropped == {k: numpy_accuracy(x, y, {k}, fill_value) for k in x}
    assert report.dropped_pairs == {
        pair: numpy_accuracy(x, y, set(pair), fill_value)
        for pair in itertools.combinations(x, 2)
    }
    assert report.num_samples == len(y) and report.fill_value == fill_value
    # Dropping the strongest input costs the most; the values are not all equal.
    assert report.dropped["a"] < report.dropped["d"] <= report.accuracy


def test_exact_accuracies_of_a_predictable_model():
    """Only "a" knows the class of the first half; only "b" of the second.

    Labels are 1 and 2, so all-zero logits (argmax 0) are always wrong.
    """
    n = 8
    y = 1 + np.arange(n) % 2
    right = np.eye(CLASSES, dtype="float32")[y]
    wrong = np.eye(CLASSES, dtype="float32")[np.full(n, 3)]
    first = (np.arange(n) < n // 2)[:, None]
    x = {
        "a": np.where(first, right, 0.0),  # weight 3
        "b": np.where(first, 0.0, right),  # weight 2
        "c": wrong,  # weight 1: always class 3, outvoted by "a" or "b"
    }
    report = evaluate_robustness(weighted_model(("a", "b", "c")), x, y)
    assert report.accuracy == 1.0
    assert report.dropped == {"a": 0.5, "b": 0.5, "c": 1.0}
    assert report.dropped_pairs == {("a", "b"): 0.0, ("a", "c"): 0.5, ("b", "c"): 0.5}
    assert report.mean_dropped == pytest.approx(2 / 3)


def test_a_modality_of_several_inputs_drops_them_together():
    x, y = weighted_data()
    modalities = {"ab": ["a", "b"], "c": "c", "d": ("d",)}
    report = evaluate_robustness(weighted_model(), x, y, modalities=modalities)
    assert report.dropped == {
        "ab": numpy_accuracy(x, y, {"a", "b"}, 0.0),
        "c": numpy_accuracy(x, y, {"c"}, 0.0),
        "d": numpy_accuracy(x, y, {"d"}, 0.0),
    }
    assert report.dropped_pairs[("ab", "d")] == numpy_accuracy(x, y, {"a", "b", "d"}, 0)
    # A list picks modalities among the keys of x; the others are never dropped.
    subset = evaluate_robustness(weighted_model(), x, y, modalities=["c", "a"])
    assert list(subset.dropped) == ["c", "a"]
    assert list(subset.dropped_pairs) == [("c", "a")]


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_pairs_count_and_order(m):
    keys = tuple(WEIGHTS)[:m]
    x, y = weighted_data(n=8, keys=keys)
    report = evaluate_robustness(weighted_model(keys), x, y)
    assert len(report.dropped) == m
    assert len(report.dropped_pairs) == m * (m - 1) // 2
    assert list(report.dropped_pairs) == list(itertools.combinations(keys, 2))
    assert (
        evaluate_robustness(weighted_model(keys), x, y, pairs=False).dropped_pairs == {}
    )


def test_label_formats_agree_and_x_is_not_modified():
    x, y = weighted_data(keys=("a", "b"))
    before = {k: v.copy() for k, v in x.items()}
    model = weighted_model(("a", "b"))
    expected = evaluate_robustness(model, x, y, pairs=False)
    for labels in (np.eye(CLASSES)[y], y[:, None], y.astype("float32"), list(y)):
        assert evaluate_robustness(model, x, labels, pairs=False) == expected
    for k in x:
        np.testing.assert_array_equal(x[k], before[k])


def test_report_rows_table_and_lookup():
    report = RobustnessReport(
        accuracy=0.9,
        dropped={"a": 0.5, "b": 0.8},
        dropped_pairs={("a", "b"): 0.25},
        num_samples=4,
        fill_value=0.0,
    )
    assert report.rows() == [
        ((), 0.9, 0.0),
        (("a",), 0.5, pytest.approx(-0.4)),
        (("b",), 0.8, pytest.approx(-0.1)),
        (("a", "b"), 0.25, pytest.approx(-0.65)),
    ]
    assert report.to_markdown().splitlines()[2:] == [
        "| nothing | 90.00 |  |",
        "| a | 50.00 | -40.00 |",
        "| b | 80.00 | -10.00 |",
        "| a + b | 25.00 | -65.00 |",
    ]
    assert report.without() == 0.9 and report.without("b") == 0.8
    assert report.without("b", "a") == report.without("a", "b") == 0.25
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.accuracy = 1.0


def test_distiller_is_evaluated_through_its_student():
    teacher, student = make_net("t", 8), make_net("s", 3)
    distiller = Distiller(
        teacher,
        student,
        teacher_modalities=modality_map("t"),
        student_modalities=modality_map("s"),
    )
    x, y = make_data()
    report = evaluate_robustness(distiller, x, y, batch_size=16)
    assert report == evaluate_robustness(student, x, y, batch_size=16)
    assert list(report.dropped) == list(x) and len(report.dropped_pairs) == 3


def test_lazy_export_resolves():
    assert keras_gramkd.evaluate_robustness is robustness.evaluate_robustness
    assert "evaluate_robustness" in keras_gramkd.__all__


def _two_outputs():
    a = keras.Input((CLASSES,), name="a")
    return keras.Model({"a": a}, [a, a])


X1, Y1 = weighted_data(n=6, keys=("a",))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "model"}, TypeError, "model must be a keras.Model"),
        ({"x": X1["a"]}, ValueError, "x must be a dict input name -> array"),
        ({"x": {}}, ValueError, "x is an empty dict"),
        ({"x": {"a": X1["a"][:0]}, "y": Y1[:0]}, ValueError, "x has no samples"),
        (
            {"x": {"a": X1["a"], "b": X1["a"][:4]}},
            ValueError,
            r"different numbers of samples \(\{'a': 6, 'b': 4\}\)",
        ),
        ({"y": Y1[:5]}, ValueError, "y has 5 labels but x has 6 samples"),
        ({"y": Y1 + 0.5}, ValueError, "y must be .* integer class labels"),
        ({"y": Y1 - 1}, ValueError, "integer class labels >= 0"),
        ({"y": np.ones((6, CLASSES))}, ValueError, "or \\(n, classes\\) one-hot"),
        ({"y": np.full(6, CLASSES)}, ValueError, "class label 4 but the model"),
        ({"y": np.eye(CLASSES + 1)[Y1]}, ValueError, "one-hot over 5 classes"),
        ({"modalities": {"a": "z"}}, ValueError, r"needs input\(s\) \['z'\]"),
        ({"modalities": ["a", "b"]}, ValueError, "Modality 'b' needs input"),
        ({"modalities": {}}, ValueError, "names no inputs"),
        ({"modalities": {"a": []}}, ValueError, "names no inputs"),
        ({"modalities": "a"}, ValueError, "modalities must be None"),
        (
            {"fill_value": float("nan")},
            ValueError,
            "fill_value must be a finite number",
        ),
        ({"model": _two_outputs()}, ValueError, r"one \(n, classes\) array"),
        (
            {"x": {**X1, "z": X1["a"]}},
            ValueError,
            r"x has key\(s\) \['z'\] that the model does not take; its inputs "
            r"are \['a'\]\. Remove them",
        ),
        (
            {"x": {**X1, "modality_mask": np.ones((6, 1), "float32")}},
            ValueError,
            "x has a 'modality_mask' key.*remove it from x",
        ),
    ],
)
def test_errors_name_the_problem_and_the_fix(kwargs, error, match):
    args = {"model": weighted_model(("a",)), "x": X1, "y": Y1, **kwargs}
    with pytest.raises(error, match=match):
        evaluate_robustness(**args)


def test_report_lookup_errors():
    x, y = weighted_data(n=6, keys=("a", "b", "c"))
    report = evaluate_robustness(weighted_model(("a", "b", "c")), x, y, pairs=False)
    with pytest.raises(ValueError, match=r"Unknown modality 'z'.*\['a', 'b', 'c'\]"):
        report.without("z")
    with pytest.raises(ValueError, match=r"pairs=True"):
        report.without("a", "b")
    with pytest.raises(ValueError, match="name none, one, or two different"):
        report.without("a", "b", "c")
    with pytest.raises(ValueError, match="name none, one, or two different"):
        report.without("a", "a")


def test_distiller_x_is_checked_against_the_student_inputs():
    ab = ("a", "b")
    teacher, student = make_net("t", 8, ab), make_net("s", 3, ab)
    distiller = Distiller(
        teacher,
        student,
        teacher_modalities=modality_map("t", ab),
        student_modalities=modality_map("s", ab),
    )
    x, y = make_data()
    with pytest.raises(ValueError, match=r"\['c'\] that the model does not take"):
        evaluate_robustness(distiller, x, y)
    mask = np.ones((len(y), 2), "float32")
    with pytest.raises(ValueError, match="has a 'modality_mask' key"):
        evaluate_robustness(
            distiller, {"a": x["a"], "b": x["b"], "modality_mask": mask}, y
        )
