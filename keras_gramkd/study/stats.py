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
