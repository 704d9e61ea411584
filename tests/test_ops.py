"""keras_gramkd.ops against independent NumPy references."""

import keras
import numpy as np
import pytest
from helpers import np_gram, np_logit_kd, to_np

from keras_gramkd import ops as kd_ops

SHAPES = [(1, 1, 1), (3, 2, 5), (4, 6, 8), (2, 9, 3)]


@pytest.mark.parametrize("normalize", kd_ops.GRAM_NORMALIZATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_gram_matrix_matches_numpy(normalize, shape):
    rng = np.random.default_rng(sum(shape))
    a = rng.normal(scale=3.0, size=shape).astype("float32")
    got = to_np(kd_ops.gram_matrix(a, normalize))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np_gram(a, normalize), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize", kd_ops.GRAM_NORMALIZATIONS)
def test_gram_matrix_with_mask_matches_numpy(normalize):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 4, 7)).astype("float32")
    mask = np.array(
        [[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1], [1, 1, 0, 1]],
        "float32",
    )
    got = to_np(kd_ops.gram_matrix(a, normalize, mask=mask))
    np.testing.assert_allclose(got, np_gram(a, normalize, mask), rtol=1e-5, atol=1e-5)
    missing = mask == 0
    assert np.all(got[missing[:, :, None].repeat(4, 2)] == 0)  # rows of missing
    assert np.all(got.transpose(0, 2, 1)[missing[:, :, None].repeat(4, 2)] == 0)


@pytest.mark.parametrize("normalize", ["l2", "centered"])
def test_zero_vector_gives_zero_row_not_nan(normalize):
    a = np.zeros((2, 3, 4), "float32")
    a[0, 0] = [1.0, 2.0, 0.0, 0.0]
    got = to_np(kd_ops.gram_matrix(a, normalize))
    assert np.all(np.isfinite(got))
    if normalize == "l2":
        np.testing.assert_allclose(got[0], np.diag([1.0, 0.0, 0.0]), atol=1e-6)
        assert np.all(got[1] == 0)


def test_l2_normalize_rows_unit_norm_and_zero_safe():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]], "float32")
    got = to_np(kd_ops.l2_normalize_rows(x))
    np.testing.assert_allclose(got, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], atol=1e-6)


def test_l2_gram_of_huge_rows_does_not_overflow_to_zero():
    huge = np.array([[[3e19, 0.0], [3e19, 3e19]], [[3e36, 1e36], [-3e36, 0.0]]])
    got = to_np(kd_ops.gram_matrix(huge.astype("float32"), "l2"))
    np.testing.assert_allclose(got, np_gram(huge / 1e19, "l2"), rtol=1e-6)


@pytest.mark.parametrize("normalize", ["l2", "centered"])
def test_cosine_gram_loss_gradient_matches_finite_differences(normalize):
    """The gradient through the diagonal normalisation and the stop-gradient
    row scale (rows of entries above 1 are scaled) against central differences
    of the float64 NumPy reference, zero and tiny rows included."""
    from helpers import value_and_grad

    rng = np.random.default_rng(3)
    teacher = rng.normal(size=(2, 4, 3))
    student = rng.normal(size=(2, 4, 5)) * np.array([1.0, 40.0, 0.3, 1.0])[:, None]
    student[1, 3] = 0.0
    student[0, 2] *= 1e-3

    def np_loss(s):
        return np.mean((np_gram(teacher, normalize) - np_gram(s, normalize)) ** 2)

    expected = np.zeros_like(student)
    for index in np.ndindex(student.shape):
        step = np.zeros_like(student)
        step[index] = 1e-6 * max(1.0, abs(student[index]))
        expected[index] = (np_loss(student + step) - np_loss(student - step)) / (
            2 * step[index]
        )
    value, grad = value_and_grad(
        lambda s: kd_ops.gram_loss(teacher.astype("float32"), s, normalize),
        student.astype("float32"),
    )
    assert value == pytest.approx(np_loss(student), rel=1e-5)
    # At the zero row the epsilon floor makes the normalisation x / 1e-6, a
    # steep but finite slope that differences across the floor cannot see.
    assert np.all(np.isfinite(grad[1, 3]))
    grad[1, 3] = expected[1, 3] = 0.0
    np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-6)


def test_gram_matrix_errors():
    with pytest.raises(ValueError, match="Unknown Gram normalisation 'cosine'"):
        kd_ops.gram_matrix(np.ones((1, 2, 3), "float32"), "cosine")
    with pytest.raises(ValueError, match=r"\(batch, M, d\).*ModalityStack"):
        kd_ops.gram_matrix(np.ones((2, 3), "float32"))


def test_masked_mean():
    v = np.arange(6, dtype="float32").reshape(2, 3)
    w = np.array([[1, 0, 1], [0, 0, 1]], "float32")
    assert float(to_np(kd_ops.masked_mean(v, w))) == pytest.approx((0 + 2 + 5) / 3)
    assert float(to_np(kd_ops.masked_mean(v))) == pytest.approx(2.5)
    assert float(to_np(kd_ops.masked_mean(v, np.zeros_like(w)))) == 0.0


@pytest.mark.parametrize("normalize", kd_ops.GRAM_NORMALIZATIONS)
def test_gram_loss_matches_numpy_with_different_widths(normalize):
    rng = np.random.default_rng(2)
    t = rng.normal(size=(6, 4, 16)).astype("float32")
    s = rng.normal(size=(6, 4, 3)).astype("float32")
    expected = np.mean((np_gram(t, normalize) - np_gram(s, normalize)) ** 2)
    got = float(to_np(kd_ops.gram_loss(t, s, normalize)))
    assert got == pytest.approx(expected, rel=1e-5)


def test_gram_loss_mask_and_sample_weight_match_numpy():
    rng = np.random.default_rng(3)
    t = rng.normal(size=(4, 3, 5)).astype("float32")
    s = rng.normal(size=(4, 3, 2)).astype("float32")
    mask = np.array([[1, 1, 1], [1, 0, 1], [0, 0, 0], [1, 1, 0]], "float32")
    sw = np.array([1.0, 2.0, 5.0, 0.5], "float32")
    sq = (np_gram(t, "l2", mask) - np_gram(s, "l2", mask)) ** 2
    pairs = mask[:, :, None] * mask[:, None, :]
    # Keras' convention: sample weights multiply, the mask alone sets the count
    # (was (sq * weights).sum() / weights.sum(), a weighted mean, which
    # disagreed with the task and KD losses' sum(w·l) / batch).
    expected = (sq * pairs * sw[:, None, None]).sum() / pairs.sum()
    got = float(to_np(kd_ops.gram_loss(t, s, mask=mask, sample_weight=sw)))
    assert got == pytest.approx(expected, rel=1e-5)
    # Masked modalities never influence the loss: change them arbitrarily.
    t2, s2 = t.copy(), s.copy()
    t2[1, 1] = 1e3
    s2[2] = -7.0
    got2 = float(to_np(kd_ops.gram_loss(t2, s2, mask=mask, sample_weight=sw)))
    assert got2 == pytest.approx(got, rel=1e-6)
    # Nothing present anywhere: zero, not NaN.
    none = float(to_np(kd_ops.gram_loss(t, s, mask=np.zeros_like(mask))))
    assert none == 0.0


def test_gram_loss_modality_count_mismatch():
    with pytest.raises(ValueError, match="3 modalities but student features have 2"):
        kd_ops.gram_loss(np.ones((1, 3, 4), "float32"), np.ones((1, 2, 4), "float32"))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
def test_logit_kd_matches_numpy(temperature):
    rng = np.random.default_rng(4)
    t = rng.normal(scale=4, size=(16, 10)).astype("float32")
    s = rng.normal(scale=4, size=(16, 10)).astype("float32")
    got = to_np(kd_ops.logit_kd(t, s, temperature))
    np.testing.assert_allclose(
        got, np_logit_kd(t, s, temperature), rtol=1e-4, atol=1e-6
    )
    assert to_np(kd_ops.logit_kd(t, t, temperature)) == pytest.approx(0.0, abs=1e-5)


def test_logit_kd_extreme_logits_finite():
    rng = np.random.default_rng(5)
    t = (rng.choice([-1.0, 1.0], size=(8, 10)) * 1e4).astype("float32")
    s = (rng.choice([-1.0, 1.0], size=(8, 10)) * 1e4).astype("float32")
    got = to_np(kd_ops.logit_kd(t, s, 1.0))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, np_logit_kd(t, s, 1.0), rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_logit_kd_low_precision_inputs_compute_in_float32(dtype):
    rng = np.random.default_rng(6)
    t = rng.normal(scale=3, size=(8, 10)).astype("float32")
    s = rng.normal(scale=3, size=(8, 10)).astype("float32")
    t_low = keras.ops.cast(t, dtype)
    s_low = keras.ops.cast(s, dtype)
    got = kd_ops.logit_kd(t_low, s_low, 4.0)
    assert keras.backend.standardize_dtype(got.dtype) == "float32"
    reference = np_logit_kd(
        to_np(keras.ops.cast(t_low, "float32")),
        to_np(keras.ops.cast(s_low, "float32")),
        4.0,
    )
    np.testing.assert_allclose(to_np(got), reference, rtol=1e-4, atol=1e-5)


def test_logit_kd_bfloat16_extreme_logits_finite():
    rng = np.random.default_rng(6)
    t = keras.ops.cast(rng.normal(size=(8, 10)) * 1e4, "bfloat16")
    s = keras.ops.cast(rng.normal(size=(8, 10)) * 1e4, "bfloat16")
    assert np.all(np.isfinite(to_np(kd_ops.logit_kd(t, s, 4.0))))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gram_matrix_low_precision_inputs_compute_in_float32(dtype):
    rng = np.random.default_rng(7)
    a = rng.normal(size=(3, 4, 8)).astype("float32")
    got = kd_ops.gram_matrix(keras.ops.cast(a, dtype), "none")
    assert keras.backend.standardize_dtype(got.dtype) == "float32"
    a_low = to_np(keras.ops.cast(keras.ops.cast(a, dtype), "float32"))
    np.testing.assert_allclose(to_np(got), np_gram(a_low, "none"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("entries", ["all", "diagonal", "off_diagonal"])
@pytest.mark.parametrize("target", ["sample", "batch_mean"])
def test_gram_loss_entries_and_target_match_numpy(entries, target):
    rng = np.random.default_rng(10)
    t = rng.normal(size=(5, 4, 6)).astype("float32")
    s = rng.normal(size=(5, 4, 3)).astype("float32")
    mask = np.ones((5, 4), "float32")
    mask[1, 2] = 0
    pairs = mask[:, :, None] * mask[:, None, :]
    g_t, g_s = np_gram(t, "none", mask), np_gram(s, "none", mask)
    if target == "batch_mean":
        g_t = pairs * (g_t.sum(0) / np.maximum(pairs.sum(0), 1))
    keep = {
        "all": np.ones((4, 4)),
        "diagonal": np.eye(4),
        "off_diagonal": 1 - np.eye(4),
    }
    weights = pairs * keep[entries]
    expected = (((g_t - g_s) ** 2) * weights).sum() / weights.sum()
    got = kd_ops.gram_loss(t, s, "none", mask=mask, entries=entries, target=target)
    assert float(to_np(got)) == pytest.approx(expected, rel=1e-5)


def test_gram_loss_rejects_unknown_entries_and_target():
    a = np.ones((1, 2, 3), "float32")
    with pytest.raises(ValueError, match="Unknown Gram entries 'upper'"):
        kd_ops.gram_loss(a, a, entries="upper")
    with pytest.raises(ValueError, match="Unknown Gram target 'mean'.*'batch_mean'"):
        kd_ops.gram_loss(a, a, target="mean")


def textbook_cosine_gram(x):
    """Rows normalised first (autograd through the normalisation), then multiplied."""
    rows = kd_ops.l2_normalize_rows(x)
    return keras.ops.matmul(rows, keras.ops.transpose(rows, (0, 2, 1)))


def test_cosine_gram_gradient_matches_the_textbook_form_for_any_upstream():
    """The closed-form gradient against autograd through the textbook form, with
    a non-symmetric upstream gradient, and rows that are zero, below the
    normalisation floor (1e-8), tiny, ordinary and huge (1e36, scaled)."""
    from helpers import value_and_grad

    rng = np.random.default_rng(12)
    x = rng.normal(size=(3, 5, 4)).astype("float32")
    x[0, 0], x[0, 1], x[0, 2] = 0.0, 1e-8 * x[0, 1], 1e-4 * x[0, 2]
    x[1, 3] *= np.float32(1e36)
    x[2, 4] *= np.float32(30.0)
    upstream = rng.normal(size=(3, 5, 5)).astype("float32")

    def loss(gram_fn):
        return lambda f: keras.ops.sum(keras.ops.multiply(gram_fn(f), upstream))

    value, grad = value_and_grad(loss(lambda f: kd_ops.gram_matrix(f, "l2")), x)
    expected_value, expected = value_and_grad(loss(textbook_cosine_gram), x)
    assert np.all(np.isfinite(grad))
    assert value == pytest.approx(expected_value, rel=1e-5)
    # Within each row's scale (rows' gradients differ by 1e42; the zero row has
    # the floor's 1e6 slope), as rounding within a row cancels.
    row_max = np.max(np.abs(expected), axis=-1, keepdims=True)
    assert np.all(np.abs(grad - expected) <= 1e-4 * np.abs(expected) + 1e-6 * row_max)


def test_gram_distance_sample_weight_without_mask_matches_numpy():
    rng = np.random.default_rng(13)
    g_t, g_s = rng.normal(size=(2, 4, 3, 3)).astype("float32")
    sw = np.array([0.5, 0.0, 2.0, 1.0], "float32")
    g_s[1] = np.nan  # a skipped sample adds exactly 0
    expected = np.nansum((g_t - g_s) ** 2 * sw[:, None, None]) / g_t.size
    got = float(to_np(kd_ops.gram_distance(g_t, g_s, sample_weight=sw)))
    assert got == pytest.approx(expected, rel=1e-6)
    plain = float(to_np(kd_ops.gram_distance(g_t[[0]], g_s[[0]])))
    assert plain == pytest.approx(np.mean((g_t[0] - g_s[0]) ** 2), rel=1e-6)


def test_gram_distance_of_an_empty_batch_is_zero():
    empty = np.zeros((0, 3, 3), "float32")
    assert float(to_np(kd_ops.gram_distance(empty, empty))) == 0.0
    weights = np.zeros((0,), "float32")
    assert (
        float(to_np(kd_ops.gram_distance(empty, empty, sample_weight=weights))) == 0.0
    )
    mask = np.zeros((0, 3), "float32")
    assert float(to_np(kd_ops.gram_distance(empty, empty, mask=mask))) == 0.0


@pytest.mark.parametrize("weight_shape", [(4,), (4, 1)])
def test_sum_over_batch_matches_numpy(weight_shape):
    values = np.arange(12, dtype="float32").reshape(4, 3)
    values[2, 1] = np.nan  # weight 0: adds exactly 0, still counts in the batch
    sw = np.array([1.0, 0.5, 0.0, 2.0], "float32")
    expected = (1.0 * 1 + 0.5 * 4 + 2.0 * 10) / 4
    got = kd_ops.sum_over_batch(values, sw.reshape(weight_shape))
    assert float(to_np(got)) == pytest.approx(expected, rel=1e-6)
    finite = values[[0, 1, 3]]
    assert float(to_np(kd_ops.sum_over_batch(finite))) == pytest.approx(
        finite.mean(), rel=1e-6
    )
