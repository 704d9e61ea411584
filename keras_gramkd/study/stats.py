"""Paired statistics over seeds: the numbers every study table reports.

>>> p = paired_difference([0.90, 0.80, 0.85], [0.88, 0.80, 0.80])
>>> round(p["mean"], 4), round(p["se"], 4), p["better"]
(0.0233, 0.0145, 2)
"""

import math

import numpy as np


def mean_sd(values):
    """(mean, sample standard deviation) of `values`; sd is NaN for one value.

    >>> mean_sd([1.0, 3.0])
    (2.0, 1.4142135623730951)
    """
    values = np.asarray(values, dtype=np.float64)
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return float(np.mean(values)), sd


def paired_difference(values, reference):
    """Per-seed differences `values - reference`, their mean and standard error.

    Both lists hold one number per seed, in the same seed order, so that each
    difference compares two runs with the same initial weights and batches.

    Returns:
        dict with `diffs` (per seed), `mean`, `se` (sd / sqrt(n); NaN for one
        seed: one pair cannot tell noise from effect) and `better` (the number
        of seeds where `values` is higher).
    """
    values = np.asarray(values, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if values.shape != reference.shape or values.ndim != 1 or not len(values):
        raise ValueError(
            "paired_difference needs two equal-length, non-empty lists of one "
            f"value per seed; got {values.shape} and {reference.shape}."
        )
    diffs = values - reference
    mean, sd = mean_sd(diffs)
    return {
        "diffs": diffs.tolist(),
        "mean": mean,
        "se": sd / math.sqrt(len(diffs)),
        "better": int(np.sum(diffs > 0)),
    }


def _t_density(t, df):
    """Student's t density with `df` degrees of freedom at the points `t`."""
    log_scale = (
        math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    )
    return np.exp(log_scale - (df + 1) / 2 * np.log1p(np.square(t) / df))


def t_quantile(probability, df):
    """The `probability` quantile of Student's t with `df` degrees of freedom.

    Computed, not looked up: the density is integrated with Simpson's rule
    (on a grid fine enough for 1e-8) and the quantile found by bisection.

    >>> round(t_quantile(0.975, 4), 4), round(t_quantile(0.975, 1000), 3)
    (2.7764, 1.962)
    """
    if not 0.5 <= probability < 1 or df < 1:
        raise ValueError(
            f"t_quantile needs 0.5 <= probability < 1 and df >= 1; got "
            f"{probability} and {df}."
        )

    def mass(q):  # P(0 < T < q): Simpson on atan-spaced points, dense near 0
        u = np.linspace(0.0, math.atan(q), 4001)
        f = _t_density(np.tan(u), df) / np.cos(u) ** 2
        h = u[1] - u[0]
        return h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    target, low, high = probability - 0.5, 0.0, 1.0
    while mass(high) < target:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if mass(mid) < target else (low, mid)
    return (low + high) / 2


def t_interval(paired, level=0.95):
    """The two-sided `level` t interval of a `paired_difference`'s mean.

    Returns (low, high), NaNs for one seed (no standard error).

    >>> low, high = t_interval(paired_difference([0.9, 0.8, 0.85], [0.88, 0.8, 0.8]))
    >>> round(low, 4), round(high, 4)
    (-0.0392, 0.0858)
    """
    n, se = len(paired["diffs"]), paired["se"]
    if n < 2 or not math.isfinite(se):
        return math.nan, math.nan
    half = t_quantile(0.5 + level / 2, n - 1) * se
    return paired["mean"] - half, paired["mean"] + half
