"""The Distiller's task loss: the loss given to `compile`, on the student's logits.

`TaskLoss` wraps what `compile(loss=...)` got (a `keras.losses.Loss`, a loss
function or its name) as one `keras.losses.Loss`, so its reduction, sample
weights and masks (`ignore_class`) are Keras' own, and computes the
per-sample values that decide whether a row is usable once per step.

>>> import keras, numpy as np
>>> task = TaskLoss(keras.losses.SparseCategoricalCrossentropy(from_logits=True))
>>> task.class_range()
(True, None)
>>> y, logits = np.array([0, 1]), np.zeros((2, 3), "float32")
>>> ok = np.array([True, True])
>>> round(float(task(y, logits, np.ones(2, "float32"), ok)), 4)  # log(3)
1.0986
"""

import keras
from keras import ops

from keras_gramkd.bad_samples import finite_rows, where_samples

_FROM_LOGITS_LOSSES = (
    keras.losses.SparseCategoricalCrossentropy,
    keras.losses.CategoricalCrossentropy,
    keras.losses.BinaryCrossentropy,
)


def task_loss_object(loss):
    """The compiled task loss as one `keras.losses.Loss`, or None.

    The student has one output, so the task loss is one loss (a list of one
    is unwrapped). A function or a function's name is wrapped in a `Loss`, as
    Keras' `compile` wraps it.
    """
    if isinstance(loss, (list, tuple)) and len(loss) == 1:
        loss = loss[0]
    if loss is None or isinstance(loss, keras.losses.Loss):
        return loss
    if isinstance(loss, (dict, list, tuple)):
        raise ValueError(
            "The Distiller's student has one output, so compile takes one task "
            f"loss; got {loss!r}. Pass one loss, e.g. "
            "keras.losses.SparseCategoricalCrossentropy(from_logits=True)."
        )
    if str(loss).lower() in ("crossentropy", "ce"):
        raise ValueError(
            f"loss={loss!r} leaves the kind of cross-entropy to be guessed from "
            "the labels' shape; name it: 'sparse_categorical_crossentropy' "
            "(integer labels), 'categorical_crossentropy' (one-hot) or "
            "'binary_crossentropy' (one unit), or pass a keras.losses.Loss."
        )
    function = keras.losses.get(loss)
    if isinstance(function, keras.losses.Loss):
        return function
    name = loss if isinstance(loss, str) else getattr(function, "__name__", None)
    return _FunctionLoss(function, name=name)


class _FunctionLoss(keras.losses.Loss):
    """A loss function `fn(y_true, y_pred)` as a `keras.losses.Loss` (Keras'
    own wrapper is not public): its reduction, weights and masks are Keras'."""

    def __init__(self, fn, name=None):
        super().__init__(name=name)
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


class _Reduced(keras.losses.Loss):
    """Reduces per-sample values already computed by `loss.call` as `loss`
    itself would (its reduction, dtype, the mask its values carry), with the
    skipped rows (y_true 0) replaced by 0."""

    def __init__(self, loss):
        super().__init__(name=loss.name, reduction=loss.reduction, dtype=loss.dtype)

    def call(self, keep, values):
        return ops.where(keep > 0, values, ops.zeros_like(values))


class TaskLoss:
    """The loss `compile` was given, as the Distiller's step uses it.

    Args:
        loss: what `compile(loss=...)` got: a `keras.losses.Loss`, a loss
            function or its name, a list of one of these, or None.
    """

    def __init__(self, loss):
        self.given = loss
        self.loss = task_loss_object(loss)
        self._reducer = None if self.loss is None else _Reduced(self.loss)

    def class_range(self):
        """(True, ignore_class) when the loss is sparse categorical
        cross-entropy, the one loss whose labels are class indices; else
        (False, None)."""
        if isinstance(self.loss, keras.losses.SparseCategoricalCrossentropy):
            return True, self.loss.get_config().get("ignore_class")
        function = getattr(self.loss, "fn", None)  # a function, wrapped as compile does
        if function is keras.losses.sparse_categorical_crossentropy:
            return True, None
        return False, None

    def gradient_safe(self):
        """True when the loss's gradient is finite wherever its input logits
        are, even on a row whose value overflows (Keras' cross-entropies on
        logits: softmax/sigmoid minus the labels)."""
        if not isinstance(self.loss, _FROM_LOGITS_LOSSES):
            return False
        return bool(self.loss.get_config().get("from_logits"))

    def check_rows(self, y, y_pred, ok):
        """(ok, values): `ok` and'ed with "the row's loss is finite", and the
        per-sample values to reduce, or None where they must be computed again
        on the final rows (a loss whose gradient is not safe: a row whose loss
        overflowed must reach the gradient only as the constant it is replaced
        by)."""
        per_sample = getattr(self.loss, "call", None)  # unreduced
        if per_sample is None:
            return ok, None
        labels = ops.cast(where_samples(ok, y), y_pred.dtype)  # as Loss does
        values = per_sample(
            labels, where_samples(ok, y_pred, fill=1.0 / y_pred.shape[-1])
        )
        ok = ops.logical_and(ok, finite_rows(values))
        return ok, values if self.gradient_safe() else None

    def __call__(self, y, y_pred, sample_weight, ok, values=None):
        """The reduced loss of the rows where `ok` (every row where `ok` is
        None), from `values` if given."""
        if y is None:
            raise ValueError(
                "The batch has no labels, but task_weight > 0. Give (x, y) "
                "batches, or set task_weight=0 to learn from the teacher only."
            )
        if self.loss is None:
            raise ValueError(
                "task_weight > 0 needs a task loss: compile(loss=...), for "
                "example keras.losses.SparseCategoricalCrossentropy("
                "from_logits=True); or build the Distiller with task_weight=0."
            )
        # A copy: with a masked loss (ignore_class) Keras' apply_mask does
        # `sample_weight *= mask`, in place on PyTorch, which would reweigh
        # the terms that follow.
        if sample_weight is not None:
            sample_weight = ops.copy(sample_weight)
        if values is not None:  # reduced as the task loss reduces its own
            return self._reducer(ops.cast(ok, values.dtype), values, sample_weight)
        return self.loss(where_samples(ok, y), y_pred, sample_weight)
