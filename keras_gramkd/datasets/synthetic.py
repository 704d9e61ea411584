"""Synthetic multi-modal classification data with a known modality correlation.

Generative model, for a sample `i` of class `c`, modality `m` and latent width `k`:

    z[i, m] = class_sep * mu[c, m] + w[i, m]          (latent, length k)
    x[i, m] = z[i, m] @ P[m] / sqrt(k) + noise[m] * e[i, m]   (observed, width w_m)

- `mu[c, m]` (class centroids) and `e` are i.i.d. standard normal; the centroids
  are drawn independently per modality, so the class signal creates no
  correlation between modalities beyond the shared label.
- `w[i, :, j]` (the within-class "style" of the M modalities in latent dimension
  `j`) is drawn from N(0, C), independently per sample and per dimension: C is
  the ground-truth within-class correlation matrix of the modality latents. For a
  scalar `correlation` rho, C = (1 - rho) I + rho 11^T, i.e. every modality sees
  a shared latent with weight sqrt(rho) plus a private one with weight
  sqrt(1 - rho).
- `P[m]` is a fixed random (k, w_m) standard-normal projection per modality.

So, given the class, the per-sample modality latents relate exactly as C says:
E[w[i, m] . w[i, n]] = k * C[m, n], which is the expected within-class
modality-level Gram matrix that a teacher can learn and pass on to a student.
"""

import numbers

import numpy as np

from keras_gramkd.checks import check_number


def _as_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {value}.")
    return int(value)


def _per_modality(name, value, n_modalities, check):
    """Broadcasts a scalar or validates a length-M list; `check` tests one item."""
    values = np.asarray(value, dtype=object)
    if values.ndim == 0:
        values = [value] * n_modalities
    elif values.ndim != 1 or len(values) != n_modalities:
        raise ValueError(
            f"`{name}` must be a scalar or a list of length n_modalities="
            f"{n_modalities}; got {value!r}."
        )
    for v in values:
        check(v)
    return list(values)


def _correlation_matrix(correlation, n_modalities):
    """Builds and validates the within-class modality correlation matrix C."""
    spec = np.asarray(correlation, dtype=np.float64)
    if spec.ndim == 0:
        rho = float(spec)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"A scalar `correlation` must be in [0, 1]; got {rho}.")
        c = np.full((n_modalities, n_modalities), rho)
        np.fill_diagonal(c, 1.0)
        return c
    shape = (n_modalities, n_modalities)
    if spec.shape != shape:
        raise ValueError(
            f"`correlation` must be a scalar in [0, 1] or a matrix of shape {shape} "
            f"(n_modalities x n_modalities); got shape {spec.shape}."
        )
    if not np.all(np.isfinite(spec)):
        raise ValueError("`correlation` matrix has non-finite entries.")
    if not np.allclose(spec, spec.T, atol=1e-8):
        raise ValueError("`correlation` matrix must be symmetric.")
    if not np.allclose(np.diag(spec), 1.0, atol=1e-8):
        raise ValueError("`correlation` matrix must have ones on its diagonal.")
    if np.linalg.eigvalsh(spec).min() < -1e-8:
        raise ValueError(
            "`correlation` matrix must be positive semi-definite (a valid "
            "correlation matrix)."
        )
    return spec


def _psd_sqrt(c):
    """Returns L with L @ L.T == c; works for singular c (e.g. rho = 1)."""
    eigval, eigvec = np.linalg.eigh(c)
    return eigvec * np.sqrt(np.clip(eigval, 0.0, None))


def make_multimodal(
    n_samples=1000,
    n_classes=10,
    n_modalities=3,
    widths=16,
    correlation=0.5,
    noise=0.1,
    seed=0,
    latent_dim=8,
    class_sep=1.0,
):
    """Generates a multi-modal classification set with a known modality correlation.

    See the module docstring for the generative model. Classes are balanced
    (sizes differ by at most one) and in random order.

    Args:
        n_samples: number of samples, at least `n_classes`.
        n_classes: number of classes, at least 2.
        n_modalities: number of modalities M, at least 1.
        widths: observed feature width per modality: an int, or a list of M
            ints (each >= 1).
        correlation: within-class correlation of the modality latents: a scalar
            rho in [0, 1] (every pair of modalities correlated by rho), or an
            (M, M) symmetric positive semi-definite matrix with unit diagonal.
        noise: standard deviation of the observation noise, a non-negative
            scalar or a list of M of them.
        seed: integer seed; the same arguments and seed give the same data.
        latent_dim: latent width k per modality, at least 1.
        class_sep: scale of the class centroids (larger: easier classes), >= 0.

    Returns:
        `(x, y, info)`: `x` a dict `{"m0": (n, w0), "m1": ...}` of float32,
        `y` int32 labels of shape `(n,)`, and `info` a dict with the ground
        truth: `"correlation"` (M, M) float64 matrix C, `"latents"` the clean
        latents `z`, float32 `(n, M, k)`, `"class_means"` `(n_classes, M, k)`
        (`class_sep * mu`), `"projections"` the list of `P[m]` `(k, w_m)`,
        `"modality_names"`, `"widths"` and `"noise"` as lists.

    Example:

    >>> x, y, info = make_multimodal(n_samples=100, widths=[8, 4, 16])
    >>> {name: v.shape for name, v in x.items()}
    {'m0': (100, 8), 'm1': (100, 4), 'm2': (100, 16)}
    >>> info["correlation"].round(2).tolist()
    [[1.0, 0.5, 0.5], [0.5, 1.0, 0.5], [0.5, 0.5, 1.0]]
    """
    n_classes = _as_int("n_classes", n_classes, 2)
    n_samples = _as_int("n_samples", n_samples, n_classes)
    n_modalities = _as_int("n_modalities", n_modalities, 1)
    latent_dim = _as_int("latent_dim", latent_dim, 1)
    widths = [
        int(w)
        for w in _per_modality(
            "widths", widths, n_modalities, lambda w: _as_int("widths", w, 1)
        )
    ]

    noise = [
        float(v)
        for v in _per_modality(
            "noise", noise, n_modalities, lambda v: check_number("`noise` values", v, 0)
        )
    ]
    class_sep = check_number("`class_sep`", class_sep, 0)
    corr = _correlation_matrix(correlation, n_modalities)

    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n_samples) % n_classes).astype(np.int32)
    class_means = class_sep * rng.standard_normal((n_classes, n_modalities, latent_dim))
    # style[i, :, j] ~ N(0, C): mixes independent normals across modalities.
    style = np.einsum(
        "mn,inj->imj",
        _psd_sqrt(corr),
        rng.standard_normal((n_samples, n_modalities, latent_dim)),
    )
    latents = class_means[y] + style
    projections = [rng.standard_normal((latent_dim, w)) for w in widths]

    names = [f"m{m}" for m in range(n_modalities)]
    x = {}
    for m, name in enumerate(names):
        clean = latents[:, m] @ projections[m] / np.sqrt(latent_dim)
        observed = clean + noise[m] * rng.standard_normal(clean.shape)
        x[name] = observed.astype(np.float32)

    info = {
        "correlation": corr,
        "latents": latents.astype(np.float32),
        "class_means": class_means,
        "projections": projections,
        "modality_names": names,
        "widths": widths,
        "noise": noise,
    }
    return x, y, info
