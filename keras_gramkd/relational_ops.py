"""Pure `keras.ops` functions behind the relational terms: SP, RKD, PKT.

Batch-relational losses compare how each network relates the samples of a
batch to each other, so both sides are (batch, d) with any widths (inputs of
higher rank are flattened per sample, as the reference code does). All take
an optional (batch,) `sample_weight`: rows of weight 0 are left out of the
relations altogether (the loss equals the loss of the batch without them),
and the remaining entries of the B×B (or B×B×B) relation are weighted by the
product of their rows' weights; with no weights, each reduction is the
authors' reference code's (RepDistiller). Like
`keras_gramkd.ops`, every function runs on the three backends in float32.

>>> import numpy as np
>>> f = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
>>> float(similarity_preserving(f, f))
0.0
"""

import math

from keras import ops

# The reference code's floors: `torch.nn.functional.normalize` divides by
# max(‖x‖, 1e-12); RKD clamps squared distances at 1e-12; PKT adds 1e-7.
RELATION_NORM_FLOOR = 1e-12
RKD_SQUARED_DISTANCE_FLOOR = 1e-12
PKT_EPSILON = 1e-7


def _batch_rows(features):
    """float32 (batch, n): the features flattened per sample."""
    features = ops.cast(features, "float32")
    if len(features.shape) == 1:
        raise ValueError(
            "Relational losses need per-sample features of shape (batch, d); "
            f"got shape {tuple(features.shape)}."
        )
    if len(features.shape) > 2:
        width = math.prod(features.shape[1:])
        features = ops.reshape(features, (-1, width))
    return features


def _row_weights(teacher_features, sample_weight):
    """(weights, member): (batch,) float32 weights and their 0/1 support."""
    if sample_weight is None:
        weights = ops.ones_like(teacher_features[:, 0])
    else:
        weights = ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
    return weights, ops.cast(weights > 0, "float32")


def _outer(a, b):
    return ops.expand_dims(a, 1) * ops.expand_dims(b, 0)


def _bounded(features, member):
    """`features` over the members' largest |entry| when that is above 1.

    Every relation here is unchanged by one positive factor on a whole network's
    features (SP's and PKT's normalised rows, RKD's mean-normalised distances),
    so dividing by it (a constant for the gradient) changes no value but keeps
    the squares and products from overflowing float32, whatever the scale.
    """
    largest = ops.max(ops.abs(features) * ops.expand_dims(member, 1))
    return features / ops.stop_gradient(ops.maximum(largest, 1.0))


def _safe_norm(squared_norm, floor):
    """max(sqrt(squared_norm), floor), with a finite gradient at 0."""
    return ops.sqrt(ops.maximum(squared_norm, floor * floor))


def smooth_l1(x):
    """Elementwise smooth-L1 (Huber, threshold 1): x²/2 if |x| < 1, else |x| − ½.

    As `torch.nn.functional.smooth_l1_loss` with `beta=1`, before reduction.

    Example:

    >>> import numpy as np
    >>> ops.convert_to_numpy(smooth_l1(np.array([0.5, -3.0], "float32"))).tolist()
    [0.125, 2.5]
    """
    magnitude = ops.abs(ops.cast(x, "float32"))
    quadratic = ops.minimum(magnitude, 1.0)
    return 0.5 * ops.square(quadratic) + (magnitude - quadratic)


def _normalized_gram(features, member):
    """SP's G = F·Fᵀ with each row divided by max(‖row‖, 1e-12)."""
    features = _bounded(features * ops.expand_dims(member, 1), member)
    gram = ops.matmul(features, ops.transpose(features))
    # Dividing a row by its largest entry first (when above 1) changes nothing
    # after the normalisation but keeps the squares from overflowing float32.
    scale = ops.maximum(ops.max(ops.abs(gram), axis=-1, keepdims=True), 1.0)
    gram = gram / ops.stop_gradient(scale)
    norm = _safe_norm(
        ops.sum(ops.square(gram), axis=-1, keepdims=True), RELATION_NORM_FLOOR
    )
    return gram / norm


def similarity_preserving(teacher_features, student_features, sample_weight=None):
    """Similarity-preserving KD: squared difference of the batch similarity maps.

    Per network, G = F·Fᵀ (B×B), each row divided by its L2 norm (floored at
    1e-12); the loss is

        L = Σᵢⱼ (G_t − G_s)ᵢⱼ² / B²

    (the reference code's reduction). The widths d_t and d_s may differ.

    Args:
        teacher_features: (batch, d_t); higher ranks are flattened per sample.
        student_features: (batch, d_s).
        sample_weight: optional (batch,) weights: rows of weight 0 are left
            out of the relations, and entry (i, j) counts with weight wᵢ·wⱼ, so
            the loss is Σ wᵢwⱼ (G_t − G_s)ᵢⱼ² / (Σ w)².

    Returns:
        float32 scalar.

    Departures from the reference code: none in value. The features are divided
    by their largest entry when it is above 1, and each row of G by its largest
    entry, before the normalisation (constants for the gradient): the result is
    unchanged, and neither F·Fᵀ nor the squares overflow float32; the norm is
    `sqrt(max(‖g‖², 1e-24))`, equal to
    max(‖g‖, 1e-12) with a finite gradient at a zero row.

    Example:

    >>> import numpy as np
    >>> f = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")
    >>> float(similarity_preserving(f, f))
    0.0
    >>> round(float(similarity_preserving(f, np.ones((2, 3), "float32"))), 4)
    0.2929

    References:
        Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.
    """
    teacher = _batch_rows(teacher_features)
    student = _batch_rows(student_features)
    weights, member = _row_weights(teacher, sample_weight)
    difference = _normalized_gram(teacher, member) - _normalized_gram(student, member)
    pair_weights = _outer(weights, weights)
    return ops.divide_no_nan(
        ops.sum(pair_weights * ops.square(difference)), ops.sum(pair_weights)
    )


def pairwise_distances(features, member=None):
    """RKD's distance matrix Dᵢⱼ = ‖fᵢ − fⱼ‖, normalised by its mean.

    Squared distances are floored at 1e-12 before the root and the diagonal is
    set to 0 (as in the reference code); D is then divided by the mean of its
    positive entries (among member rows). Returns float32 (batch, batch).
    """
    features = _batch_rows(features)
    if member is None:
        member = ops.ones_like(features[:, 0])
    # Distances do not change under a translation: centring on the (members')
    # mean first makes ‖fᵢ‖² + ‖fⱼ‖² − 2⟨fᵢ, fⱼ⟩ cancel far less in float32.
    column = ops.expand_dims(member, 1)
    center = ops.divide_no_nan(
        ops.sum(features * column, axis=0, keepdims=True), ops.sum(member)
    )
    features = _bounded((features - ops.stop_gradient(center)) * column, member)
    squared_norms = ops.sum(ops.square(features), axis=-1)
    squared = (
        ops.expand_dims(squared_norms, 1)
        + ops.expand_dims(squared_norms, 0)
        - 2.0 * ops.matmul(features, ops.transpose(features))
    )
    pairs = _outer(member, member)
    off_diagonal = pairs * (1.0 - ops.eye(ops.shape(features)[0], dtype="float32"))
    distances = ops.sqrt(ops.maximum(squared, RKD_SQUARED_DISTANCE_FLOOR))
    distances = distances * off_diagonal
    positive = ops.cast(distances > 0, "float32")
    mean = ops.divide_no_nan(ops.sum(distances), ops.sum(positive))
    return ops.divide_no_nan(distances, mean)


def rkd_distance(teacher_features, student_features, sample_weight=None):
    """RKD distance loss: smooth-L1 between mean-normalised distance matrices.

    Per network, Dᵢⱼ = ‖fᵢ − fⱼ‖ / μ with μ the mean of the positive distances
    (squared distances floored at 1e-12, diagonal 0); the loss is

        L = mean over the B×B entries of smooth_l1(D_s − D_t)

    with `smooth_l1` the Huber loss of threshold 1. Widths may differ.

    Args:
        teacher_features: (batch, d_t); higher ranks are flattened per sample.
        student_features: (batch, d_s).
        sample_weight: optional (batch,) weights: rows of weight 0 are left
            out (of the distances and of μ), entry (i, j) counts with wᵢ·wⱼ.

    Returns:
        float32 scalar.

    Departures from the reference code: the features are centred on the
    batch mean before ‖fᵢ‖² + ‖fⱼ‖² − 2⟨fᵢ, fⱼ⟩ (distances are translation
    invariant; this only reduces float32 cancellation, which otherwise turns
    near-duplicate rows' distances into noise of about sqrt(ε)·‖f‖), then
    divided by their largest entry when above 1 (the normalised distances are
    unchanged; the squares cannot overflow float32); and a
    batch with no positive distance (one row) gives 0 instead of NaN. The
    teacher's μ is a constant (the reference computes the teacher under
    `no_grad`); here the teacher is outside the gradient anyway.

    Example:

    >>> import numpy as np
    >>> t = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]], "float32")
    >>> float(rkd_distance(t, 2.0 * t))  # the same shape at another scale
    0.0

    References:
        Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019.
    """
    teacher = _batch_rows(teacher_features)
    student = _batch_rows(student_features)
    weights, member = _row_weights(teacher, sample_weight)
    difference = pairwise_distances(student, member) - pairwise_distances(
        teacher, member
    )
    pair_weights = _outer(weights, weights)
    return ops.divide_no_nan(
        ops.sum(pair_weights * smooth_l1(difference)), ops.sum(pair_weights)
    )


def pairwise_angles(features):
    """RKD's angle tensor Aᵢⱼₖ = ⟨eᵢⱼ, eᵢₖ⟩, eᵢⱼ = (fⱼ − fᵢ)/max(‖fⱼ − fᵢ‖, 1e-12).

    Returns float32 (batch, batch, batch); Aᵢⱼₖ is 0 when j = i or k = i.
    """
    features = _batch_rows(features)
    differences = ops.expand_dims(features, 0) - ops.expand_dims(features, 1)
    # eᵢⱼ's divisor depends on the scale only: dividing each row i of
    # differences by its largest entry first (a constant for the gradient)
    # avoids overflow when squaring, and the norm is floored as the
    # reference's F.normalize with a finite gradient at a zero difference.
    scale = ops.maximum(ops.max(ops.abs(differences), axis=(1, 2), keepdims=True), 1.0)
    differences = differences / ops.stop_gradient(scale)
    norm = _safe_norm(
        ops.sum(ops.square(differences), axis=-1, keepdims=True),
        RELATION_NORM_FLOOR,
    )
    directions = differences / norm
    return ops.matmul(directions, ops.transpose(directions, (0, 2, 1)))


def rkd_angle(teacher_features, student_features, sample_weight=None):
    """RKD angle loss: smooth-L1 between the angles of every triplet.

    Per network, eᵢⱼ = (fⱼ − fᵢ)/‖fⱼ − fᵢ‖ (norm floored at 1e-12) and
    Aᵢⱼₖ = ⟨eᵢⱼ, eᵢₖ⟩, the cosine of the angle at fᵢ; the loss is

        L = mean over the B×B×B entries of smooth_l1(A_s − A_t)

    Memory is O(B²·d + B³) per network. Widths may differ.

    Args:
        teacher_features: (batch, d_t); higher ranks are flattened per sample.
        student_features: (batch, d_s).
        sample_weight: optional (batch,) weights: entry (i, j, k) counts with
            wᵢ·wⱼ·wₖ, so rows of weight 0 take no part.

    Returns:
        float32 scalar.

    Departures from the reference code: none in value. Each anchor's
    differences are divided by their largest entry (when above 1) before the
    normalisation, so squaring cannot overflow float32, and the floored norm
    has a finite gradient at the zero differences (the diagonal, duplicates).

    Example:

    >>> import numpy as np
    >>> t = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], "float32")
    >>> float(rkd_angle(t, 5.0 * t + 1.0))  # similar triangles, same angles
    0.0

    References:
        Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019.
    """
    teacher = _batch_rows(teacher_features)
    student = _batch_rows(student_features)
    weights, _ = _row_weights(teacher, sample_weight)
    difference = pairwise_angles(student) - pairwise_angles(teacher)
    triple_weights = ops.expand_dims(_outer(weights, weights), 2) * ops.reshape(
        weights, (1, 1, -1)
    )
    return ops.divide_no_nan(
        ops.sum(triple_weights * smooth_l1(difference)), ops.sum(triple_weights)
    )


def _pkt_affinities(features, member):
    """PKT's row-stochastic affinities K = (cos + 1)/2 over member columns."""
    features = _bounded(features, member)
    squared_norm = ops.sum(ops.square(features), axis=-1, keepdims=True)
    # The reference divides by ‖f‖ + 1e-7; the root of 1e-30 instead of 0 only
    # keeps the gradient of a zero row finite (it moves ‖f‖ by at most 1e-15).
    unit = features / (ops.sqrt(ops.maximum(squared_norm, 1e-30)) + PKT_EPSILON)
    kernel = (ops.matmul(unit, ops.transpose(unit)) + 1.0) / 2.0
    kernel = kernel * _outer(member, member)
    # A member row holds its own entry (≥ 1/2), so its sum is ≥ 1/2; the
    # others (all zero) are divided by 1.
    row_sums = ops.sum(kernel, axis=-1, keepdims=True) + ops.expand_dims(
        1.0 - member, 1
    )
    return kernel / row_sums


def pkt(teacher_features, student_features, sample_weight=None):
    """Probabilistic knowledge transfer: KL between cosine-affinity distributions.

    Per network, rows are divided by (‖f‖ + 1e-7), K = (F·Fᵀ + 1)/2 and each
    row of K is divided by its sum (row i: the distribution of i's neighbours);
    the loss is

        L = mean over the B×B entries of K_t · log((K_t + 1e-7)/(K_s + 1e-7))

    Widths may differ.

    Args:
        teacher_features: (batch, d_t); higher ranks are flattened per sample.
        student_features: (batch, d_s).
        sample_weight: optional (batch,) weights: rows of weight 0 are left
            out (also of the other rows' normalising sums), entry (i, j)
            counts with wᵢ·wⱼ.

    Returns:
        float32 scalar.

    Departures from the reference code: the norm is sqrt(max(‖f‖², 1e-30))
    rather than sqrt(‖f‖²), which moves a row's divisor by at most 1e-15 and
    makes the gradient of a zero row finite (the reference's is NaN there, and
    its value NaN before its own `nan -> 0` repair); and features whose largest
    entry is above 1 are first divided by it, so ‖f‖² cannot overflow float32
    (the 1e-7 then weighs relative to a norm of order 1 rather than ‖f‖).

    Example:

    >>> import numpy as np
    >>> f = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], "float32")
    >>> float(pkt(f, f))
    0.0
    >>> round(float(pkt(f, np.ones((3, 4), "float32"))), 4)
    0.0088

    References:
        Passalis & Tefas, "Learning Deep Representations with Probabilistic
        Knowledge Transfer", ECCV 2018.
    """
    teacher = _batch_rows(teacher_features)
    student = _batch_rows(student_features)
    weights, member = _row_weights(teacher, sample_weight)
    k_teacher = _pkt_affinities(teacher, member)
    k_student = _pkt_affinities(student, member)
    divergence = k_teacher * (
        ops.log(k_teacher + PKT_EPSILON) - ops.log(k_student + PKT_EPSILON)
    )
    pair_weights = _outer(weights, weights)
    return ops.divide_no_nan(ops.sum(pair_weights * divergence), ops.sum(pair_weights))


def modality_similarity_preserving(
    teacher_features, student_features, sample_weight=None, mask=None
):
    """Per-modality similarity preserving: SP on each modality, averaged.

    For each modality m, the batch × batch similarity map of its embeddings
    (`similarity_preserving` on F_t^m, F_s^m) — the batch-level reading of a
    "modality-level Gram", beside `gram_matrix`'s per-sample M × M one:

        L = (1/M) Σₘ SP(F_t^m, F_s^m)

    Args:
        teacher_features: a list of M (batch, d_t^m) tensors, or one
            (batch, M, d_t) tensor. Widths may differ between modalities and
            between the networks.
        student_features: the same M modalities, in the same order.
        sample_weight: optional (batch,) weights, as in `similarity_preserving`.
        mask: optional (batch, M) 0/1 modality mask: modality m's relations
            leave out the samples where it is missing, and a modality missing
            from every sample is left out of the average.

    Returns:
        float32 scalar.

    Example:

    >>> import numpy as np
    >>> f = np.eye(3, dtype="float32")
    >>> float(modality_similarity_preserving([f, f], [f, 2.0 * f]))
    0.0

    References:
        Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019
        (applied per modality).
    """
    teacher = _modality_list(teacher_features)
    student = _modality_list(student_features)
    if len(teacher) != len(student):
        raise ValueError(
            f"Teacher features have {len(teacher)} modalities but student "
            f"features have {len(student)}; per-modality SP pairs them in order."
        )
    base, _ = _row_weights(_batch_rows(teacher[0]), sample_weight)
    total, count = ops.zeros((), "float32"), ops.zeros((), "float32")
    for m, (t, s) in enumerate(zip(teacher, student, strict=True)):
        weights = base if mask is None else base * ops.cast(mask[:, m], "float32")
        present = ops.cast(ops.sum(weights) > 0, "float32")
        total = total + similarity_preserving(t, s, weights)
        count = count + present
    return ops.divide_no_nan(total, count)


def _modality_list(features):
    if isinstance(features, (list, tuple)):
        return list(features)
    if len(features.shape) != 3:
        raise ValueError(
            "Per-modality features must be a list of (batch, d) tensors or one "
            f"(batch, M, d) tensor; got shape {tuple(features.shape)}."
        )
    return [features[:, m] for m in range(features.shape[1])]
