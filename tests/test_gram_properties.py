"""Property tests (hypothesis) of the Gram ops in `keras_gramkd.ops`.

Inputs are float32 arrays of finite values in [-1e3, 1e3] (zero rows included)
of shape (batch 1-4, M 1-8, d 1-16). A property that is exact in real numbers
holds in float32 only up to rounding, so values are compared with a bound
proportional to the magnitudes involved, and the cosine Grams ("l2",
"centered") only on rows whose direction float32 resolves (see `row_scale`).
"""

import keras
import numpy as np
import pytest
from helpers import value_and_grad
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from keras_gramkd import ops as kd_ops

NORMALIZATIONS = kd_ops.GRAM_NORMALIZATIONS
FINITE = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
# Masked-out features may be anything finite, up to float32's largest value.
ANY_FINITE = st.floats(width=32, allow_nan=False, allow_infinity=False)
# Sample weights: 0 or a sensible positive weight (1e-30 · 1e-30 underflows).
WEIGHT = st.just(0.0) | st.floats(2**-10, 10.0, width=32)
PROPERTY = settings(max_examples=25, deadline=None)
if keras.backend.backend() == "jax":
    # JAX compiles every op for every new input shape (about 1 s per shape for
    # a loss and its gradient), so under JAX the sizes come from short lists.
    BATCH = st.just(3)
    MODALITIES = st.sampled_from([1, 4])
    WIDTH = st.sampled_from([1, 6])
else:
    BATCH, MODALITIES, WIDTH = st.integers(1, 4), st.integers(1, 8), st.integers(1, 16)

# Relative bound on float32 error of a Gram entry: d·eps·|a_i|·|a_j| is at most
# 16 · 6e-8 ≈ 1e-6 for plain dot products; "centered" directions carry the
# rounding of the mean, amplified by up to 1 / CENTERED_RESOLVED.
TOL = {"none": 1e-5, "dim": 1e-5, "l2": 1e-5, "centered": 1e-4}
# A row is resolved under "l2" when its norm is well above the normalisation
# floor sqrt(NORM_EPSILON), and under "centered" when its distance to the mean
# is at least this fraction of the sample's largest value.
L2_RESOLVED = 10.0 * np.sqrt(kd_ops.NORM_EPSILON)
CENTERED_RESOLVED = 0.1


@st.composite
def features(draw, batch, m, elements=FINITE):
    """(batch, m, d) float32 features, d in 1-16, some rows set to zero."""
    d = draw(WIDTH)
    values = draw(arrays(np.float32, (batch, m, d), elements=elements))
    zero_rows = draw(arrays(np.bool_, (batch, m)))
    return np.where(zero_rows[..., None], np.float32(0.0), values)


@st.composite
def gram_inputs(draw, networks=1, masked=True):
    """`networks` feature arrays (widths may differ) and a mask or None."""
    batch, m = draw(BATCH), draw(MODALITIES)
    arrays_ = [draw(features(batch, m)) for _ in range(networks)]
    mask = draw(st.none() | arrays(np.bool_, (batch, m))) if masked else None
    return (*arrays_, mask)


@st.composite
def loss_options(draw, targets=kd_ops.GRAM_TARGETS):
    """Keyword arguments of `gram_loss` besides the features and the mask."""
    return {
        "normalize": draw(st.sampled_from(NORMALIZATIONS)),
        "entries": draw(st.sampled_from(kd_ops.GRAM_ENTRIES)),
        "target": draw(st.sampled_from(targets)),
    }


def sample_weights(batch):
    return st.none() | arrays(np.float32, (batch,), elements=WEIGHT)


def to_np(x):
    return keras.ops.convert_to_numpy(x)


def gram(a, normalize, mask=None):
    return to_np(kd_ops.gram_matrix(a, normalize, mask))


def loss(teacher, student, mask=None, sample_weight=None, **options):
    return float(
        to_np(
            kd_ops.gram_loss(
                teacher, student, mask=mask, sample_weight=sample_weight, **options
            )
        )
    )


def present(a, mask):
    return np.ones(a.shape[:2], bool) if mask is None else np.asarray(mask, bool)


def row_scale(a, normalize, mask=None):
    """Per-row magnitude of G's rows, and which rows float32 resolves.

    Returns (scale, resolved), both (batch, M): entry (i, j) of G is exact up
    to TOL[normalize] · scale_i · scale_j when rows i and j are resolved.
    Masked-out rows are resolved (G is exactly 0 there).
    """
    keep = present(a, mask)
    rows = np.where(keep[..., None], a.astype(np.float64), 0.0)
    if normalize in ("none", "dim"):
        scale = np.linalg.norm(rows, axis=-1)
        if normalize == "dim":
            scale = scale / np.sqrt(a.shape[-1])
        return scale, np.ones_like(keep)
    if normalize == "l2":
        resolved = np.linalg.norm(rows, axis=-1) >= L2_RESOLVED
    else:
        count = np.maximum(keep.sum(axis=1), 1)[:, None, None]
        centered = rows - rows.sum(axis=1, keepdims=True) / count
        largest = np.abs(rows).max(axis=(1, 2))[:, None]
        distance = np.linalg.norm(centered, axis=-1)
        resolved = (distance >= CENTERED_RESOLVED * largest) & (distance >= L2_RESOLVED)
    return keep.astype(np.float64), resolved | ~keep


def assert_gram_close(actual, expected, scale, resolved, normalize):
    """|actual - expected| <= TOL · scale_i · scale_j on pairs of resolved rows."""
    pairs = resolved[:, :, None] & resolved[:, None, :]
    bound = TOL[normalize] * (scale[:, :, None] * scale[:, None, :]) + 1e-30
    error = np.abs(actual.astype(np.float64) - expected)
    bad = pairs & (error > bound)
    assert not bad.any(), (
        f"{normalize!r}: {bad.sum()} entries off, e.g. {actual[bad][:3]} vs "
        f"{expected[bad][:3]} (bound {bound[bad][:3]})"
    )


# ----------------------------------------------------------------------------
# gram_matrix


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@PROPERTY
@given(inputs=gram_inputs())
def test_gram_is_symmetric(normalize, inputs):
    a, mask = inputs
    g = gram(a, normalize, mask)
    assert g.dtype == np.float32 and np.all(np.isfinite(g))
    scale, _ = row_scale(a, normalize, mask)
    if normalize in ("l2", "centered"):  # every row of F has norm <= 1
        scale = np.ones_like(scale)
    everywhere = np.ones(scale.shape, bool)
    assert_gram_close(g, np.swapaxes(g, 1, 2), scale, everywhere, normalize)


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@PROPERTY
@given(inputs=gram_inputs())
def test_gram_diagonal(normalize, inputs):
    """1 for resolved rows under "l2"/"centered", |a|² ("none"), |a|²/d ("dim")."""
    a, mask = inputs
    diagonal = np.diagonal(gram(a, normalize, mask), axis1=1, axis2=2)
    scale, resolved = row_scale(a, normalize, mask)
    np.testing.assert_allclose(
        diagonal[resolved], scale[resolved] ** 2, rtol=TOL[normalize], atol=1e-30
    )
    assert np.all(diagonal[~present(a, mask)] == 0.0)
    assert np.all(diagonal >= 0.0)
    if normalize in ("l2", "centered"):  # unresolved rows: norm below 1
        assert np.all(diagonal <= 1.0 + TOL[normalize])


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@PROPERTY
@given(inputs=gram_inputs(), data=st.data())
def test_gram_under_positive_scaling(normalize, inputs, data):
    """G(s·A) = G(A) for "l2" (per row) and "centered" (per sample); s_i·s_j·G
    for "none" and "dim" (per row)."""
    a, mask = inputs
    scales = data.draw(arrays(np.float32, a.shape[:2], elements=st.floats(1e-2, 1e2)))
    if normalize == "centered":  # centring commutes with one scale per sample
        scales = np.repeat(scales[:, :1], a.shape[1], axis=1)
    scaled = (a * scales[..., None]).astype(np.float32)
    expected = gram(a, normalize, mask).astype(np.float64)
    if normalize in ("none", "dim"):
        s = scales.astype(np.float64)
        expected = expected * s[:, :, None] * s[:, None, :]
    scale, resolved = row_scale(scaled, normalize, mask)
    resolved &= row_scale(a, normalize, mask)[1]
    assert_gram_close(
        gram(scaled, normalize, mask), expected, scale, resolved, normalize
    )


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@PROPERTY
@given(inputs=gram_inputs(), data=st.data())
def test_permuting_modalities_permutes_gram(normalize, inputs, data):
    a, mask = inputs
    perm = np.array(data.draw(st.permutations(range(a.shape[1]))), dtype=int)
    perm_mask = None if mask is None else mask[:, perm]
    expected = gram(a, normalize, mask)[:, perm][:, :, perm].astype(np.float64)
    scale, resolved = row_scale(a[:, perm], normalize, perm_mask)
    actual = gram(a[:, perm], normalize, perm_mask)
    assert_gram_close(actual, expected, scale, resolved, normalize)


@pytest.mark.parametrize("normalize", ["l2", "none", "dim"])
@PROPERTY
@given(inputs=gram_inputs(masked=False))
def test_zero_rows_give_zero_gram_rows(normalize, inputs):
    (a, _) = inputs
    zero = ~np.any(a != 0, axis=-1)
    g = gram(a, normalize)
    assert np.all(g[zero] == 0.0)
    assert np.all(np.swapaxes(g, 1, 2)[zero] == 0.0)


@PROPERTY
@given(mask=BATCH.flatmap(lambda b: arrays(np.bool_, (b, 5))))
def test_pair_mask_is_the_outer_product(mask):
    expected = mask[:, :, None] & mask[:, None, :]
    np.testing.assert_array_equal(to_np(kd_ops.pair_mask(mask)), expected)


@PROPERTY
@given(
    data=WIDTH.flatmap(
        lambda n: st.tuples(
            arrays(np.float32, (n,), elements=FINITE),
            arrays(np.float32, (n,), elements=WEIGHT),
            arrays(np.float32, (n,), elements=ANY_FINITE),
        )
    )
)
def test_masked_mean_ignores_zero_weight_values(data):
    values, weights, junk = data
    got = float(to_np(kd_ops.masked_mean(values, weights)))
    swapped = np.where(weights > 0, values, junk)
    assert float(to_np(kd_ops.masked_mean(swapped, weights))) == got
    total = weights.astype(np.float64).sum()
    if total == 0:
        assert got == 0.0
    else:
        expected = (values.astype(np.float64) * weights).sum() / total
        bound = 1e-5 * np.abs(values.astype(np.float64)).max()
        assert abs(got - expected) <= bound + 1e-30


# ----------------------------------------------------------------------------
# gram_loss


@PROPERTY
@given(
    inputs=gram_inputs(networks=2, masked=False), options=loss_options(), data=st.data()
)
@pytest.mark.slow  # fast tier: under 3 min per backend
def test_masked_features_never_influence_the_loss(inputs, options, data):
    """Any finite values in masked-out rows: same Grams, same loss, zero gradient."""
    teacher, student, _ = inputs
    mask = data.draw(arrays(np.bool_, teacher.shape[:2]))
    weight = data.draw(sample_weights(len(mask)))
    out = ~mask[..., None]
    junk_teacher = data.draw(arrays(np.float32, teacher.shape, elements=ANY_FINITE))
    junk_student = data.draw(arrays(np.float32, student.shape, elements=ANY_FINITE))
    other_teacher = np.where(out, junk_teacher, teacher)
    other_student = np.where(out, junk_student, student)

    def masked_loss(t, s):
        return kd_ops.gram_loss(t, s, mask=mask, sample_weight=weight, **options)

    expected, _ = value_and_grad(lambda s: masked_loss(teacher, s), student)
    assert np.isfinite(expected)
    value, grad = value_and_grad(lambda s: masked_loss(other_teacher, s), other_student)
    assert value == expected
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(
        gram(other_teacher, options["normalize"], mask),
        gram(teacher, options["normalize"], mask),
    )
    assert np.all(grad[~mask] == 0.0)


@pytest.mark.slow  # fast tier: under 3 min per backend
@PROPERTY
@given(inputs=gram_inputs(networks=2), options=loss_options(), data=st.data())
def test_sample_with_every_modality_masked_adds_nothing(inputs, options, data):
    """Appending a sample whose modalities are all masked keeps the loss."""
    teacher, student, mask = inputs
    mask = present(teacher, mask)
    weight = data.draw(sample_weights(len(mask) + 1))
    kept_weight = None if weight is None else weight[:-1]
    extra_teacher = data.draw(
        arrays(np.float32, (1, *teacher.shape[1:]), elements=ANY_FINITE)
    )
    extra_student = data.draw(
        arrays(np.float32, (1, *student.shape[1:]), elements=ANY_FINITE)
    )
    normalize = options["normalize"]
    if normalize == "centered":  # or the rounding of the mean decides the loss
        assume(all(row_scale(a, normalize, mask)[1].all() for a in (teacher, student)))
    expected = loss(teacher, student, mask, kept_weight, **options)
    got = loss(
        np.concatenate([teacher, extra_teacher]),
        np.concatenate([student, extra_student]),
        np.concatenate([mask, np.zeros((1, mask.shape[1]), bool)]),
        weight,
        **options,
    )
    # Each Gram entry may round differently in a batch of another size: an
    # error delta per entry moves the loss by at most 2·delta·sqrt(loss) + delta².
    delta = TOL[normalize] * max(
        row_scale(a, normalize, mask)[0].max() ** 2 for a in (teacher, student)
    )
    assert abs(got - expected) <= 2 * delta * np.sqrt(expected) + delta**2
    nothing = np.zeros_like(mask)
    assert loss(teacher, student, nothing, kept_weight, **options) == 0.0


@PROPERTY
@given(inputs=gram_inputs(networks=2), options=loss_options(), data=st.data())
def test_loss_and_gradient_are_finite_and_non_negative(inputs, options, data):
    teacher, student, mask = inputs
    weight = data.draw(sample_weights(len(teacher)))
    value, grad = value_and_grad(
        lambda s: kd_ops.gram_loss(
            teacher, s, mask=mask, sample_weight=weight, **options
        ),
        student,
    )
    assert np.isfinite(value) and value >= 0.0
    assert grad.shape == student.shape and np.all(np.isfinite(grad))


@PROPERTY
@given(
    inputs=gram_inputs(),
    options=loss_options(targets=["sample"]),
    data=st.data(),
)
def test_loss_is_zero_when_student_equals_teacher(inputs, options, data):
    a, mask = inputs
    weight = data.draw(sample_weights(len(a)))
    assert loss(a, a.copy(), mask, weight, **options) == 0.0


@PROPERTY
@given(inputs=gram_inputs(), data=st.data())
def test_cosine_gram_loss_gradient_matches_the_textbook_form(inputs, data):
    """The cached-teacher Gram loss's gradient (closed form) against autograd
    through normalised rows multiplied after, under masks and sample weights."""
    student, mask = inputs
    weight = data.draw(sample_weights(len(student)))
    teacher_gram = data.draw(
        arrays(np.float32, student.shape[:2] + student.shape[1:2], elements=FINITE)
    ) / np.float32(1e3)
    if mask is not None:
        teacher_gram = teacher_gram * to_np(kd_ops.pair_mask(mask))

    def textbook(s):
        if mask is not None:
            s = s * keras.ops.expand_dims(keras.ops.cast(mask, "float32"), -1)
        rows = kd_ops.l2_normalize_rows(s)
        return keras.ops.matmul(rows, keras.ops.transpose(rows, (0, 2, 1)))

    def distance(gram_fn):
        return lambda s: kd_ops.gram_distance(
            teacher_gram, gram_fn(s), mask=mask, sample_weight=weight
        )

    value, grad = value_and_grad(
        distance(lambda s: kd_ops.gram_matrix(s, "l2", mask)), student
    )
    expected_value, expected = value_and_grad(distance(textbook), student)
    assert value == pytest.approx(expected_value, rel=1e-5, abs=1e-7)
    # Row i's gradient is at most 8·M·max w / count / ‖xᵢ‖ (|G| ≤ 1, |Gₜ| ≤ 1);
    # the textbook form's rounding is relative to that, not to its own value.
    pairs = present(student, mask).sum(axis=1) ** 2
    count = max(pairs.sum(), 1)
    largest_weight = 1.0 if weight is None else max(weight.max(), 1e-30)
    scale = np.maximum(np.abs(student).max(axis=-1, keepdims=True), 1.0)
    norms = (
        scale * np.maximum(np.linalg.norm(student / scale, axis=-1), 1e-6)[..., None]
    )
    bound = 8 * student.shape[1] * largest_weight / count / norms
    row_max = np.max(np.abs(expected), axis=-1, keepdims=True)
    error = np.abs(grad - expected)
    assert np.all(error <= 1e-4 * np.abs(expected) + 1e-5 * row_max + 1e-6 * bound)
