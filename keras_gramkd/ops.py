"""Pure `keras.ops` functions behind the losses: Gram matrices, KD, masked means.

Every function here runs unchanged on the TensorFlow, JAX and PyTorch backends,
computes in float32 whatever the input dtype (so mixed precision is safe), and
returns finite values for finite inputs (zero vectors included).

Example:

>>> import numpy as np
>>> from keras_gramkd import ops as kd_ops
>>> features = np.random.default_rng(0).normal(size=(4, 3, 8)).astype("float32")
>>> tuple(kd_ops.gram_matrix(features).shape)
(4, 3, 3)
"""

import math

from keras import ops

from keras_gramkd.checks import check_choice

GRAM_NORMALIZATIONS = ("l2", "none", "dim", "centered")
GRAM_ENTRIES = ("all", "diagonal", "off_diagonal")
GRAM_TARGETS = ("sample", "batch_mean")

# Squared-norm floor of the row normalisation: a row whose norm is below
# sqrt(NORM_EPSILON) = 1e-6 is divided by 1e-6 instead, so a zero row stays zero
# and neither the value nor the gradient is ever NaN.
NORM_EPSILON = 1e-12


def check_gram_normalization(normalize):
    """Raises a `ValueError` unless `normalize` is one of `GRAM_NORMALIZATIONS`."""
    check_choice("Gram normalisation", normalize, GRAM_NORMALIZATIONS)


def l2_normalize_rows(x, epsilon=NORM_EPSILON):
    """Divides each vector along the last axis by its L2 norm (floored by epsilon).

    Args:
        x: tensor (..., d).
        epsilon: floor of the squared norm; a zero row stays a zero row.

    Returns:
        float32 tensor of the same shape whose non-zero rows have unit norm.

    A row whose largest entry exceeds 1 in magnitude is first divided by that
    entry, so squaring cannot overflow float32 (entries up to about 1e36).
    """
    x = ops.cast(x, "float32")
    x = x / ops.maximum(ops.max(ops.abs(x), axis=-1, keepdims=True), 1.0)
    squared_norm = ops.sum(ops.square(x), axis=-1, keepdims=True)
    return x / ops.sqrt(ops.maximum(squared_norm, epsilon))


@ops.custom_gradient
def _cosine_gram(features):
    """The cosine Gram `l2_normalize_rows(x) @ l2_normalize_rows(x)ᵀ`, (batch, M, M).

    The same epsilon floor, so a zero row gives a zero row and column. Rows
    whose largest entry exceeds 1 are first divided by it, so squaring cannot
    overflow. The gradient is given in closed form: for unit rows r and the
    incoming gradient U, V = U + Uᵀ, row i gets (V·r − (Σⱼ Vᵢⱼ·Gᵢⱼ)·rᵢ)/‖xᵢ‖
    (the projection off rᵢ; a row below the floor is not normalised).
    """
    scale = ops.maximum(ops.max(ops.abs(features), axis=-1, keepdims=True), 1.0)
    scaled = features / scale
    squared_norms = ops.sum(ops.square(scaled), axis=-1, keepdims=True)
    inverse_norms = ops.rsqrt(ops.maximum(squared_norms, NORM_EPSILON))
    rows = scaled * inverse_norms
    gram = ops.matmul(rows, ops.transpose(rows, (0, 2, 1)))

    def grad(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        both = upstream + ops.transpose(upstream, (0, 2, 1))
        along = ops.sum(both * gram, axis=-1, keepdims=True)
        along = ops.where(squared_norms > NORM_EPSILON, along, 0.0)
        return (ops.matmul(both, rows) - along * rows) * (inverse_norms / scale)

    return gram, grad


def pair_mask(mask):
    """Turns a (batch, M) 0/1 modality mask into the (batch, M, M) pair mask.

    Entry (b, i, j) is 1 when modalities i and j are both present in sample b.
    """
    mask = ops.cast(mask, "float32")
    return ops.expand_dims(mask, 2) * ops.expand_dims(mask, 1)


def gram_matrix(features, normalize="l2", mask=None):
    """Per-sample modality-level Gram matrix G = A·Aᵀ of features A (M×d).

    Args:
        features: tensor (batch, M, d): M modality embeddings per sample.
        normalize: `"l2"` divides each modality vector by its L2 norm (the
            cosine Gram, diagonal 1); `"none"` keeps raw inner products; `"dim"`
            divides raw inner products by d; `"centered"` subtracts the
            per-sample mean of the (present) modality vectors, then as `"l2"`.
        mask: optional (batch, M) 0/1 tensor; rows and columns of missing
            modalities (0) are zeroed, and they are left out of the
            `"centered"` mean.

    Returns:
        float32 tensor (batch, M, M).

    Example:

    >>> import numpy as np
    >>> a = np.array([[[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]], "float32")
    >>> np.round(ops.convert_to_numpy(gram_matrix(a)).astype("float64"), 3).tolist()
    [[[1.0, 0.707, 0.0], [0.707, 1.0, 0.0], [0.0, 0.0, 0.0]]]
    """
    check_gram_normalization(normalize)
    features = ops.cast(features, "float32")
    if len(features.shape) != 3:
        raise ValueError(
            "gram_matrix expects features of shape (batch, M, d); got shape "
            f"{tuple(features.shape)}. Stack per-modality embeddings with "
            "keras_gramkd.layers.ModalityStack."
        )
    row_mask = None if mask is None else ops.expand_dims(ops.cast(mask, "float32"), -1)
    if row_mask is not None:
        features = features * row_mask
    if normalize == "centered":
        if row_mask is None:
            mean = ops.mean(features, axis=1, keepdims=True)
        else:
            count = ops.maximum(ops.sum(row_mask, axis=1, keepdims=True), 1.0)
            mean = ops.sum(features, axis=1, keepdims=True) / count
        features = features - mean
        if row_mask is not None:
            features = features * row_mask
    if normalize in ("l2", "centered"):
        gram = _cosine_gram(features)
    else:
        gram = ops.matmul(features, ops.transpose(features, (0, 2, 1)))
    if normalize == "dim":
        gram = gram / float(features.shape[-1])
    # Rows of missing modalities are zero: so are their rows and columns here.
    return gram


def masked_mean(values, weights=None):
    """Weighted mean sum(values·weights) / sum(weights); 0 when all weights are 0.

    Args:
        values: tensor of any shape.
        weights: tensor broadcastable to `values` (0/1 masks, sample weights),
            or None for the plain mean.

    Returns:
        float32 scalar.
    """
    values = ops.cast(values, "float32")
    if weights is None:
        return ops.mean(values)
    weights = ops.broadcast_to(ops.cast(weights, "float32"), ops.shape(values))
    return ops.divide_no_nan(ops.sum(values * weights), ops.sum(weights))


def sum_over_batch(values, sample_weight=None):
    """Keras' "sum_over_batch_size" reduction: sum(w·v) / batch.

    `values` (batch, ...) are first averaged over each sample's entries. A
    sample with weight 0 (a skipped one) adds exactly 0, even where its value
    is NaN or inf, but still counts in the batch size, as in every Keras loss.

    Args:
        values: (batch, ...) per-sample values.
        sample_weight: optional (batch,) weights.

    Returns:
        float32 scalar.

    Example:

    >>> import numpy as np
    >>> v = np.array([1.0, 3.0, np.nan], "float32")
    >>> float(sum_over_batch(v, np.array([1.0, 1.0, 0.0], "float32")))
    1.3333333730697632
    """
    values = ops.cast(values, "float32")
    if len(values.shape) > 1:
        values = ops.mean(values, axis=tuple(range(1, len(values.shape))))
    if sample_weight is None:
        return ops.mean(values)
    weights = ops.cast(sample_weight, "float32")
    if len(weights.shape) != 1:
        weights = ops.reshape(weights, (-1,))
    return ops.mean(ops.where(weights != 0, values * weights, 0.0))


def gram_loss(
    teacher_features,
    student_features,
    normalize="l2",
    mask=None,
    sample_weight=None,
    entries="all",
    target="sample",
):
    """Mean squared difference between teacher and student Gram matrices.

    Teacher and student may have different embedding widths (d_t != d_s): only
    the M×M matrices are compared.

    Args:
        teacher_features: (batch, M, d_t).
        student_features: (batch, M, d_s).
        normalize: Gram normalisation, see `gram_matrix`.
        mask: optional (batch, M) 0/1 modality mask; the mean is then over
            present pairs only, and a sample with no modality adds nothing.
        sample_weight: optional (batch,) weights of the samples.
        entries: see `gram_distance`.
        target: see `gram_distance`.

    Returns:
        float32 scalar: the mean over samples and counted (present) entries.
    """
    m_teacher, m_student = teacher_features.shape[1], student_features.shape[1]
    if m_teacher != m_student:
        raise ValueError(
            f"Teacher features have {m_teacher} modalities but student features "
            f"have {m_student}; the Gram loss needs the same modalities in the "
            "same order on both sides."
        )
    return gram_distance(
        gram_matrix(teacher_features, normalize, mask),
        gram_matrix(student_features, normalize, mask),
        mask=mask,
        sample_weight=sample_weight,
        entries=entries,
        target=target,
    )


def gram_distance(
    teacher_gram,
    student_gram,
    mask=None,
    sample_weight=None,
    entries="all",
    target="sample",
):
    """Mean squared difference of two (batch, M, M) Gram matrices.

    The part of `gram_loss` after the Gram matrices are formed, so that a
    teacher Gram computed once (`keras_gramkd.cache`) can be matched directly.

    Args:
        teacher_gram: (batch, M, M); entries of missing pairs must be 0, as
            `gram_matrix(..., mask=mask)` makes them.
        student_gram: (batch, M, M), formed with the same normalisation.
        mask: optional (batch, M) 0/1 modality mask: the mean is over present
            pairs only.
        sample_weight: optional (batch,) weights of the samples. As in Keras'
            losses they multiply, and the mask alone sets the count: the value
            is sum(w · squares over present pairs) / (number of present pairs),
            which is sum(w · per-sample mean) / batch without a mask.
        entries: which entries of the M×M matrices count: `"all"`,
            `"diagonal"` (only the squared norms: no relations between
            modalities) or `"off_diagonal"` (only the relations).
        target: `"sample"` matches each sample's teacher Gram (the method);
            `"batch_mean"` matches the teacher Gram averaged over the batch, a
            control that carries no per-sample relations.

    Returns:
        float32 scalar.

    Example:

    >>> import numpy as np
    >>> eye, ones = np.eye(2, dtype="float32")[None], np.ones((1, 2, 2), "float32")
    >>> float(gram_distance(eye, ones))   # two of four entries differ by 1
    0.5
    """
    check_choice("Gram entries", entries, GRAM_ENTRIES)
    check_choice("Gram target", target, GRAM_TARGETS)
    teacher_gram = ops.cast(teacher_gram, "float32")
    student_gram = ops.cast(student_gram, "float32")
    weights = None if mask is None else pair_mask(mask)
    if target == "batch_mean" or entries != "all":
        weights = ops.ones_like(student_gram) if weights is None else weights
    sample = None
    if sample_weight is not None:
        sample = ops.reshape(ops.cast(sample_weight, "float32"), (-1, 1, 1))
    if target == "batch_mean":  # over the samples that count (weight != 0)
        present = (
            weights if sample is None else weights * ops.cast(sample != 0, "float32")
        )
        count = ops.maximum(ops.sum(present, axis=0, keepdims=True), 1.0)
        total = ops.sum(
            ops.where(present > 0, teacher_gram, 0.0), axis=0, keepdims=True
        )
        teacher_gram = weights * total / count
    if entries != "all":
        eye = ops.eye(student_gram.shape[-1], dtype="float32")
        weights = weights * (eye if entries == "diagonal" else 1.0 - eye)
    squares = ops.square(teacher_gram - student_gram)
    # Keras' convention: sample weights multiply, masks shrink the count.
    count = _size(squares) if weights is None else ops.sum(weights)
    if sample is not None:
        weights = sample if weights is None else weights * sample
    if weights is None:
        if isinstance(count, int) and count > 0:
            return ops.mean(squares)
        return ops.sum(squares) / _at_least_one(count)
    # The count of a 0/1 mask is 0 or at least 1, and 0 only when every
    # weight, and so the total, is 0: max(count, 1) divides no nan.
    total = ops.sum(ops.where(weights != 0, squares * weights, 0.0))
    return total / _at_least_one(count)


def _size(x):
    """The number of entries of `x`: a Python int when its shape is static."""
    return math.prod(ops.shape(x))


def _at_least_one(count):
    """max(count, 1) as a float, in Python when `count` is a Python number."""
    if isinstance(count, (int, float)):
        return float(max(count, 1))
    return ops.maximum(ops.cast(count, "float32"), 1.0)


# Coefficients (k − 1)/k!, k = 8 … 2, of the series of 1 + (u − 1)·eᵘ.
_KL_SERIES = tuple((k - 1) / math.factorial(k) for k in range(8, 1, -1))


def _kl_terms(q, u, p):
    """Terms q·(1 + (u − 1)·eᵘ) = q + p·(u − 1) of KL(p ‖ q), u = log p − log q.

    Each term is ≥ 0. Below |u| = 0.5 a term is q·Σₖ₌₂⁸ (k − 1)/k!·uᵏ
    (truncation error < 4e-7 relative); above, the closed form, which then
    loses at most ~20 ulps to cancellation. Returns the terms and the mask of
    the series' entries.
    """
    small = ops.abs(u) < 0.5
    series = _KL_SERIES[0] * u
    for coefficient in _KL_SERIES[1:]:
        series = (series + coefficient) * u
    return ops.where(small, q * u * series, q + p * (u - 1.0)), small


def _tempered_kl(temperature):
    """T²·KL(softmax(t/T) ‖ softmax(s/T)) per row, with its exact gradient.

    The gradient is given in closed form, d/ds = T·(q − p) and
    d/dt = T·p·(u − KL), so no operation of the value is differentiated.
    """

    @ops.custom_gradient
    def kl(teacher, student):
        delta = teacher - student
        # δ at the student's top class: d is exactly 0 where q holds its mass.
        top = student == ops.max(student, axis=-1, keepdims=True)
        shift = ops.max(ops.where(top, delta, -math.inf), axis=-1, keepdims=True)
        d = (delta - shift) / temperature
        log_q = ops.log_softmax(student / temperature, axis=-1)
        log_p = ops.log_softmax(teacher / temperature, axis=-1)
        q, p = ops.exp(log_q), ops.exp(log_p)
        mean_expm1 = ops.sum(q * ops.expm1(d), axis=-1, keepdims=True)
        # No gradient flows through the value: the branch where() discards may
        # be NaN (eᵈ overflows where q holds no mass).
        u = ops.where(
            ops.abs(mean_expm1) < 0.5, d - ops.log1p(mean_expm1), log_p - log_q
        )
        terms, small = _kl_terms(q, u, p)
        kl = ops.sum(terms, axis=-1)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            scale = ops.expand_dims(upstream, -1) * -temperature
            # p − q, as q·(eᵘ − 1) where p and q are close (no cancellation).
            p_minus_q = ops.where(small, q * ops.expm1(u), p - q)
            return (
                scale * p * (ops.expand_dims(kl, -1) - u),
                scale * p_minus_q,
            )

        return kl * (temperature**2), grad

    return kl


def logit_kd(teacher_logits, student_logits, temperature=4.0):
    """Per-sample T²·KL(softmax(t/T) ‖ softmax(s/T)), accurate in float32 for any T.

    The plain form Σ p·(log p − log q) subtracts nearly equal log-probabilities:
    at T = 1e5 its float32 rounding is 1000 times the value. Here
    u = log p − log q = d − log E_q[eᵈ] with d = (δ − δₐ)/T, δ = t − s and a
    the student's top class (so d is exactly 0 where q holds its mass), and
    while |E_q[eᵈ] − 1| < 1/2 the log is `log1p(Σ q·expm1(d))`, so u is
    accurate to rounding relative to the spread of δ/T; otherwise (p and q far
    apart) u is the log-softmax difference, which is then accurate. The KL is
    summed as Σ q·(1 + (u − 1)·eᵘ): every term is ≥ 0 (no cancellation, never
    negative), and small terms come from their series. Relative error is about
    1e-5 or less for T from 1e-3 to 1e6 and logits up to 1e4, with the T → ∞
    limit (1/(2C))·Σᵢ(δᵢ − mean δ)². The gradient is the closed form
    T·(q − p) (for the student; T·p·(u − KL) for the teacher), finite.

    One logit per sample (a binary model's sigmoid logit z) is the Bernoulli
    distribution σ(z/T): the KL is then the binary one,
    T²·[p·log(p/q) + (1 − p)·log((1 − p)/(1 − q))] with p = σ(t/T),
    q = σ(s/T), computed as the two-class softmax of the logits (0, z).

    Args:
        teacher_logits: (batch, classes), or (batch, 1) for a binary model.
        student_logits: the same shape.
        temperature: softening temperature T > 0.

    Returns:
        float32 tensor (batch,).

    Example:

    >>> import numpy as np
    >>> t, s = np.array([[2.0]], "float32"), np.array([[-1.0]], "float32")
    >>> p, q = 1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(0.5))  # σ(t/2), σ(s/2)
    >>> kl = 4 * (p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q)))
    >>> bool(np.isclose(float(logit_kd(t, s, 2.0)[0]), kl, rtol=1e-5))
    True
    """
    teacher_logits = ops.cast(teacher_logits, "float32")
    student_logits = ops.cast(student_logits, "float32")
    if teacher_logits.shape[-1] == 1:  # Bernoulli: softmax over (0, z)
        teacher_logits = ops.pad(teacher_logits, [(0, 0), (1, 0)])
        student_logits = ops.pad(student_logits, [(0, 0), (1, 0)])
    return _tempered_kl(temperature)(teacher_logits, student_logits)


@ops.custom_gradient
def finite_gradient(x):
    """`x` unchanged; its gradient is zeroed where it holds a NaN or inf.

    The whole gradient of `x` is zeroed, not only its bad entries, so a loss
    whose gradient overflows adds nothing through `x` instead of a partial
    update.

    >>> import numpy as np
    >>> from keras_gramkd import ops as kd_ops
    >>> tuple(kd_ops.finite_gradient(np.ones((2,), "float32")).shape)
    (2,)
    """

    def grad(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        finite = ops.all(ops.isfinite(upstream))
        return ops.where(finite, upstream, ops.zeros_like(upstream))

    return ops.copy(x), grad
