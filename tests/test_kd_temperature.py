"""logit_kd against a 60-digit reference for temperatures from 1e-3 to 1e6.

The reference is the plain formula T²·Σ p·(log p − log q) in Python's `decimal`
(60 significant digits), so its own cancellation at large T costs nothing; the
T → ∞ limit is checked against its closed form in float64.
"""

import decimal

import keras
import numpy as np
import pytest
from helpers import to_np, value_and_grad

from keras_gramkd import ops as kd_ops

TEMPERATURES = [1e-3, 1e-2, 0.1, 1.0, 2.0, 4.0, 8.0, 30.0, 1e2, 1e3, 1e4, 1e5, 1e6]
SCALES = [0.1, 3.0, 100.0, 1e4]


def decimal_logit_kd(t, s, temperature, digits=60):
    """T²·KL(softmax(t/T) ‖ softmax(s/T)) per row, computed with `digits` digits."""
    with decimal.localcontext() as ctx:
        ctx.prec, ctx.Emax, ctx.Emin = digits, decimal.MAX_EMAX, decimal.MIN_EMIN
        temp = decimal.Decimal(float(temperature))

        def log_softmax(row):
            x = [decimal.Decimal(float(v)) / temp for v in row]
            top = max(x)
            log_z = sum((v - top).exp() for v in x).ln()
            return [v - top - log_z for v in x]

        out = []
        for t_row, s_row in zip(t, s, strict=True):
            log_p, log_q = log_softmax(t_row), log_softmax(s_row)
            kl = sum(lp.exp() * (lp - lq) for lp, lq in zip(log_p, log_q, strict=True))
            out.append(float(temp * temp * kl))
    return np.array(out)


def logits(scale, seed, shape=(12, 10)):
    rng = np.random.default_rng(seed)
    t = (scale * rng.normal(size=shape)).astype("float32")
    s = (scale * rng.normal(size=shape)).astype("float32")
    return t, s


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_matches_the_high_precision_reference(temperature, scale):
    t, s = logits(scale, seed=int(np.log10(temperature) + 10) * 7 + SCALES.index(scale))
    got = to_np(kd_ops.logit_kd(t, s, temperature)).astype(np.float64)
    expected = decimal_logit_kd(t, s, temperature)
    assert np.all(got >= 0)
    # 1e-30: reference values below float32's range are 0 in float32.
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-30)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
def test_ordinary_temperatures_keep_their_values(temperature):
    """At T = 1–8 the value is the plain float32 log-softmax formula's, to rounding."""
    t, s = logits(4.0, seed=1, shape=(32, 10))
    log_p = keras.ops.log_softmax(t / temperature, axis=-1)
    log_q = keras.ops.log_softmax(s / temperature, axis=-1)
    plain = temperature**2 * keras.ops.sum(
        keras.ops.exp(log_p) * (log_p - log_q), axis=-1
    )
    got = to_np(kd_ops.logit_kd(t, s, temperature))
    np.testing.assert_allclose(got, to_np(plain), rtol=1e-5)


@pytest.mark.parametrize("temperature", [1e6, 1e8])
def test_infinite_temperature_limit(temperature):
    """T²·KL → (1/(2C))·Σᵢ(δᵢ − mean δ)², δ = t − s, as T → ∞."""
    t, s = logits(3.0, seed=2)
    delta = t.astype(np.float64) - s
    limit = np.sum((delta - delta.mean(-1, keepdims=True)) ** 2, -1) / (2 * t.shape[1])
    got = to_np(kd_ops.logit_kd(t, s, temperature))
    np.testing.assert_allclose(got, limit, rtol=1e-3)


def test_never_negative_and_zero_for_equal_distributions():
    t, s = logits(5.0, seed=3)
    for temperature in TEMPERATURES:
        # Same logits, logits shifted by a constant: the distributions are equal.
        assert np.all(to_np(kd_ops.logit_kd(t, t, temperature)) == 0.0)
        np.testing.assert_allclose(
            to_np(kd_ops.logit_kd(t + 7.0, t, temperature)), 0.0, atol=1e-6
        )
        # One ulp apart: rounding must not make the value negative.
        nudged = np.nextafter(t, np.float32(np.inf))
        assert np.all(to_np(kd_ops.logit_kd(t, nudged, temperature)) >= 0.0)
        if temperature >= 1.0:  # Below, agreeing argmaxes underflow to 0.
            assert np.all(to_np(kd_ops.logit_kd(t, s, temperature)) > 0.0)


@pytest.mark.parametrize("scale", [3.0, 1e4])
@pytest.mark.parametrize("temperature", [1e-3, 1.0, 4.0, 1e3, 1e6])
def test_gradient_is_finite_and_matches_t_times_q_minus_p(temperature, scale):
    """d(T²·KL)/ds = T·(softmax(s/T) − softmax(t/T)), checked in float64."""
    t, s = logits(scale, seed=4, shape=(6, 10))

    def loss(student):
        return keras.ops.sum(kd_ops.logit_kd(t, student, temperature))

    _, grad = value_and_grad(loss, s)
    assert np.all(np.isfinite(grad))

    def softmax(x):
        x = x.astype(np.float64) / temperature
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    expected = temperature * (softmax(s) - softmax(t))
    atol = 1e-4 * np.max(np.abs(expected))
    np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=atol)


def np_binary_kd(t, s, temperature):
    """T²·KL(Bernoulli(σ(t/T)) ‖ Bernoulli(σ(s/T))) per row, in float64."""
    t, s = np.float64(t[:, 0]) / temperature, np.float64(s[:, 0]) / temperature
    log_p, log_1mp = -np.logaddexp(0, -t), -np.logaddexp(0, t)
    log_q, log_1mq = -np.logaddexp(0, -s), -np.logaddexp(0, s)
    kl = np.exp(log_p) * (log_p - log_q) + np.exp(log_1mp) * (log_1mp - log_1mq)
    return temperature**2 * kl


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 30.0])
def test_one_unit_logits_use_the_binary_kl(temperature):
    rng = np.random.default_rng(7)
    t = rng.normal(scale=3.0, size=(32, 1)).astype("float32")
    s = rng.normal(scale=3.0, size=(32, 1)).astype("float32")
    got = to_np(kd_ops.logit_kd(t, s, temperature))
    expected = np_binary_kd(t, s, temperature)
    assert expected.min() > 0  # softmax over one unit would give exactly 0
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(to_np(kd_ops.logit_kd(t, t, temperature)), 0.0)


def test_kd_alone_trains_a_one_unit_student_toward_its_teacher():
    from helpers import make_data, make_net, modality_map

    from keras_gramkd import Distiller

    x, _ = make_data(n=32)
    y = (np.arange(32) % 2).astype("float32")[:, None]
    distiller = Distiller(
        make_net("t", 16, n_classes=1),
        make_net("s", 4, n_classes=1),
        modality_map("t"),
        modality_map("s"),
        gram_weight=0.0,
        temperature=2.0,
        task_weight=0.0,  # only KD moves the student
    )
    distiller.compile(
        keras.optimizers.Adam(0.02), keras.losses.BinaryCrossentropy(from_logits=True)
    )
    before = [to_np(w) for w in distiller.student.trainable_weights]
    logs = distiller.evaluate(x, y, batch_size=32, return_dict=True, verbose=0)
    teacher, student = to_np(distiller.teacher(x)), to_np(distiller.student(x))
    assert logs["kd_loss"] == pytest.approx(
        np_binary_kd(teacher, student, 2.0).mean(), rel=1e-4
    )
    history = distiller.fit(x, y, batch_size=32, epochs=20, verbose=0).history
    after = [to_np(w) for w in distiller.student.trainable_weights]
    assert any(not np.array_equal(a, b) for a, b in zip(after, before, strict=True))
    assert history["kd_loss"][-1] < 0.5 * history["kd_loss"][0]


@pytest.mark.parametrize("scale", [3.0, 1e4])
@pytest.mark.parametrize("temperature", [1.0, 4.0, 100.0, 1e6])
def test_teacher_close_to_the_student_keeps_the_relative_error(temperature, scale):
    """t = s + a tiny difference: the KL is far below the rounding of the
    log-probabilities, and the student's top class may not be where δ peaks.
    (Below T = 1, float32 rounding of logits/T alone exceeds these bounds.)"""
    rng = np.random.default_rng(8)
    s = (scale * rng.normal(size=(16, 10))).astype("float32")
    for tiny in (1e-3, 1e-5):
        t = (s + tiny * scale * rng.normal(size=s.shape)).astype("float32")
        got = to_np(kd_ops.logit_kd(t, s, temperature)).astype(np.float64)
        np.testing.assert_allclose(
            got, decimal_logit_kd(t, s, temperature), rtol=3e-5, atol=1e-30
        )


def test_a_rare_class_with_the_largest_difference_keeps_the_relative_error():
    """δ peaks at a class of tiny q while the others agree to 1e-3: the
    distributions are close although E_q[exp((δ − max δ)/T)] is below 1/2."""
    rng = np.random.default_rng(9)
    for temperature in (1.0, 4.0):
        s = np.zeros((16, 10), "float32")
        s[:, 0] = -20 * temperature
        t = s.copy()
        t[:, 1:] += temperature * (-0.7 + 1e-3 * rng.normal(size=(16, 9)))
        got = to_np(kd_ops.logit_kd(t, s, temperature)).astype(np.float64)
        np.testing.assert_allclose(got, decimal_logit_kd(t, s, temperature), rtol=1e-5)


def test_series_boundary_keeps_the_relative_error():
    """Two classes whose u = log p − log q sweeps across ±1/2, where each term
    changes from its series to its closed form."""
    a = np.concatenate([np.linspace(1.50, 1.60, 64), -np.linspace(0.8, 1.3, 64)])
    t = np.stack([np.zeros_like(a), a], 1).astype("float32")
    s = np.zeros_like(t)
    got = to_np(kd_ops.logit_kd(t, s, 1.0)).astype(np.float64)
    np.testing.assert_allclose(got, decimal_logit_kd(t, s, 1.0), rtol=1e-5)


@pytest.mark.parametrize("temperature", [1e-3, 1.0, 4.0, 1e6])
def test_teacher_gradient_is_t_times_p_times_u_minus_kl(temperature):
    """d(T²·KL)/dt = T·p·(log p − log q − KL), checked in float64."""
    t, s = logits(3.0, seed=10, shape=(6, 10))

    _, grad = value_and_grad(
        lambda teacher: keras.ops.sum(kd_ops.logit_kd(teacher, s, temperature)), t
    )

    def log_softmax(x):
        x = x.astype(np.float64) / temperature
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    log_p, log_q = log_softmax(t), log_softmax(s)
    u = log_p - log_q
    kl = np.sum(np.exp(log_p) * u, -1, keepdims=True)
    expected = temperature * np.exp(log_p) * (u - kl)
    assert np.all(np.isfinite(grad))
    atol = 1e-4 * np.max(np.abs(expected))
    np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=atol)


@pytest.mark.parametrize("temperature", [1.0, 1e6])
def test_gradient_of_close_logits_is_accurate(temperature):
    """t = s + 1e-3: q − p is far below the rounding of p and q, yet the
    gradient T·(q − p) keeps its relative accuracy."""
    rng = np.random.default_rng(11)
    s = (3.0 * rng.normal(size=(6, 10))).astype("float32")
    t = (s + 1e-3 * rng.normal(size=s.shape)).astype("float32")

    _, grad = value_and_grad(
        lambda student: keras.ops.sum(kd_ops.logit_kd(t, student, temperature)), s
    )
    with decimal.localcontext() as ctx:
        ctx.prec = 40
        expected = np.zeros(s.shape)
        for row in range(s.shape[0]):

            def softmax(x):
                e = [
                    (decimal.Decimal(float(v)) / decimal.Decimal(temperature)).exp()
                    for v in x
                ]
                return [v / sum(e) for v in e]

            q, p = softmax(s[row]), softmax(t[row])
            expected[row] = [
                float(decimal.Decimal(temperature) * (a - b))
                for a, b in zip(q, p, strict=True)
            ]
    np.testing.assert_allclose(
        grad, expected, rtol=1e-3, atol=1e-3 * np.max(np.abs(expected))
    )
