"""Bad training samples: finding them in a batch, leaving them out, stopping on them.

A sample is bad when something it feeds a loss is not a number the step can
use (see `keras_gramkd.distiller` for the full list). Inside the step these
functions give a (batch,) bool "ok" per check (`finite_samples`,
`valid_labels`, `mask_values_ok`), combine them (`both`) and replace the bad
rows with `where` (`where_samples`, `zero_bad_samples`), so no NaN·0 reaches
the gradient. Outside it, `check_arrays` and `check_mask_values` name bad numpy
data before `fit` starts, and `DataGuard` stops `fit` after a step that skipped
samples.

>>> import numpy as np
>>> x = np.array([[1.0, 2.0], [np.nan, 0.0], [3.0, np.inf]], "float32")
>>> ok = finite_samples({"a": x})
>>> [bool(v) for v in ok]
[True, False, False]
>>> np.asarray(where_samples(ok, x)).tolist()
[[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]
"""

import math

import keras
import numpy as np
from keras import ops

MODALITY_MASK_KEY = "modality_mask"
"""The batch key of a (batch, M) 0/1 mask: which modalities a sample has."""

EMPTY_DATA_MESSAGE = (
    "The training data yielded no batch: the data set is empty. Check the "
    "data source (for a tf.data.Dataset, that it is not filtered to nothing "
    "and that take()/skip() counts are right)."
)


def _sample_axes(tensor):
    return tuple(range(1, len(tensor.shape))) or None


def is_float_tensor(value):
    """True for a tensor or array of a float dtype with a batch axis."""
    return (
        hasattr(value, "shape")
        and len(value.shape) > 0
        and "float" in keras.backend.standardize_dtype(value.dtype)
    )


def finite_rows(tensor):
    """(batch,) bool: True where every entry of the sample is finite."""
    ok = ops.isfinite(tensor)
    axes = _sample_axes(tensor)
    return ops.all(ok, axis=axes) if axes else ok


def _sample_size(tensor):
    """The number of values in one sample of `tensor`, or None if unknown."""
    size = 1
    for dim in tensor.shape[1:]:
        if dim is None:
            return None
        size *= int(dim)
    return size if size > 0 else None


def finite_samples(x):
    """(batch,) bool: True where every float tensor of the sample is finite.

    Tensors of one dtype whose sample shapes are known are checked as one
    (batch, -1) concatenation: one check instead of one per tensor (on eager
    PyTorch each check is several dispatched operations). None when `x` holds
    no float tensor.
    """
    finite, groups = None, {}
    for tensor in filter(is_float_tensor, keras.tree.flatten(x)):
        size = _sample_size(tensor)
        if size is None:
            finite = both(finite, finite_rows(tensor))
        else:
            key = keras.backend.standardize_dtype(tensor.dtype)
            groups.setdefault(key, []).append(ops.reshape(tensor, (-1, size)))
    for flat in groups.values():
        joined = flat[0] if len(flat) == 1 else ops.concatenate(flat, axis=1)
        finite = both(finite, finite_rows(joined))
    return finite


def both(a, b):
    """`a and b` per sample, where None means "no check made"."""
    if a is None:
        return b
    return a if b is None else ops.logical_and(a, b)


def valid_labels(y, n_classes, ignore_class=None):
    """(batch,) bool: sparse class labels integral and in [0, n_classes) (or
    the ignore class); with `n_classes` None, float labels finite. None where
    nothing can be wrong (bool labels, integer targets of a regression)."""
    dtype = keras.backend.standardize_dtype(y.dtype)
    if dtype == "bool":
        return None
    if n_classes is None:  # not class labels: only finiteness matters
        return finite_rows(y) if "float" in dtype else None
    if "float" in dtype:
        ok = ops.logical_and(ops.isfinite(y), ops.equal(y, ops.floor(y)))
        ok = ops.logical_and(ok, ops.logical_and(y >= 0, y < n_classes))
    else:
        ok = ops.logical_and(y >= 0, y < n_classes)
    if ignore_class is not None:
        ok = ops.logical_or(ok, ops.equal(y, ignore_class))
    axes = _sample_axes(y)
    return ops.all(ok, axis=axes) if axes else ok


def mask_values_ok(mask):
    """(batch,) bool: a modality mask row holds only 0 and 1 (None for bools)."""
    if keras.backend.standardize_dtype(mask.dtype) == "bool":
        return None
    ok = ops.logical_or(ops.equal(mask, 0), ops.equal(mask, 1))
    return ops.all(ok, axis=_sample_axes(mask))


def where_samples(ok, tensor, fill=0.0):
    """`tensor` with the samples where `ok` is False replaced by `fill`
    (unchanged where `ok` is None: no check made)."""
    if ok is None or len(tensor.shape) == 0:
        return tensor
    shape = (-1,) + (1,) * (len(tensor.shape) - 1)
    keep = ops.reshape(ok, shape)
    # Not full_like: on PyTorch it reads the fill back from the device.
    if fill == 0:
        return ops.where(keep, tensor, ops.zeros_like(tensor))
    return ops.where(keep, tensor, fill)


def zero_bad_samples(x, ok):
    """x with every float input of the samples where `ok` is False zeroed."""
    return keras.tree.map_structure(
        lambda t: where_samples(ok, t) if is_float_tensor(t) else t, x
    )


class SkippedRows(keras.layers.Layer):
    """Marks the skipped samples of `y_pred` with a Keras mask (False), which
    every Keras metric honours, weighted or not: `metrics=["accuracy"]`
    passes no sample weight, so a weight of 0 alone would not leave them out.

    Called on `(y_pred, ok)`; returns `y_pred` with the skipped rows zeroed."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.built = True  # nothing to build: Keras need not trace the model

    def call(self, inputs):
        y_pred, ok = inputs
        return where_samples(ok, y_pred)

    def compute_mask(self, inputs, mask=None):
        return inputs[1]


class DataGuard(keras.callbacks.Callback):
    """Stops `fit` after a step that skipped bad samples (unless told to skip),
    and when the training data yields no batch at all.

    `async_safe`: on JAX and PyTorch, Keras runs the batch hooks of async-safe
    callbacks in a worker thread; a callback that is not would make every step
    wait for its logs to reach the host, stalling the device pipeline. The
    error then surfaces a step or so later, or at the end of the epoch at the
    latest; the skipped samples never reach the weights either way.
    """

    async_safe = True

    def __init__(self, on_bad_sample, term_names=()):
        super().__init__()
        self.on_bad_sample = on_bad_sample
        self.term_names = list(term_names)
        self.epochs_begun = 0
        self.batches = 0
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs_begun += 1
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        logs = logs or {}
        if self.on_bad_sample == "unchecked":
            if not math.isfinite(float(logs.get("loss", 0.0))):
                raise ValueError(
                    f"The loss became NaN or inf in epoch {self.epoch + 1} up "
                    f"to batch {batch + 1}. The Distiller was built with "
                    "on_bad_sample='unchecked', so its step checks nothing: a "
                    "NaN or inf input, weight or output, or a label outside "
                    "[0, classes), has reached the loss and may have reached "
                    "the weights. Build it with on_bad_sample='raise' (the "
                    "default) to find such samples and leave them out."
                )
            return
        bad_terms = [
            name
            for name in self.term_names
            if not math.isfinite(float(logs.get(f"{name}_loss", 0.0)))
        ]
        if bad_terms:
            raise ValueError(
                f"Term(s) {bad_terms} gave a NaN or inf loss in epoch "
                f"{self.epoch + 1} up to batch {batch + 1}, from finite inputs: a "
                "bug in the term, or an overflow of what it reads (scale the "
                "features, e.g. with a normalising layer). The term's gradient "
                "was left out of those steps, so the student's weights hold no "
                "NaN (a term's own weights, such as a FitNet regressor, may). "
                "Fix the term and fit again."
            )
        skipped = float(logs.get("skipped_samples", 0.0))
        if skipped > 0 and self.on_bad_sample == "raise":
            raise ValueError(
                f"{skipped:.0f} training sample(s) in epoch {self.epoch + 1} up to "
                f"batch {batch + 1} have NaN or inf inputs, or a label outside "
                "[0, classes), a NaN or inf sample or class weight, a "
                "modality_mask value other than 0/1, or a NaN or inf output or "
                "loss (an overflow inside a network). They were left out of the "
                "step, so the weights hold no NaN (unless the student's own "
                "layers overflowed; docs/guide/bad-input.md). Clean the data "
                "(np.isfinite "
                "on each input and weight, the label range, the input scale), "
                "or build the Distiller with "
                "on_bad_sample='skip' to leave such samples out and count them "
                "in the skipped_samples metric."
            )

    def on_train_end(self, logs=None):
        if self.epochs_begun and not self.batches:
            raise ValueError(EMPTY_DATA_MESSAGE)


def is_empty_source(x):
    """True for a tf.data.Dataset or PyDataset known to hold no batch."""
    cardinality = getattr(x, "cardinality", None)
    if callable(cardinality):
        return int(cardinality()) == 0
    num_batches = getattr(x, "num_batches", None)
    return num_batches == 0


def check_arrays(x, y):
    """Names an empty or non-numeric array in numpy-style fit data."""
    items = list(x.items()) if isinstance(x, dict) else [("x", x)]
    items.append(("y", y))
    for key, value in items:
        leaves = keras.tree.flatten(value) if value is not None else []
        for leaf in leaves:
            dtype = getattr(leaf, "dtype", None)
            if dtype is None or not hasattr(leaf, "__len__"):
                continue
            kind = getattr(dtype, "kind", "f")
            if kind not in "biuf":
                raise ValueError(
                    f"Input {key!r} has dtype {dtype}; the Distiller trains on "
                    "numbers. Encode it as numbers first (for example "
                    "np.asarray(values, 'float32'))."
                )
            if len(leaf) == 0:
                raise ValueError(
                    f"Input {key!r} has no samples: the data set is empty. "
                    "Check how the arrays were loaded or filtered."
                )


def check_mask_values(x):
    """Raises when a numpy `modality_mask` holds values other than 0 and 1."""
    mask = x.get(MODALITY_MASK_KEY) if isinstance(x, dict) else None
    if mask is None or type(mask).__module__ != "numpy":
        return
    mask = np.asarray(mask)
    bad = ~np.isin(mask, (0, 1))
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0][:2])
        raise ValueError(
            f"Batch key {MODALITY_MASK_KEY!r} holds {int(bad.sum())} value(s) "
            f"other than 0 and 1 (the first: {mask[row, col]!r} in row {row}, "
            f"column {col}). It marks each modality present (1) or missing (0); "
            "it is not a weight. Threshold it, e.g. "
            "(mask > 0.5).astype('float32')."
        )
