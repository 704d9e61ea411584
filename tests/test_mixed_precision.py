"""Mixed precision: float32 losses, loss scaling, accuracy close to float32.

Runs on every backend, on CPU, under `mixed_float16` and `mixed_bfloat16`.
The full measurement (all backends, both policies, 10 epochs, 2 seeds) is in
docs/guide/precision-resume-devices.md; the digits test here is its short version.
"""

import keras
import numpy as np
import pytest
from helpers import make_data, make_net, modality_map, sparse_ce

from keras_gramkd import Distiller, LogitKD, ModalityGram
from keras_gramkd.datasets import load_mfeat

pytestmark = pytest.mark.slow  # trains teachers and students on the digits

POLICIES = ("mixed_float16", "mixed_bfloat16")
COMPUTE = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


@pytest.fixture(params=POLICIES)
def policy(request):
    """Sets the global dtype policy for one test, then restores the old one."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy(previous)


def _numpy(x):
    return keras.ops.convert_to_numpy(x)


def _dtype(x):
    return keras.backend.standardize_dtype(x.dtype)


def _distiller(optimizer="adam"):
    distiller = Distiller(
        make_net("t", 8), make_net("s", 4), modality_map("t"), modality_map("s")
    )
    distiller.compile(optimizer=optimizer, loss=sparse_ce())
    return distiller


def test_float32_losses_and_loss_scaling(policy):
    """Half-precision networks, float32 losses and metrics, a finite update.

    mixed_float16 wraps the optimizer in a LossScaleOptimizer; bfloat16 not.
    """
    distiller = _distiller(keras.optimizers.SGD(0.1))
    scaled = isinstance(distiller.optimizer, keras.optimizers.LossScaleOptimizer)
    assert scaled == (policy == "mixed_float16")
    x, y = make_data(32)
    assert distiller.teacher.layers[-1].compute_dtype == COMPUTE[policy]
    assert distiller.student.layers[-1].variable_dtype == "float32"
    y_pred = distiller(x, training=True)
    assert _dtype(y_pred) == COMPUTE[policy]
    assert _dtype(distiller.teacher(x)) == COMPUTE[policy]
    total = distiller.compute_loss(x, y, y_pred, training=True)
    assert _dtype(total) == "float32"
    assert np.isfinite(_numpy(total))

    before = [_numpy(w) for w in distiller.student.weights]
    logs = distiller.train_on_batch(x, y, return_dict=True)
    for name in ("loss", "task_loss", "kd_loss", "gram_loss"):
        assert np.isfinite(logs[name]), name
    for name, value in distiller.get_metrics_result().items():
        assert _dtype(value) == "float32", name
    after = [_numpy(w) for w in distiller.student.weights]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(np.isfinite(w).all() for w in after)


@pytest.mark.parametrize("compute", ["float16", "bfloat16"])
def test_kd_loss_is_computed_in_float32(compute):
    """LogitKD on half-precision logits matches a float64 reference to 1e-5.

    A half-precision log-softmax misses it by about 2e-4 (float16) or 8e-4
    (bfloat16) on these logits.
    """
    rng = np.random.default_rng(0)
    t = keras.ops.convert_to_tensor(rng.normal(size=(64, 10)) * 4, dtype=compute)
    s = keras.ops.convert_to_tensor(rng.normal(size=(64, 10)) * 4, dtype=compute)
    value = LogitKD(temperature=4.0)(t, s)
    assert _dtype(value) == "float32"

    def log_softmax(z):
        z = _numpy(keras.ops.cast(z, "float32")).astype("float64") / 4.0
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lt, ls = log_softmax(t), log_softmax(s)
    expected = 16.0 * np.mean(np.sum(np.exp(lt) * (lt - ls), axis=-1))
    np.testing.assert_allclose(_numpy(value), expected, rtol=1e-5)


@pytest.mark.parametrize("compute", ["float16", "bfloat16"])
@pytest.mark.parametrize("normalize", ["l2", "none", "dim", "centered"])
def test_gram_loss_is_computed_in_float32(compute, normalize):
    """Embeddings of norm ~1e3: their raw Gram entries overflow float16."""
    rng = np.random.default_rng(1)
    t = keras.ops.convert_to_tensor(rng.normal(size=(4, 3, 16)) * 300, dtype=compute)
    s = keras.ops.convert_to_tensor(rng.normal(size=(4, 3, 8)) * 300, dtype=compute)
    loss = ModalityGram(normalize=normalize)
    value = loss(t, s)
    assert _dtype(value) == "float32"
    expected = loss(keras.ops.cast(t, "float32"), keras.ops.cast(s, "float32"))
    assert np.isfinite(_numpy(value))
    np.testing.assert_allclose(_numpy(value), _numpy(expected), rtol=1e-6)


def test_overflowing_step_is_skipped_not_nan():
    """An overflowing float16 gradient: the step is skipped, the scale halved."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.1), initial_scale=2.0**60
        )
        distiller = _distiller(optimizer)
        x, y = make_data(16)
        before = [_numpy(w) for w in distiller.student.weights]
        distiller.train_on_batch(x, y)
        for a, w in zip(before, distiller.student.weights, strict=True):
            np.testing.assert_array_equal(_numpy(w), a)
        assert float(_numpy(optimizer.dynamic_scale)) == 2.0**59
        assert int(_numpy(optimizer.iterations)) == 0
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_float32_teacher_with_mixed_student(policy):
    """A teacher built and trained in float32 teaches a student built under a policy."""
    keras.mixed_precision.set_global_policy("float32")
    teacher = make_net("t", 8)
    keras.mixed_precision.set_global_policy(policy)
    distiller = Distiller(
        teacher, make_net("s", 4), modality_map("t"), modality_map("s")
    )
    distiller.compile(optimizer="adam", loss=sparse_ce())
    assert teacher.layers[-1].compute_dtype == "float32"
    assert distiller.student.layers[-1].compute_dtype == COMPUTE[policy]
    x, y = make_data(32)
    history = distiller.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert all(np.isfinite(v).all() for v in history.history.values())


# ---------------------------------------------------------------------------
# Digits: the same teacher weights and student training in float32 and mixed.

VIEWS = ("fou", "kar", "zer")
EPOCHS, BATCH = 8, 100


def _digits_net(prefix, data, width, embed):
    inputs = {v: keras.Input((data[v].shape[1],), name=v) for v in VIEWS}
    embeds = []
    for v in VIEWS:
        h = keras.layers.Dense(width, activation="relu", name=f"{prefix}_{v}_h")(
            inputs[v]
        )
        embeds.append(keras.layers.Dense(embed, name=f"{prefix}_{v}")(h))
    h = keras.layers.Concatenate()(embeds)
    return keras.Model(inputs, keras.layers.Dense(10, name=f"{prefix}_logits")(h))


def _accuracy(model, x, y):
    logits = _numpy(model(x, training=False))  # no predict: one compile less
    return 100.0 * float(np.mean(np.argmax(logits, axis=-1) == y))


@pytest.fixture(scope="module")
def digits():
    """The digits and a teacher trained on them in float32 (its weights)."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        train, test = load_mfeat(views=VIEWS)
        keras.utils.set_random_seed(0)
        teacher = _digits_net("t", train[0], 64, 16)
        teacher.compile(keras.optimizers.Adam(1e-3), sparse_ce())
        teacher.fit(*train, epochs=EPOCHS, batch_size=BATCH, verbose=0)
        weights = teacher.get_weights()
        reference = {"teacher": _accuracy(teacher, *test)}
        reference["student"] = _distil(train, test, weights)[1]
    finally:
        keras.mixed_precision.set_global_policy(previous)
    return train, test, weights, reference


def _distil(train, test, teacher_weights):
    """Teacher (given weights) and student under the current policy: accuracies."""
    teacher = _digits_net("t", train[0], 64, 16)
    teacher.set_weights(teacher_weights)
    keras.utils.set_random_seed(1)
    student = _digits_net("s", train[0], 8, 4)
    distiller = Distiller(
        teacher,
        student,
        {v: f"t_{v}" for v in VIEWS},
        {v: f"s_{v}" for v in VIEWS},
    )
    distiller.compile(keras.optimizers.Adam(1e-2), sparse_ce())
    keras.utils.set_random_seed(2)
    history = distiller.fit(*train, epochs=EPOCHS, batch_size=BATCH, verbose=0)
    assert all(np.isfinite(v).all() for v in history.history.values())
    return _accuracy(teacher, *test), _accuracy(student, *test)


def test_digits_accuracy_close_to_float32(digits, policy):
    """Teacher and distilled student within 1 point of float32 on the digits.

    Measured here: at most 0.2 points on every backend
    (docs/guide/precision-resume-devices.md).
    """
    train, test, weights, reference = digits
    teacher_acc, student_acc = _distil(train, test, weights)
    assert reference["teacher"] > 90 and reference["student"] > 85, reference
    assert abs(teacher_acc - reference["teacher"]) <= 1.0, (teacher_acc, reference)
    assert abs(student_acc - reference["student"]) <= 1.0, (student_acc, reference)
