"""Bad samples: the label check, non-finite weights and overflows, one reduction
convention, keys nobody reads, modality_mask values (docs/guide/bad-input.md).

Each test runs on every backend (the suite runs once per KERAS_BACKEND).
"""

import keras
import numpy as np
import pytest
from helpers import (
    WIDTHS,
    make_data,
    make_net,
    modality_map,
    net_outputs,
    np_gram,
    sparse_ce,
    to_np,
)

from keras_gramkd import Distiller

T = 4.0


def build(n_classes=3, loss=None, teacher=None, student=None, m=None, **kwargs):
    distiller = Distiller(
        teacher or make_net("t", 16, n_classes=n_classes),
        student or make_net("s", 4, n_classes=n_classes),
        modality_map("t"),
        modality_map("s"),
        temperature=T,
        **kwargs,
    )
    distiller.compile(optimizer="adam", loss=loss or sparse_ce(), metrics=m)
    return distiller


def weights_finite(model):
    return all(np.all(np.isfinite(to_np(w))) for w in model.weights)


def evaluate(distiller, x, y, **kwargs):
    kwargs.setdefault("batch_size", len(y))
    return distiller.evaluate(x, y, return_dict=True, verbose=0, **kwargs)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kd(t, s, temperature=T):
    log_p = np_log_softmax(t / temperature)
    log_q = np_log_softmax(s / temperature)
    return temperature**2 * (np.exp(log_p) * (log_p - log_q)).sum(-1)


def np_sparse_ce(logits, y):
    return -np_log_softmax(logits)[np.arange(len(y)), y]


def np_gram_per_sample(t_feats, s_feats):
    diff = (np_gram(t_feats, "l2") - np_gram(s_feats, "l2")) ** 2
    return diff.mean(axis=(1, 2))


# -- 1. the label check fires only where the compiled loss has classes ------


def test_one_unit_binary_labels_are_not_flagged():
    x, _ = make_data(n=16)
    y = (np.arange(16) % 2).astype("int32")[:, None]
    bce = keras.losses.BinaryCrossentropy(from_logits=True)
    distiller = build(n_classes=1, loss=bce, gram_weight=0.0)
    history = distiller.fit(x, y, batch_size=16, epochs=2, verbose=0).history
    assert history["skipped_samples"] == [0.0, 0.0]
    logits = to_np(distiller.student(x))
    expected = np.mean(
        np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits)))
    )
    logs = evaluate(distiller, x, y)
    assert logs["task_loss"] == pytest.approx(expected, rel=1e-5)
    assert logs["skipped_samples"] == 0.0
    # Bool labels: accepted (plain Keras takes them), the same loss.
    bool_logs = evaluate(distiller, x, y.astype(bool))
    assert bool_logs["task_loss"] == pytest.approx(expected, rel=1e-5)
    assert bool_logs["skipped_samples"] == 0.0
    distiller.fit(x, y.astype(bool), batch_size=8, verbose=0)
    assert weights_finite(distiller.student)


def test_integer_regression_targets_with_mse_are_not_flagged():
    x, _ = make_data(n=12)
    y = np.arange(36).reshape(12, 3).astype("int32")  # up to 35, "classes" 3
    distiller = build(loss=keras.losses.MeanSquaredError())
    history = distiller.fit(x, y, batch_size=6, verbose=0).history
    assert history["skipped_samples"] == [0.0]
    logits = to_np(distiller.student(x))
    logs = evaluate(distiller, x, y)
    assert logs["task_loss"] == pytest.approx(np.mean((logits - y) ** 2), rel=1e-5)


def test_ignore_class_rows_keep_kd_and_gram_and_add_no_task_loss():
    x, y = make_data(n=16)
    unlabelled = y.copy()
    unlabelled[[1, 4, 9]] = -1
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)
    distiller = build(loss=loss, on_bad_sample="raise")
    logs = evaluate(distiller, x, unlabelled)
    full = evaluate(distiller, x, y)
    assert logs["skipped_samples"] == 0.0
    # KD and Gram still use the unlabelled rows: the same as with labels.
    assert logs["kd_loss"] == pytest.approx(full["kd_loss"], rel=1e-6)
    assert logs["gram_loss"] == pytest.approx(full["gram_loss"], rel=1e-6)
    # The task loss is Keras' own: the mean over labelled rows.
    logits = to_np(distiller.student(x))
    labelled = unlabelled >= 0
    expected = np_sparse_ce(logits[labelled], y[labelled]).mean()
    assert logs["task_loss"] == pytest.approx(expected, rel=1e-5)
    student = distiller.student
    student.compile(loss=loss)
    plain = student.evaluate(x, unlabelled, batch_size=16, verbose=0)
    assert logs["task_loss"] == pytest.approx(plain, rel=1e-6)
    history = distiller.fit(x, unlabelled, batch_size=8, verbose=0).history
    assert history["skipped_samples"] == [0.0]


@pytest.mark.parametrize(
    "label",
    [1.5, *(pytest.param(v, marks=pytest.mark.slow) for v in (12.0, -1.0, np.nan))],
)
def test_float_class_labels_must_be_integral_and_in_range(label):
    x, y = make_data(n=16)
    y = y.astype("float32")
    y[[2, 7]] = label
    with pytest.raises(ValueError, match=r"2 training sample\(s\).*\[0, classes\)"):
        build().fit(x, y, batch_size=16, verbose=0)
    skipping = build(on_bad_sample="skip")
    history = skipping.fit(x, y, batch_size=16, verbose=0).history
    assert history["skipped_samples"] == [2.0]
    assert history["task_loss"][0] > 0.0
    assert weights_finite(skipping.student)


def test_integral_float_class_labels_train():
    x, y = make_data(n=16)
    distiller = build()
    history = distiller.fit(x, y.astype("float32"), batch_size=8, verbose=0).history
    assert history["skipped_samples"] == [0.0]


# -- 2. no route to a NaN in the weights ------------------------------------


@pytest.mark.parametrize(
    "value", [np.nan, pytest.param(np.inf, marks=pytest.mark.slow)]
)
def test_non_finite_sample_weight_is_skipped_and_counted(value):
    x, y = make_data(n=16)
    weights = np.ones(16, "float32")
    weights[[3, 11]] = value
    with pytest.raises(ValueError, match=r"2 training sample\(s\).*sample or class"):
        build().fit(x, y, sample_weight=weights, batch_size=16, verbose=0)
    distiller = build(on_bad_sample="skip")
    history = distiller.fit(
        x, y, sample_weight=weights, batch_size=8, epochs=2, verbose=0
    ).history
    assert history["skipped_samples"] == [2.0, 2.0]
    assert np.all(np.isfinite(history["loss"]))
    assert weights_finite(distiller.student)


def test_nan_class_weight_is_skipped_and_counted():
    x, y = make_data(n=16)
    distiller = build(on_bad_sample="skip")
    history = distiller.fit(
        x, y, class_weight={0: np.nan, 1: 1.0, 2: 1.0}, batch_size=8, verbose=0
    ).history
    assert history["skipped_samples"] == [float(np.sum(y == 0))]
    assert np.isfinite(history["loss"][0])
    assert weights_finite(distiller.student)
    with pytest.raises(ValueError, match=r"training sample\(s\)"):
        build().fit(x, y, class_weight={0: np.nan, 1: 1.0, 2: 1.0}, verbose=0)


def overflowing_net(prefix, width):
    """make_net, but modality a's encoder is linear with a kernel of ones: an
    input of 3e38 overflows to inf there, and the logits of that row are NaN."""
    inputs = {m: keras.Input((WIDTHS[m],), name=m) for m in "abc"}
    embeds = [
        keras.layers.Dense(
            width,
            activation=None if m == "a" else "tanh",
            kernel_initializer="ones" if m == "a" else "glorot_uniform",
            name=f"{prefix}_{m}",
        )(inputs[m])
        for m in "abc"
    ]
    logits = keras.layers.Dense(3)(keras.layers.Concatenate()(embeds))
    return keras.Model(inputs, logits)


def overflowing(x, rows=(5,)):
    x = {k: v.copy() for k, v in x.items()}
    x["a"][list(rows)] = 3e38  # finite
    return x


@pytest.mark.slow  # fast tier: under 3 min per backend
def test_overflow_inside_the_teacher_is_skipped_and_counted():
    x, y = make_data(n=16)
    bad = overflowing(x)
    logits = to_np(overflowing_net("t", 16)(bad))
    assert np.isnan(logits[5]).all() and np.isfinite(np.delete(logits, 5, 0)).all()
    with pytest.raises(ValueError, match=r"1 training sample\(s\).*overflow"):
        build(teacher=overflowing_net("t", 16)).fit(bad, y, batch_size=16, verbose=0)
    distiller = build(teacher=overflowing_net("t", 16), on_bad_sample="skip")
    history = distiller.fit(bad, y, batch_size=8, epochs=2, verbose=0).history
    assert history["skipped_samples"] == [1.0, 1.0]
    assert np.all(np.isfinite(history["loss"]))
    assert weights_finite(distiller.student)
    # The row's KD and Gram are left out: the values over the 15 others.
    logs = evaluate(distiller, bad, y)
    t_logits, t_feats = net_outputs(distiller.teacher, "t", x)
    s_logits, s_feats = net_outputs(distiller.student, "s", bad)
    good = np.arange(16) != 5
    assert logs["kd_loss"] == pytest.approx(
        np_kd(t_logits, s_logits)[good].sum() / 16, rel=1e-4
    )


def test_overflow_inside_the_student_is_counted_and_stops_fit():
    # Counted and reported, but the step's gradient is NaN already (inf·0 in
    # the backward pass of the student's own layers; docs/guide/bad-input.md).
    # keras.optimizers.LossScaleOptimizer skips such steps: the documented fix.
    x, y = make_data(n=16)
    bad = overflowing(x)
    distiller = build(student=overflowing_net("s", 4))
    with pytest.raises(ValueError, match=r"1 training sample\(s\).*overflow"):
        distiller.fit(bad, y, batch_size=16, verbose=0)
    distiller = Distiller(
        make_net("t", 16),
        overflowing_net("s", 4),
        modality_map("t"),
        modality_map("s"),
        on_bad_sample="skip",
    )
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam())
    distiller.compile(optimizer=optimizer, loss=sparse_ce())
    history = distiller.fit(bad, y, batch_size=8, epochs=2, verbose=0).history
    assert history["skipped_samples"] == [1.0, 1.0]
    assert np.all(np.isfinite(history["loss"]))
    assert weights_finite(distiller.student)
    logs = evaluate(distiller, bad, y)
    assert logs["skipped_samples"] == 1.0
    assert all(np.isfinite(v) for v in logs.values())


def test_a_batch_of_only_bad_rows_gives_loss_zero_and_finite_weights():
    x, y = make_data(n=8)
    distiller = build(on_bad_sample="skip")
    before = [to_np(w).copy() for w in distiller.student.trainable_weights]
    weights = np.full(8, np.nan, "float32")
    history = distiller.fit(x, y, sample_weight=weights, batch_size=8, verbose=0)
    assert history.history["loss"] == [0.0]
    assert history.history["skipped_samples"] == [8.0]
    after = [to_np(w) for w in distiller.student.trainable_weights]
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old, new)


# -- 3. one reduction for every term: sum(w·loss) / batch --------------------


def test_every_term_is_sum_of_weighted_losses_over_the_batch():
    x, y = make_data(n=12)
    distiller = build()
    w = np.linspace(0.0, 2.0, 12).astype("float32")
    logs = evaluate(distiller, x, y, sample_weight=w)
    t_logits, t_feats = net_outputs(distiller.teacher, "t", x)
    s_logits, s_feats = net_outputs(distiller.student, "s", x)
    n = len(y)
    expected = {
        "task_loss": (w * np_sparse_ce(s_logits, y)).sum() / n,
        "kd_loss": (w * np_kd(t_logits, s_logits)).sum() / n,
        "gram_loss": (w * np_gram_per_sample(t_feats, s_feats)).sum() / n,
    }
    for key, value in expected.items():
        assert logs[key] == pytest.approx(value, rel=1e-4), key


def test_skipped_rows_count_in_the_batch_and_leave_the_metrics():
    x, y = make_data(n=12)
    bad = {k: v.copy() for k, v in x.items()}
    bad["b"][[0, 5]] = np.nan
    distiller = build(m=["accuracy"])
    logs = evaluate(distiller, bad, y)
    assert logs["skipped_samples"] == 2.0
    good = np.ones(12, bool)
    good[[0, 5]] = False
    t_logits, t_feats = net_outputs(distiller.teacher, "t", x)
    s_logits, s_feats = net_outputs(distiller.student, "s", x)
    n = len(y)
    assert logs["task_loss"] == pytest.approx(
        np_sparse_ce(s_logits, y)[good].sum() / n, rel=1e-4
    )
    assert logs["kd_loss"] == pytest.approx(
        np_kd(t_logits, s_logits)[good].sum() / n, rel=1e-4
    )
    assert logs["gram_loss"] == pytest.approx(
        np_gram_per_sample(t_feats, s_feats)[good].sum() / n, rel=1e-4
    )
    accuracy = np.mean(s_logits[good].argmax(-1) == y[good])
    assert accuracy != pytest.approx(np.mean(s_logits.argmax(-1) == y))
    assert logs["accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_fit_metrics_leave_skipped_rows_out():
    # Learning rate 0: the metric of the one step is that of the initial model.
    x, y = make_data(n=12)
    bad = {k: v.copy() for k, v in x.items()}
    bad["b"][[0, 5]] = np.nan
    good = np.ones(12, bool)
    good[[0, 5]] = False
    distiller = build(on_bad_sample="skip")
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.0), loss=sparse_ce(), metrics=["accuracy"]
    )
    s_logits, _ = net_outputs(distiller.student, "s", x)
    history = distiller.fit(bad, y, batch_size=12, verbose=0).history
    assert history["skipped_samples"] == [2.0]
    accuracy = np.mean(s_logits[good].argmax(-1) == y[good])
    assert history["accuracy"][0] == pytest.approx(accuracy, abs=1e-6)


@pytest.mark.parametrize(
    "batch_size", [32, *(pytest.param(b, marks=pytest.mark.slow) for b in (7, 50))]
)
def test_task_loss_equals_student_evaluate_at_any_batch_size(batch_size):
    x, y = make_data(n=50)
    distiller = build()
    distiller.fit(x, y, batch_size=16, verbose=0)
    logs = evaluate(distiller, x, y, batch_size=batch_size)
    student = distiller.student
    student.compile(loss=sparse_ce())
    plain = student.evaluate(x, y, batch_size=batch_size, verbose=0)
    assert abs(logs["task_loss"] - plain) <= 1e-6
    s_logits, _ = net_outputs(student, "s", x)
    assert logs["task_loss"] == pytest.approx(np_sparse_ce(s_logits, y).mean(), 1e-5)


# -- 4. keys nobody reads ----------------------------------------------------


def test_nan_in_a_key_no_network_reads_does_not_stop_fit():
    x, y = make_data(n=16)
    x["notes"] = np.full((16, 2), np.nan, "float32")
    distiller = build()
    history = distiller.fit(x, y, batch_size=8, verbose=0).history
    assert history["skipped_samples"] == [0.0]
    assert weights_finite(distiller.student)


def test_nan_in_a_key_only_the_teacher_reads_is_counted():
    x, y = make_data(n=16)
    x["c"][4] = np.nan
    distiller = Distiller(
        make_net("t", 16),
        make_net("s", 4, modalities=("a", "b")),
        modality_map("t", ("a", "b")),
        modality_map("s", ("a", "b")),
        on_bad_sample="skip",
    )
    distiller.compile(optimizer="adam", loss=sparse_ce())
    history = distiller.fit(x, y, batch_size=16, verbose=0).history
    assert history["skipped_samples"] == [1.0]
    assert weights_finite(distiller.student)


# -- 5. modality_mask values --------------------------------------------------


def test_modality_mask_values_other_than_0_and_1_raise():
    x, y = make_data(n=8)
    mask = np.ones((8, 3), "float32")
    mask[2, 1] = 0.5
    distiller = build()
    message = (
        r"'modality_mask' holds 1 value\(s\) other than 0 and 1 \(the first: "
        r".*0\.5.* in row 2, column 1\).*\(mask > 0\.5\)"
    )
    with pytest.raises(ValueError, match=message):
        distiller.fit({**x, "modality_mask": mask}, y, verbose=0)
    with pytest.raises(ValueError, match=message):
        distiller.evaluate({**x, "modality_mask": mask}, y, verbose=0)


def test_modality_mask_values_from_a_generator_stop_fit_after_the_step():
    x, y = make_data(n=8)
    mask = np.ones((8, 3), "float32")
    mask[[2, 6], 1] = 2.0

    def batches():
        while True:
            yield {**x, "modality_mask": mask}, y

    distiller = build()
    with pytest.raises(ValueError, match=r"2 training sample\(s\).*modality_mask"):
        distiller.fit(batches(), steps_per_epoch=1, verbose=0)
    assert weights_finite(distiller.student)
