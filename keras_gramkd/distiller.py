"""`Distiller`: a `keras.Model` that trains a student from a frozen teacher.

One training step combines the task loss with a list of distillation terms
(`keras_gramkd.terms`), each with its own non-negative weight:

    loss = task_weight · task_loss          (the compiled loss on the labels)
         + Σ term.weight · <term>_loss      (KD, modality Gram at any depth, ...)
         + the student's regularisation losses

The short form (`kd_weight`, `gram_weight`, `temperature`, `gram_loss`) is the
terms `KDTerm` "kd" and `GramTerm` "gram". The combination lives in
`compute_loss`, which the `train_step` and `test_step` of every Keras backend
call, so one implementation serves TensorFlow, JAX and PyTorch. `call` runs
the student once and returns its logits; the features every term reads, from
anywhere in nested encoders, come out of that same call and are handed to
`compute_loss`, so each network runs exactly one forward pass per step.

Besides the networks' inputs, a dict batch may carry these keys:

- `"modality_mask"` (`MODALITY_MASK_KEY`): (batch, M) 0/1, which modalities a
  sample has, in the order of `Distiller.modality_names`. The Gram terms then
  average over present pairs only; the task and KD losses are unaffected.
- `"teacher/<term>/<key>"` (`keras_gramkd.terms.target_key`): teacher targets
  computed once by `keras_gramkd.cache`; when they are in the batch the
  teacher does not run.

A training sample is bad when an input a network reads holds NaN or inf,
its label is not a class (for sparse categorical cross-entropy: not an integer
in [0, classes) nor the loss's `ignore_class`; for any loss: a NaN float
label), its sample or class weight is NaN or inf, a `modality_mask` value is
not 0 or 1, or a network's output, a feature, a teacher target or its task
loss comes out NaN or inf (an overflow inside a network). It is left out of
the step: its inputs are zeroed, every value of it is replaced by 0 with
`where` (so no NaN·0 reaches the gradient) and its weight is 0; it is counted
in the `skipped_samples` metric and, in `evaluate`, left out of the compiled
metrics. With
`on_bad_sample="raise"` (the default) `fit` then stops with an error after
that step; with `"skip"` it goes on. (An overflow inside the student's own
layers is counted too, but its backward pass is NaN already: see
docs/bad_inputs.md.)

Every loss value is Keras' "sum_over_batch_size": sum(w · per-sample loss) /
batch size, for the task loss and every term alike.
"""

import keras
import numpy as np
from keras import ops

# Imported for its registrations: a Distiller saved with relational terms
# (SPTerm, ...) loads wherever the Distiller class does.
from keras_gramkd import relational  # noqa: F401
from keras_gramkd.features import pool_tokens
from keras_gramkd.losses import check_temperature
from keras_gramkd.network import (
    Network,
    check_logits_layer,
    check_separate,
    symbolic_output,
)
from keras_gramkd.ops import check_choice
from keras_gramkd.replicas import scale_for_replicas, unscale_for_replicas
from keras_gramkd.terms import (
    TARGET_PREFIX,
    DistillationTerm,
    GramTerm,
    KDTerm,
    NetworkOutputs,
    check_weight,
    spec_config,
    spec_features,
    target_key,
)

MODALITY_MASK_KEY = "modality_mask"
BAD_SAMPLE_POLICIES = ("raise", "skip")


class _ForwardCache:
    """Hands the student's modality features from `call` to `compute_loss`.

    Keras' train and test steps compute `y_pred = model(x)` and then pass it to
    `compute_loss` inside the same trace; keeping the features of that call
    here is what lets logits and features come from one forward pass. A plain
    object, so Keras does not track it.
    """

    def __init__(self):
        self._entry = None

    def put(self, logits, extras):
        self._entry = (logits, extras)

    def take(self, logits):
        entry, self._entry = self._entry, None
        if entry is not None and entry[0] is logits:
            return entry[1]
        return None


def _sample_axes(tensor):
    return tuple(range(1, len(tensor.shape))) or None


def _finite_samples(x):
    """(batch,) bool: True where every float tensor of the sample is finite.

    Tensors of one dtype whose sample shapes are known are checked as one
    (batch, -1) concatenation: one check instead of one per tensor (on eager
    PyTorch each check is several dispatched operations).
    """
    finite, groups = None, {}
    for tensor in filter(_is_float_tensor, keras.tree.flatten(x)):
        size = _sample_size(tensor)
        if size is None:
            finite = _and(finite, _finite_rows(tensor))
        else:
            key = keras.backend.standardize_dtype(tensor.dtype)
            groups.setdefault(key, []).append(ops.reshape(tensor, (-1, size)))
    for flat in groups.values():
        joined = flat[0] if len(flat) == 1 else ops.concatenate(flat, axis=1)
        finite = _and(finite, _finite_rows(joined))
    return finite


def _sample_size(tensor):
    """The number of values in one sample of `tensor`, or None if unknown."""
    size = 1
    for dim in tensor.shape[1:]:
        if dim is None:
            return None
        size *= int(dim)
    return size if size > 0 else None


def _finite_rows(tensor):
    """(batch,) bool: True where every entry of the sample is finite."""
    ok = ops.isfinite(tensor)
    axes = _sample_axes(tensor)
    return ops.all(ok, axis=axes) if axes else ok


def _and(a, b):
    if a is None:
        return b
    return a if b is None else ops.logical_and(a, b)


def _class_range(loss):
    """(True, ignore_class) when the task loss (a `keras.losses.Loss`) is sparse
    categorical cross-entropy, the one loss whose labels are class indices;
    else (False, None)."""
    if isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
        return True, loss.get_config().get("ignore_class")
    if getattr(loss, "fn", None) is keras.losses.sparse_categorical_crossentropy:
        return True, None  # the function, wrapped as compile wraps it
    return False, None


def _task_loss_object(loss):
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


_FROM_LOGITS_LOSSES = (
    keras.losses.SparseCategoricalCrossentropy,
    keras.losses.CategoricalCrossentropy,
    keras.losses.BinaryCrossentropy,
)


def _gradient_safe(loss):
    """True when the task loss's gradient is finite wherever its input logits
    are, even on a row whose value overflows (Keras' cross-entropies on
    logits: softmax/sigmoid minus the labels). Then one per-sample
    computation serves both the check and the loss; any other loss is
    computed again on the final rows, so that a row whose loss is not finite
    reaches the gradient only as the constant it is replaced by."""
    if not isinstance(loss, _FROM_LOGITS_LOSSES):
        return False
    return bool(loss.get_config().get("from_logits"))


class _Reduced(keras.losses.Loss):
    """Reduces per-sample values already computed by `loss.call` as `loss`
    itself would (its reduction, dtype, the mask its values carry), with the
    skipped rows (y_true 0) replaced by 0."""

    def __init__(self, loss):
        super().__init__(name=loss.name, reduction=loss.reduction, dtype=loss.dtype)

    def call(self, keep, values):
        return ops.where(keep > 0, values, ops.zeros_like(values))


def _input_keys(network, x):
    """The batch keys `network` reads, or None where x is not a dict of them."""
    if network.inputs is None or not isinstance(x, dict):
        return None
    inputs = network.inputs
    keys = [inputs] if isinstance(inputs, str) else list(inputs)
    return keys if all(key in x for key in keys) else None


def _valid_labels(y, n_classes, ignore_class=None):
    """(batch,) bool: sparse class labels integral and in [0, n_classes) (or
    the ignore class); any labels finite."""
    dtype = keras.backend.standardize_dtype(y.dtype)
    if dtype == "bool":
        return None
    if n_classes is None:  # not class labels: only finiteness matters
        return _finite_rows(y) if "float" in dtype else None
    if "float" in dtype:
        ok = ops.logical_and(ops.isfinite(y), ops.equal(y, ops.floor(y)))
        ok = ops.logical_and(ok, ops.logical_and(y >= 0, y < n_classes))
    else:
        ok = ops.logical_and(y >= 0, y < n_classes)
    if ignore_class is not None:
        ok = ops.logical_or(ok, ops.equal(y, ignore_class))
    axes = _sample_axes(y)
    return ops.all(ok, axis=axes) if axes else ok


def _where_samples(ok, tensor, fill=0.0):
    """`tensor` with the samples where `ok` is False replaced by `fill`."""
    if len(tensor.shape) == 0:
        return tensor
    shape = (-1,) + (1,) * (len(tensor.shape) - 1)
    keep = ops.reshape(ok, shape)
    # Not full_like: on PyTorch it reads the fill back from the device.
    if fill == 0:
        return ops.where(keep, tensor, ops.zeros_like(tensor))
    return ops.where(keep, tensor, fill)


def _is_float_tensor(value):
    return (
        hasattr(value, "shape")
        and len(value.shape) > 0
        and "float" in keras.backend.standardize_dtype(value.dtype)
    )


def _zero_bad_samples(x, ok):
    """x with every float input of the samples where `ok` is False zeroed."""
    return keras.tree.map_structure(
        lambda t: _where_samples(ok, t) if _is_float_tensor(t) else t, x
    )


class _SkippedRows(keras.layers.Layer):
    """Marks the skipped samples of `y_pred` with a Keras mask (False), which
    every Keras metric honours, weighted or not: `metrics=["accuracy"]`
    passes no sample weight, so a weight of 0 alone would not leave them out."""

    def call(self, inputs):
        y_pred, ok = inputs
        return _where_samples(ok, y_pred)

    def compute_mask(self, inputs, mask=None):
        return inputs[1]


class _LossMean(keras.metrics.Metric):
    """`keras.metrics.Mean` of one loss value per batch, weighted by the
    batch size: the same result (total / count) with half the operations per
    update (Mean broadcasts and sums its weights for tensors of any shape)."""

    def __init__(self, name):
        super().__init__(name=name)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, value, batch):
        self.total.assign_add(ops.cast(value, self.dtype) * batch)
        self.count.assign_add(batch)

    def result(self):
        return ops.divide_no_nan(self.total, self.count)


class _DataGuard(keras.callbacks.Callback):
    """Stops `fit` after a step that skipped bad samples (unless told to skip),
    and when the training data yields no batch at all.

    `async_safe`: on JAX and PyTorch, Keras runs the batch hooks of async-safe
    callbacks in a worker thread; a callback that is not would make every step
    wait for its logs to reach the host, stalling the device pipeline. The
    error then surfaces a step or so later, or at the end of the epoch at the
    latest; the skipped samples never reach the weights either way.
    """

    async_safe = True

    def __init__(self, on_bad_sample):
        super().__init__()
        self.on_bad_sample = on_bad_sample
        self.epochs_begun = 0
        self.batches = 0
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs_begun += 1
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        skipped = float((logs or {}).get("skipped_samples", 0.0))
        if skipped > 0 and self.on_bad_sample == "raise":
            raise ValueError(
                f"{skipped:.0f} training sample(s) in epoch {self.epoch + 1} up to "
                f"batch {batch + 1} have NaN or inf inputs, or a label outside "
                "[0, classes), a NaN or inf sample or class weight, a "
                "modality_mask value other than 0/1, or a NaN or inf output or "
                "loss (an overflow inside a network). They were left out of the "
                "step, so the weights hold no NaN (unless the student's own "
                "layers overflowed; docs/bad_inputs.md). Clean the data (np.isfinite "
                "on each input and weight, the label range, the input scale), "
                "or build the Distiller with "
                "on_bad_sample='skip' to leave such samples out and count them "
                "in the skipped_samples metric."
            )

    def on_train_end(self, logs=None):
        if self.epochs_begun and not self.batches:
            raise ValueError(EMPTY_DATA_MESSAGE)


EMPTY_DATA_MESSAGE = (
    "The training data yielded no batch: the data set is empty. Check the "
    "data source (for a tf.data.Dataset, that it is not filtered to nothing "
    "and that take()/skip() counts are right)."
)


def _is_empty_source(x):
    """True for a tf.data.Dataset or PyDataset known to hold no batch."""
    cardinality = getattr(x, "cardinality", None)
    if callable(cardinality):
        return int(cardinality()) == 0
    num_batches = getattr(x, "num_batches", None)
    return num_batches == 0


def _check_arrays(x, y):
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


def _check_mask_values(x):
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


@keras.saving.register_keras_serializable(package="keras_gramkd")
def _check_unique_modalities(role, terms, features):
    """Raises when two modalities of one term read the same tensor."""
    for term in terms:
        spec = term.student_spec() if role == "student" else term.teacher_spec()
        if not isinstance(spec, dict):
            continue
        seen = {}
        for name, feature in spec.items():
            if feature.address in seen:
                raise ValueError(
                    f"In term {term.name!r}, the {role}'s modalities "
                    f"{seen[feature.address]!r} and {name!r} both read "
                    f"{feature.address!r}: their embeddings would be one tensor "
                    "and the Gram term meaningless. Give each modality its own "
                    "embedding layer."
                )
            seen[feature.address] = name


def short_form_terms(
    teacher_modalities,
    student_modalities,
    kd_weight,
    gram_weight,
    temperature,
    gram_loss,
):
    """The terms of the Distiller's short form: `KDTerm` "kd", `GramTerm` "gram"."""
    return [
        KDTerm(temperature, weight=kd_weight, name="kd"),
        GramTerm(
            teacher_modalities,
            student_modalities,
            weight=gram_weight,
            loss=gram_loss,
            name="gram",
        ),
    ]


def _check_terms(terms):
    terms = list(terms)
    for term in terms:
        if not isinstance(term, DistillationTerm):
            raise TypeError(
                "terms must be a list of keras_gramkd.DistillationTerm (KDTerm, "
                f"GramTerm, or your subclass); got {type(term).__name__}."
            )
    names = [term.name for term in terms]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"Several terms are named {repeated}; each term needs its own name "
            "(its metric is '<name>_loss'), e.g. GramTerm(..., name='gram_fused')."
        )
    if "task" in names:
        raise ValueError(
            "A term may not be named 'task': 'task_loss' is the metric of the "
            "task loss. Choose another name."
        )
    return terms


def _view(spec, features, pooled):
    """A term's features of one network, from the network's {path: tensor}."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        return features[spec.address]
    view = {}
    for name, feature in spec.items():
        key = (feature.address, feature.pool)
        if key not in pooled:
            pooled[key] = pool_tokens(features[feature.address], feature.pool)
        view[name] = pooled[key]
    return view


def _shapes(spec, shapes):
    if isinstance(spec, dict):
        return {
            name: (shapes[f.address][0], shapes[f.address][-1])
            for name, f in spec.items()
        }
    return shapes[spec.address] if spec is not None else None


@keras.saving.register_keras_serializable(package="keras_gramkd")
class Distiller(keras.Model):
    """Distils a frozen multi-modal teacher into a student.

    Args:
        teacher: trained `keras.Model` that outputs class logits. It is frozen
            and runs in inference mode, outside the gradient.
        student: `keras.Model` to train; outputs class logits.
        teacher_modalities: short form: dict modality name -> address of the
            teacher's embedding of that modality (a layer name, a path
            `"pix_encoder/embed"` into nested models, a layer object, or a
            `Feature` with its token pooling), or one address whose output is
            already (batch, M, d). Needed when `gram_weight > 0`.
        student_modalities: the same for the student. Modalities align by name;
            the student may use a subset of the teacher's.
        task_weight: weight of the compiled loss on the labels.
        kd_weight: short form: weight of the logit KD term (default 1).
        gram_weight: short form: weight of the modality Gram term (default 1).
        temperature: short form: KD softening temperature (default 4).
        gram_loss: short form: the Gram loss; default `ModalityGram()`.
        terms: instead of the short form, a list of `DistillationTerm`s
            (`KDTerm`, `GramTerm` at one or more depths, your own), each with
            its own weight and `<name>_loss` metric. The short form is
            `[KDTerm(temperature, kd_weight, name="kd"),
            GramTerm(teacher_modalities, student_modalities, gram_weight,
            gram_loss, name="gram")]`.
        student_mask_layer: optional address of a student layer that outputs a
            (batch, M) modality mask, such as
            `ModalityDropout(rate, return_mask=True)`: the Gram terms then
            leave out the pairs of the modalities it dropped.
        on_bad_sample: `"raise"` (default) stops `fit` with an error after a
            step that met a bad sample (NaN/inf inputs, weights or outputs,
            a label that is not a class; see the module docstring);
            `"skip"` leaves such samples out and goes on. Either way
            they are counted in the `skipped_samples` metric and never reach
            the weights.
        **kwargs: `keras.Model` arguments (`name`, `dtype`).

    Inputs: a dict of arrays (each network gets the keys its inputs declare,
    plus the optional batch keys of this module's docstring), or whatever both
    networks take. `call` and `predict` return the student's logits. Metrics
    `task_loss` and `<term>_loss` (unweighted) join `loss` in `fit` and
    `evaluate` for every term whose weight is not 0.

    Example:

    >>> import keras, numpy as np
    >>> def net(prefix, width):
    ...     a = keras.Input((4,), name="a")
    ...     b = keras.Input((6,), name="b")
    ...     ea = keras.layers.Dense(width, name=f"{prefix}_a")(a)
    ...     eb = keras.layers.Dense(width, name=f"{prefix}_b")(b)
    ...     logits = keras.layers.Dense(3)(keras.layers.Concatenate()([ea, eb]))
    ...     return keras.Model({"a": a, "b": b}, logits)
    >>> distiller = Distiller(
    ...     teacher=net("t", 16), student=net("s", 4),
    ...     teacher_modalities={"a": "t_a", "b": "t_b"},
    ...     student_modalities={"a": "s_a", "b": "s_b"},
    ... )
    >>> distiller.compile(
    ...     optimizer="adam",
    ...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ... )
    >>> x = {"a": np.ones((8, 4), "float32"), "b": np.ones((8, 6), "float32")}
    >>> history = distiller.fit(x, np.zeros(8, "int32"), epochs=1, verbose=0)
    >>> sorted(history.history)
    ['gram_loss', 'kd_loss', 'loss', 'skipped_samples', 'task_loss']
    """

    def __init__(
        self,
        teacher,
        student,
        teacher_modalities=None,
        student_modalities=None,
        task_weight=1.0,
        kd_weight=None,
        gram_weight=None,
        temperature=None,
        gram_loss=None,
        terms=None,
        student_mask_layer=None,
        on_bad_sample="raise",
        **kwargs,
    ):
        super().__init__(**kwargs)
        for role, model in (("teacher", teacher), ("student", student)):
            if not isinstance(model, keras.Model):
                raise TypeError(
                    f"{role} must be a keras.Model; got {type(model).__name__}."
                )
        self.task_weight = check_weight("task_weight", task_weight)
        check_choice("on_bad_sample policy", on_bad_sample, BAD_SAMPLE_POLICIES)
        self.on_bad_sample = on_bad_sample
        check_separate(teacher, student)
        for role, model in (("teacher", teacher), ("student", student)):
            check_logits_layer(model, role)
        self._check_classes(teacher, student)

        short_form = {
            "teacher_modalities": teacher_modalities,
            "student_modalities": student_modalities,
            "kd_weight": kd_weight,
            "gram_weight": gram_weight,
            "temperature": temperature,
            "gram_loss": gram_loss,
        }
        self.short_form = terms is None
        if terms is None:
            self.kd_weight = check_weight(
                "kd_weight", 1.0 if kd_weight is None else kd_weight
            )
            self.gram_weight = check_weight(
                "gram_weight", 1.0 if gram_weight is None else gram_weight
            )
            self.temperature = check_temperature(
                4.0 if temperature is None else temperature
            )
            terms = short_form_terms(
                teacher_modalities,
                student_modalities,
                self.kd_weight,
                self.gram_weight,
                self.temperature,
                gram_loss,
            )
        else:
            given = [key for key, value in short_form.items() if value is not None]
            if given:
                raise ValueError(
                    f"Pass either terms=[...] or the short form, not both: got "
                    f"terms and {given}. Put these settings in the terms, e.g. "
                    "KDTerm(temperature=4.0, weight=1.0), GramTerm("
                    "teacher_features, student_features, weight=1.0)."
                )
            self.kd_weight = self.gram_weight = self.temperature = None
        self.teacher_modalities = teacher_modalities
        self.student_modalities = student_modalities
        self.terms = _check_terms(terms)
        self.student_mask_layer = student_mask_layer

        teacher.trainable = False
        self.teacher = teacher
        self.student = student
        self._teacher = Network(teacher, "teacher")
        self._student = Network(student, "student")
        self._active = [term for term in self.terms if term.weight > 0]
        self.modality_names = self._collect_modality_names()
        self._add_features()

        self.task_loss_tracker = (
            _LossMean(name="task_loss") if self.task_weight > 0 else None
        )
        self.term_trackers = [
            _LossMean(name=f"{term.name}_loss") for term in self._active
        ]
        self.skipped_samples_tracker = keras.metrics.Sum(name="skipped_samples")
        self._forward_cache = _ForwardCache()
        self._inputs_cache = _ForwardCache()
        self._ok_cache = _ForwardCache()
        self._task_loss_fn = self._task_loss_given = None  # set by compile
        self._task_reducer = None
        self._compiled_metrics = False
        # One instance: a layer made inside a step breaks torch.compile and
        # costs a layer construction per step.
        self._skipped_rows = _SkippedRows(name="skipped_rows")
        if teacher.built and student.built:
            self.built = True

    @staticmethod
    def _check_classes(teacher, student):
        t_out, s_out = (
            symbolic_output(m, r)
            for m, r in ((teacher, "teacher"), (student, "student"))
        )
        if t_out is None or s_out is None:
            return
        t_classes, s_classes = t_out.shape[-1], s_out.shape[-1]
        if t_classes is not None and s_classes is not None and t_classes != s_classes:
            raise ValueError(
                f"The teacher outputs {t_classes} classes but the student outputs "
                f"{s_classes}; both must predict the same classes (give the "
                f"student a final Dense({t_classes}))."
            )

    def _collect_modality_names(self):
        names = []
        for term in self._active:
            if term.uses_mask:
                names.extend(n for n in term.modality_names or [] if n not in names)
        return names or None

    def _add_features(self):
        """Resolves every term's features; one extractor per network."""
        features = {"teacher": [], "student": []}
        for term in self._active:
            features["teacher"] += spec_features(term.teacher_spec())
            features["student"] += spec_features(term.student_spec())
        # The mask only acts on terms that take it: with those off (a KD-only
        # run of a student built with ModalityDropout) there is nothing to mask.
        uses_mask = any(term.uses_mask for term in self._active)
        mask_layer = self.student_mask_layer if uses_mask else None
        t_shapes = self._teacher.add_features(features["teacher"])
        s_shapes = self._student.add_features(features["student"], mask_layer)
        for role, feats in features.items():
            _check_unique_modalities(role, self._active, feats)
        n_modalities = len(self.modality_names or [])
        for term in self._active:
            term.check_features(
                _shapes(term.teacher_spec(), t_shapes),
                _shapes(term.student_spec(), s_shapes),
            )
            spec = term.student_spec()
            if term.uses_mask and spec is not None and not isinstance(spec, dict):
                n_modalities = n_modalities or s_shapes[spec.address][1]
        if self._student.mask_path is not None:
            self._student.check_mask(n_modalities)

    def compile(self, optimizer="rmsprop", loss=None, *args, **kwargs):
        """`keras.Model.compile`; `loss` is the task loss on the student's
        logits (one loss: the student has one output), weighed by
        `task_weight` (so `loss_weights` is refused)."""
        if kwargs.get("loss_weights") is not None:
            raise ValueError(
                "The Distiller weighs its task loss by task_weight; build it with "
                "task_weight=... instead of passing loss_weights to compile."
            )
        self._task_loss_fn = _task_loss_object(loss)
        self._task_loss_given = loss
        self._task_reducer = (
            None if self._task_loss_fn is None else _Reduced(self._task_loss_fn)
        )
        metrics = kwargs.get("metrics", args[1] if len(args) > 1 else None)
        weighted = kwargs.get("weighted_metrics", args[2] if len(args) > 2 else None)
        self._compiled_metrics = bool(metrics or weighted)
        # Keras itself gets no loss: compute_loss applies the task loss, and a
        # compiled loss Keras never calls would stay unbuilt and cost a
        # symbolic build at every fit.
        super().compile(optimizer, None, *args, **kwargs)

    def get_compile_config(self):
        """`keras.Model.get_compile_config`, with the task loss given."""
        config = super().get_compile_config()
        if config is not None:
            config["loss"] = keras.saving.serialize_keras_object(self._task_loss_given)
        return config

    def compile_from_config(self, config):
        """Compiles from a saved file's config, as `keras.Model` does for
        models that keep its `compile` (Keras skips models that override it)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        **kwargs,
    ):
        """`keras.Model.fit`, plus the data checks described in the class."""
        _check_arrays(x, y)
        _check_mask_values(x)
        if _is_empty_source(x):
            raise ValueError(EMPTY_DATA_MESSAGE)
        try:
            return super().fit(
                x,
                y,
                batch_size=batch_size,
                epochs=epochs,
                verbose=verbose,
                callbacks=[*(callbacks or []), _DataGuard(self.on_bad_sample)],
                **kwargs,
            )
        except StopIteration:  # JAX's trainer peeks at a first batch
            raise ValueError(EMPTY_DATA_MESSAGE) from None

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.evaluate`, plus the `modality_mask` value check."""
        _check_mask_values(x)
        return super().evaluate(x, y, *args, **kwargs)

    def call(self, inputs, training=None):
        if inputs is None:  # torch's trainer builds on a missing first batch
            raise ValueError(
                f"The Distiller got no inputs (None). {EMPTY_DATA_MESSAGE}"
            )
        ok = None
        if training:  # only the inputs the student reads: other keys may hold NaN
            selected = self._student.select_inputs(inputs)
            ok = _finite_samples(selected)
            if ok is not None:
                inputs = _zero_bad_samples(inputs, ok)
        logits, features, mask = self._student.forward(inputs, training)
        # compute_loss reads the features, and the input check made here, from
        # this same call: each is computed once per step.
        if self._student.extractor is not None:
            self._forward_cache.put(logits, (features, mask))
        self._inputs_cache.put(logits, (ok, inputs))
        return logits

    def _batch_mask(self, x, student_mask):
        """The (batch, M) modality mask: the batch's and the student layer's."""
        mask = x.get(MODALITY_MASK_KEY) if isinstance(x, dict) else None
        if mask is not None:
            m = len(self.modality_names or []) or None
            if len(mask.shape) != 2 or (m and mask.shape[-1] not in (None, m)):
                raise ValueError(
                    f"Batch key {MODALITY_MASK_KEY!r} has shape "
                    f"{tuple(mask.shape)}; it must be (batch, {m}), one 0/1 "
                    f"column per modality in the order {self.modality_names}."
                )
            mask = ops.cast(mask, "float32")
        if student_mask is not None:
            student_mask = ops.cast(student_mask, "float32")
            mask = student_mask if mask is None else mask * student_mask
        return mask

    def _term_mask(self, term, mask):
        """The columns of the modality mask that belong to a term."""
        if mask is None or not term.uses_mask:
            return None
        names = term.modality_names
        if names is None or names == self.modality_names:
            return mask
        indices = [self.modality_names.index(name) for name in names]
        return ops.take(mask, indices, axis=1)

    def _cached_targets(self, x):
        """{term name: targets} carried in the batch, or None to run the teacher."""
        if not isinstance(x, dict) or not any(
            str(key).startswith(TARGET_PREFIX) for key in x
        ):
            return None
        cached = {}
        for term in self._active:
            prefix = target_key(term.name, "")
            targets = {
                key[len(prefix) :]: value
                for key, value in x.items()
                if str(key).startswith(prefix)
            }
            if not targets:
                raise ValueError(
                    "The batch carries cached teacher targets but none for "
                    f"term {term.name!r} (keys '{prefix}...'). Rebuild the "
                    "cache with keras_gramkd.cache.TeacherCache.build("
                    "distiller, ...) for this Distiller."
                )
            term.check_cached(self._student.mask_path is not None)
            cached[term.name] = targets
        return cached

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        if y_pred is None:
            y_pred = self(x, training=training)
        features, student_mask = {}, None
        if self._student.extractor is not None:
            extras = self._forward_cache.take(y_pred)
            if extras is None:  # y_pred was not made by this model's call
                _, *extras = self._student.forward(x, training)
            features, student_mask = extras
        # The check of the student's inputs that call made, and its inputs.
        inputs_ok, inputs = self._inputs_cache.take(y_pred) or (None, x)
        if y is not None and keras.backend.standardize_dtype(y.dtype) == "bool":
            y = ops.cast(y, "float32")  # as Keras' losses take them

        # A sample is bad when anything it feeds a loss is not finite: an input
        # a network reads, its label or weight, a network's output for it, or
        # its task loss. It is left out with where() (never NaN·0) and weight 0.
        cached = self._cached_targets(x) if self._active else None
        if sample_weight is not None:
            sample_weight = ops.cast(sample_weight, "float32")
        ok = self._data_ok(x, y, y_pred, sample_weight, cached, inputs_ok)
        task = self.task_weight > 0 and y is not None
        ok = _and(ok, _finite_samples(features))
        if cached is None and self._active:
            teacher = self._teacher.forward(
                self._teacher_inputs(x, ok, inputs_ok, inputs), training=False
            )
            ok = _and(ok, _finite_samples(teacher[:2]))
        else:
            teacher = None
            ok = _and(ok, _finite_samples(cached))
        values = None  # the per-sample task loss, when computed once for both uses
        if task:
            per_sample = getattr(self._task_loss_fn, "call", None)  # unreduced
            if per_sample is not None:
                labels = ops.cast(_where_samples(ok, y), y_pred.dtype)  # as Loss does
                values = per_sample(
                    labels, _where_samples(ok, y_pred, fill=1.0 / y_pred.shape[-1])
                )
                ok = ops.logical_and(ok, _finite_rows(values))
                if not _gradient_safe(self._task_loss_fn):
                    values = None  # computed again on the final rows below

        self.skipped_samples_tracker.update_state(
            ops.sum(1.0 - ops.cast(ok, "float32"))
        )
        self._ok_cache.put(y_pred, ok)
        if isinstance(x, dict) and x.get(MODALITY_MASK_KEY) is not None:
            # The only key of x read below (inputs went to the networks above).
            x = {**x, MODALITY_MASK_KEY: _where_samples(ok, x[MODALITY_MASK_KEY])}
        # 1/C, not 0: a skipped row must give a finite loss even where the
        # task loss takes probabilities (0/0 in a from_logits=False CE).
        y_pred = _where_samples(ok, y_pred, fill=1.0 / y_pred.shape[-1])
        keep = ops.cast(ok, "float32")
        sample_weight = (
            keep if sample_weight is None else _where_samples(ok, sample_weight)
        )
        features = keras.tree.map_structure(lambda v: _where_samples(ok, v), features)
        if teacher is not None:
            teacher = keras.tree.map_structure(
                lambda v: _where_samples(ok, v), teacher[:2]
            )
        if cached is not None:
            cached = keras.tree.map_structure(lambda v: _where_samples(ok, v), cached)

        # Every value is Keras' sum(w · loss) / batch; the trackers weigh each
        # batch by its size, as Keras' own loss tracker does, so that
        # evaluate's task_loss equals student.evaluate's loss.
        # Under tf.distribute every term is already divided by the replica
        # count (Keras' convention: summed replica gradients are the global
        # batch's); the metrics report the undivided values, as Keras' do.
        batch = ops.cast(ops.shape(y_pred)[0], "float32")
        total = ops.zeros((), dtype="float32")
        if self.task_weight > 0:
            value = self._task_loss(y, y_pred, sample_weight, ok, values)
            value = ops.cast(value, "float32")
            self.task_loss_tracker.update_state(unscale_for_replicas(value), batch)
            total = total + self.task_weight * value
        if self._active:
            losses = self._term_losses(
                x, y_pred, features, student_mask, sample_weight, teacher, cached
            )
            for term, tracker, value in zip(
                self._active, self.term_trackers, losses, strict=True
            ):
                value = ops.cast(value, "float32")
                tracker.update_state(unscale_for_replicas(value), batch)
                total = total + term.weight * value
        for extra in self.losses:  # the student's regularisation losses
            # Summed and scaled for replicas, as Keras' TensorFlow trainer does.
            extra = scale_for_replicas(ops.sum(ops.cast(extra, "float32")))
            total = total + extra
        return total

    def _data_ok(self, x, y, y_pred, sample_weight, cached, inputs_ok=None):
        """(batch,) bool from what a step's data shows: the inputs the
        networks read, the mask values, the labels, the weights, the output.

        `inputs_ok`: the check of the student's inputs that `call` made; then
        only the inputs the teacher alone reads are checked here.
        """
        student_keys = _input_keys(self._student, x)
        if inputs_ok is None or student_keys is None:
            ok = _finite_samples(self._student.select_inputs(x))
        else:
            ok = inputs_ok
        if self._active and cached is None:
            teacher_x = self._teacher.select_inputs(x)
            teacher_keys = _input_keys(self._teacher, x)
            if inputs_ok is not None and None not in (student_keys, teacher_keys):
                teacher_x = [x[k] for k in teacher_keys if k not in student_keys]
            ok = _and(ok, _finite_samples(teacher_x))
        ok = _and(ok, self._mask_values_ok(x))
        if self.task_weight > 0 and y is not None:
            is_sparse, ignore_class = _class_range(self._task_loss_fn)
            n_classes = y_pred.shape[-1] if is_sparse else None
            ok = _and(ok, _valid_labels(y, n_classes, ignore_class))
        if sample_weight is not None:
            ok = _and(ok, _finite_rows(sample_weight))
        return _and(ok, _finite_rows(y_pred))

    def _teacher_inputs(self, x, ok, inputs_ok, cleaned):
        """The teacher's inputs with the bad samples zeroed; where it reads
        the student's keys, the student's inputs that `call` cleaned."""
        t_keys, s_keys = (_input_keys(n, x) for n in (self._teacher, self._student))
        if inputs_ok is None or t_keys is None or s_keys is None:
            return _zero_bad_samples(self._teacher.select_inputs(x), ok)
        batch = {}
        for key in t_keys:
            if key in s_keys:
                batch[key] = cleaned[key]
            elif _is_float_tensor(x[key]):
                batch[key] = _where_samples(ok, x[key])
            else:
                batch[key] = x[key]
        return self._teacher.select_inputs(batch)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """Keras' metrics, with the samples `compute_loss` skipped left out
        (weight 0, and their labels and outputs zeroed so no NaN enters)."""
        # On JAX, compute_loss ran inside the gradient's trace and y_pred is a
        # new array here: the cache misses and the checks are made again below
        # (carrying them out would mean overriding the JAX trainer's
        # non-public compute_loss_and_updates).
        ok = self._ok_cache.take(y_pred)
        if not self._compiled_metrics:
            # Nothing but the trackers (updated in compute_loss) to report: the
            # masking below would be work for no metric.
            return super().compute_metrics(x, y, y_pred, sample_weight)
        if ok is None:  # y_pred was not made in this step's compute_loss
            if y is not None and keras.backend.standardize_dtype(y.dtype) == "bool":
                y = ops.cast(y, "float32")
            cached = self._cached_targets(x) if self._active else None
            weight = None
            if sample_weight is not None:
                weight = ops.cast(sample_weight, "float32")
            ok = self._data_ok(x, y, y_pred, weight, cached)
        if ok is not None:
            y_pred = self._skipped_rows((y_pred, ok))
            if y is not None:
                y = keras.tree.map_structure(lambda v: _where_samples(ok, v), y)
            keep = ops.cast(ok, "float32")
            sample_weight = (
                keep
                if sample_weight is None
                else _where_samples(ok, ops.cast(sample_weight, "float32"))
            )
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def _mask_values_ok(self, x):
        """(batch,) bool: the batch's modality_mask holds only 0 and 1."""
        mask = x.get(MODALITY_MASK_KEY) if isinstance(x, dict) else None
        if mask is None or not self.modality_names:
            return None
        if keras.backend.standardize_dtype(mask.dtype) == "bool":
            return None
        ok = ops.logical_or(ops.equal(mask, 0), ops.equal(mask, 1))
        return ops.all(ok, axis=_sample_axes(mask))

    def _task_loss(self, y, y_pred, sample_weight, ok, values=None):
        if y is None:
            raise ValueError(
                "The batch has no labels, but task_weight > 0. Give (x, y) "
                "batches, or set task_weight=0 to learn from the teacher only."
            )
        if self._task_loss_fn is None:
            raise ValueError(
                "task_weight > 0 needs a task loss: compile(loss=...), for "
                "example keras.losses.SparseCategoricalCrossentropy("
                "from_logits=True); or build the Distiller with task_weight=0."
            )
        # A copy: with a masked loss (ignore_class) Keras' apply_mask does
        # `sample_weight *= mask`, in place on PyTorch, which would reweigh
        # the terms that follow.
        if values is not None:  # reduced as the task loss reduces its own
            return self._task_reducer(
                ops.cast(ok, values.dtype), values, ops.copy(sample_weight)
            )
        return self._task_loss_fn(
            _where_samples(ok, y), y_pred, ops.copy(sample_weight)
        )

    def _term_losses(
        self, x, y_pred, features, student_mask, sample_weight, teacher, cached
    ):
        """Each active term's loss, from cached targets or the teacher's outputs."""
        mask = None
        if any(term.uses_mask for term in self._active):
            mask = self._batch_mask(x, student_mask)
        if cached is None:
            teacher_logits, teacher_features = teacher
        teacher_pooled, student_pooled, losses = {}, {}, []
        for term in self._active:
            term_mask = self._term_mask(term, mask)
            if cached is None:
                outputs = NetworkOutputs(
                    teacher_logits,
                    _view(term.teacher_spec(), teacher_features, teacher_pooled),
                )
                targets = term.teacher_targets(outputs, term_mask)
            else:
                targets = cached[term.name]
            targets = {k: ops.stop_gradient(v) for k, v in targets.items()}
            student = NetworkOutputs(
                y_pred, _view(term.student_spec(), features, student_pooled)
            )
            losses.append(term.loss(targets, student, sample_weight, term_mask))
        return losses

    def teacher_targets(self, x):
        """What the terms need from the teacher for the batch `x`.

        Returns a dict batch key (`"teacher/<term>/<key>"`) -> per-sample
        tensor, for every term whose weight is not 0, formed as the terms form
        them (with the batch's `modality_mask`). `keras_gramkd.cache` stores
        these so that training need not run the teacher.
        """
        logits, features, _ = self._teacher.forward(x, training=False)
        mask = self._batch_mask(x, None) if self.modality_names else None
        targets, pooled = {}, {}
        for term in self._active:
            teacher = NetworkOutputs(
                logits, _view(term.teacher_spec(), features, pooled)
            )
            term_targets = term.teacher_targets(teacher, self._term_mask(term, mask))
            for key, value in term_targets.items():
                targets[target_key(term.name, key)] = value
        return targets

    def target_settings(self):
        """What cached targets depend on besides the teacher's weights."""
        return {term.name: term.target_settings() for term in self._active}

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        config = {
            **super().get_config(),
            "teacher": serialize(self.teacher),
            "student": serialize(self.student),
            "task_weight": self.task_weight,
            "student_mask_layer": self.student_mask_layer,
            "on_bad_sample": self.on_bad_sample,
        }
        if not self.short_form:
            return {**config, "terms": [serialize(term) for term in self.terms]}
        kd, gram = self.terms
        return {
            **config,
            "teacher_modalities": spec_config(gram.teacher_features),
            "student_modalities": spec_config(gram.student_features),
            "kd_weight": self.kd_weight,
            "gram_weight": self.gram_weight,
            "temperature": self.temperature,
            "gram_loss": serialize(gram.gram_loss),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("teacher", "student", "gram_loss"):
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects
                )
        if config.get("terms") is not None:
            config["terms"] = [
                keras.saving.deserialize_keras_object(t, custom_objects=custom_objects)
                for t in config["terms"]
            ]
        return cls(**config)

    def save(self, filepath, overwrite=True, zipped=None, **kwargs):
        """`keras.Model.save`, writing a local `.keras` file atomically.

        The file is written to a temporary file in the same directory, synced
        to disk and renamed over `filepath` (`keras_gramkd.saving.atomic_save`),
        so an error or a kill mid-write never replaces a good file with a
        truncated one. Remote paths, `zipped=False` and `overwrite=False` on an
        existing file go to Keras unchanged.
        """
        from keras_gramkd.saving import atomic_save, can_save_atomically

        save = super().save
        if zipped is False or not can_save_atomically(
            filepath, overwrite, suffix=(".keras", ".h5", ".hdf5")
        ):
            return save(filepath, overwrite=overwrite, zipped=zipped, **kwargs)
        return atomic_save(
            filepath, lambda tmp: save(tmp, overwrite=True, zipped=zipped, **kwargs)
        )

    def save_weights(self, filepath, overwrite=True, max_shard_size=None):
        """`keras.Model.save_weights`, writing a local `.weights.h5` atomically.

        As `save`: `ModelCheckpoint(save_weights_only=True)` and
        `BackupAndRestore` call it, so their weight files are never left
        half-written. Sharded saves (`max_shard_size`), remote paths and
        `overwrite=False` on an existing file go to Keras unchanged.
        """
        from keras_gramkd.saving import atomic_save, can_save_atomically

        save_weights = super().save_weights
        if max_shard_size is not None or not can_save_atomically(
            filepath, overwrite, suffix=".weights.h5"
        ):
            return save_weights(
                filepath, overwrite=overwrite, max_shard_size=max_shard_size
            )
        return atomic_save(filepath, lambda tmp: save_weights(tmp, overwrite=True))
