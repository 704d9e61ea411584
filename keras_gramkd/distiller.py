"""`Distiller`: a `keras.Model` that trains a student from a frozen teacher.

One training step combines three terms, each with its own non-negative weight:

    loss = task_weight · task_loss      (the compiled loss on the labels)
         + kd_weight   · kd_loss        (`LogitKD`: temperature-softened logits)
         + gram_weight · gram_loss      (`ModalityGram`: modality-level Gram matrices)
         + the student's regularisation losses

The combination lives in `compute_loss`, which the `train_step` and `test_step`
of every Keras backend call, so one implementation serves TensorFlow, JAX and
PyTorch. `call` runs the student once and returns its logits; the modality
embeddings produced by that same call are handed to `compute_loss`, so each
network runs exactly one forward pass per step.

Besides the networks' inputs, a dict batch may carry these keys:

- `"modality_mask"` (`MODALITY_MASK_KEY`): (batch, M) 0/1, which modalities a
  sample has, in the order of `Distiller.modality_names`. The Gram loss then
  averages over present pairs only; the task and KD losses are unaffected.
- `"teacher_logits"` and `"teacher_gram"` (`TEACHER_LOGITS_KEY`,
  `TEACHER_GRAM_KEY`): teacher targets computed once by `keras_gramkd.cache`;
  when they are in the batch the teacher does not run.

A training sample whose inputs hold NaN or inf, or whose integer label is
outside [0, classes), is left out of the step (its inputs are zeroed and its
weight is 0, so it cannot put a NaN into the weights) and counted in the
`skipped_samples` metric. With `on_bad_sample="raise"` (the default) `fit` then
stops with an error after that step; with `"skip"` it goes on.
"""

import difflib
import math
import warnings

import keras
from keras import ops
from keras.src.losses.loss import unscale_loss_for_distribution

from keras_gramkd.layers import ModalityDropout, ModalityStack, stack_modalities
from keras_gramkd.losses import LogitKD, ModalityGram, check_temperature
from keras_gramkd.ops import check_choice, pair_mask

MODALITY_MASK_KEY = "modality_mask"
TEACHER_LOGITS_KEY = "teacher_logits"
TEACHER_GRAM_KEY = "teacher_gram"
BATCH_KEYS = (MODALITY_MASK_KEY, TEACHER_LOGITS_KEY, TEACHER_GRAM_KEY)
BAD_SAMPLE_POLICIES = ("raise", "skip")


def _check_weight(name, value):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(
            f"{name} must be a finite number >= 0; got {value!r}. "
            "Use 0 to switch the term off."
        )
    return float(value)


def _symbolic_output(model, role):
    """The model's single symbolic output, or None for a subclassed model."""
    try:
        output = model.output
    except (AttributeError, ValueError):
        return None
    if isinstance(output, (list, tuple, dict)):
        raise ValueError(
            f"The {role} has {len(output)} outputs; the Distiller needs a model "
            "with one output, the class logits. Wrap it: "
            f"keras.Model({role}.inputs, {role}.outputs[i])."
        )
    return output


def _check_logits_layer(model, role):
    last = model.layers[-1] if getattr(model, "layers", None) else None
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    if isinstance(last, keras.layers.Softmax) or activation in (
        "softmax",
        "log_softmax",
    ):
        raise ValueError(
            f"The {role}'s output layer {last.name!r} applies a softmax, but "
            "distillation needs logits: softened probabilities are formed from "
            "logits / temperature. Build the model with a linear output layer "
            "(activation=None) and compile with from_logits=True, or wrap it: "
            f"keras.Model({role}.inputs, {role}.layers[-1].input) for a "
            "separate Softmax layer."
        )


def _layer_output(model, role, layer_name):
    try:
        layer = model.get_layer(layer_name)
    except ValueError:
        names = [layer.name for layer in model.layers]
        close = difflib.get_close_matches(layer_name, names, n=3, cutoff=0.5)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(
            f"The {role} has no layer named {layer_name!r}.{hint} "
            f"Its layers are: {names}."
        ) from None
    try:
        return layer.output
    except (AttributeError, ValueError) as error:
        raise ValueError(
            f"Layer {layer_name!r} of the {role} has no single symbolic output "
            f"({error}). Name a layer that is called once in the model."
        ) from None


def _input_specs(model):
    """How a model takes its inputs (dict keys, a list of names, one name, or
    None) and the shape each named input declares."""
    try:
        structure = model.input
    except (AttributeError, ValueError):
        return None, {}
    tensors = keras.tree.flatten(structure)
    if isinstance(structure, dict):
        names = dict.fromkeys(structure)
        shapes = {key: tuple(structure[key].shape) for key in structure}
        return names, shapes
    shapes = {tensor.name: tuple(tensor.shape) for tensor in tensors}
    if isinstance(structure, (list, tuple)):
        return [tensor.name for tensor in structure], shapes
    return structure.name, shapes


def _mask_output(model, layer_name, n_modalities):
    """The (batch, M) modality mask that a student layer outputs."""
    output = _layer_output(model, "student", layer_name)
    layer = model.get_layer(layer_name)
    if isinstance(layer, ModalityDropout):
        if not layer.return_mask:
            raise ValueError(
                f"student_mask_layer {layer_name!r} is a ModalityDropout without "
                "return_mask=True; build it with return_mask=True so that it "
                "outputs (views, mask)."
            )
        output = keras.tree.flatten(output)[-1]  # (views, mask)
    if isinstance(output, (list, tuple)) or tuple(output.shape)[1:] != (n_modalities,):
        shape = (
            [tuple(o.shape) for o in output]
            if isinstance(output, (list, tuple))
            else tuple(output.shape)
        )
        raise ValueError(
            f"student_mask_layer {layer_name!r} must output a (batch, "
            f"{n_modalities}) modality mask, one column per modality in the "
            f"order of the student's modalities; it outputs {shape}."
        )
    return output


class _Network:
    """A teacher or a student: which batch keys it reads, and one forward call.

    `forward` returns (logits, features, mask): features is the stacked
    (batch, M, d) modality embedding (or None) and mask the (batch, M) modality
    mask a student layer outputs (or None), from a single call through a
    functional view that shares every layer and weight with the model.
    """

    def __init__(self, model, role):
        self.model = model
        self.role = role
        self.inputs, self.input_shapes = _input_specs(model)
        self.extractor = None
        self.has_mask = False
        self.stacked_modalities = None  # M when the extractor returns M embeddings

    def add_features(self, modalities, names, mask_layer=None):
        logits = _symbolic_output(self.model, self.role)
        if logits is None:
            raise ValueError(
                f"The {self.role} has no symbolic outputs (a subclassed model?), "
                "so its modality layers cannot be read. Build it with the "
                "functional API, or set gram_weight=0."
            )
        if isinstance(modalities, str):
            features = _layer_output(self.model, self.role, modalities)
            if len(features.shape) != 3:
                raise ValueError(
                    f"Layer {modalities!r} of the {self.role} outputs shape "
                    f"{tuple(features.shape)}; a single modality layer must "
                    "output the stacked (batch, M, d) embeddings. Otherwise pass "
                    "a dict modality name -> layer name."
                )
            features = [features]
            n_modalities = features[0].shape[1]
        else:
            features = [
                _layer_output(self.model, self.role, modalities[name]) for name in names
            ]
            try:  # the embeddings are stacked in `forward`, outside the graph
                ModalityStack().compute_output_shape([f.shape for f in features])
            except ValueError as error:
                raise ValueError(f"In the {self.role}: {error}") from None
            n_modalities = self.stacked_modalities = len(features)
        outputs = [logits, *features]
        if mask_layer is not None:
            outputs.append(_mask_output(self.model, mask_layer, n_modalities))
            self.has_mask = True
        self.extractor = keras.Model(
            self.model.input, outputs, name=f"{self.role}_with_features"
        )
        return n_modalities

    def _check_shape(self, key, value):
        expected = self.input_shapes.get(key)
        found = getattr(value, "shape", None)
        if expected is None or found is None:
            return
        found = tuple(found)
        if len(found) != len(expected) or any(
            e is not None and f is not None and e != f
            for e, f in zip(expected[1:], found[1:], strict=False)
        ):
            raise ValueError(
                f"Input {key!r} of the {self.role} has shape {found}, but the "
                f"{self.role} expects {expected} (None: any size). Check which "
                "array the batch holds under this key."
            )

    def select_inputs(self, x):
        if self.inputs is None or not isinstance(x, dict):
            return x
        keys = [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)
        missing = [key for key in keys if key not in x]
        if missing:
            raise ValueError(
                f"The {self.role} expects input(s) {missing}, but the batch has "
                f"keys {sorted(x)}. Give x one entry per model input, named as "
                "the model's keras.Input (or its input dict keys)."
            )
        for key in keys:
            self._check_shape(key, x[key])
        if isinstance(self.inputs, dict):
            return {key: x[key] for key in keys}
        if isinstance(self.inputs, list):
            return [x[key] for key in keys]
        return x[self.inputs]

    def forward(self, x, training):
        inputs = self.select_inputs(x)
        if self.extractor is None:
            return self.model(inputs, training=training), None, None
        logits, *features = self.extractor(inputs, training=training)
        mask = features.pop() if self.has_mask else None
        if self.stacked_modalities is None:
            return logits, features[0], mask
        return logits, stack_modalities(features), mask


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
    """(batch,) bool: True where every float input of the sample is finite."""
    finite = None
    for tensor in filter(_is_float_tensor, keras.tree.flatten(x)):
        ok = ops.isfinite(tensor)
        axes = _sample_axes(tensor)
        ok = ops.all(ok, axis=axes) if axes else ok
        finite = ok if finite is None else ops.logical_and(finite, ok)
    return finite


def _valid_labels(y, n_classes):
    """(batch,) bool: integer labels in [0, n_classes), float labels finite."""
    axes = _sample_axes(y)
    if "int" in keras.backend.standardize_dtype(y.dtype):
        ok = ops.logical_and(y >= 0, y < n_classes)
    else:
        ok = ops.isfinite(y)
    return ops.all(ok, axis=axes) if axes else ok


def _where_samples(ok, tensor):
    """`tensor` with the samples where `ok` is False replaced by zeros."""
    shape = (-1,) + (1,) * (len(tensor.shape) - 1)
    keep = ops.reshape(ok, shape)
    return ops.where(keep, tensor, ops.zeros_like(tensor))


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


def _modality_names(teacher_modalities, student_modalities):
    """The student's modality names, checked against the teacher's."""
    if isinstance(student_modalities, dict) and isinstance(teacher_modalities, dict):
        unknown = [
            name for name in student_modalities if name not in teacher_modalities
        ]
        if unknown:
            raise ValueError(
                f"Student modalities {unknown} are not among the teacher's "
                f"{list(teacher_modalities)}. Modalities align by name: use the "
                "same names in teacher_modalities and student_modalities."
            )
    if isinstance(student_modalities, dict):
        return list(student_modalities)
    if isinstance(teacher_modalities, dict):
        return list(teacher_modalities)
    return None


def _check_modalities(name, value):
    if isinstance(value, str) or (
        isinstance(value, dict)
        and value
        and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    ):
        return dict(value) if isinstance(value, dict) else value
    raise ValueError(
        f"{name} must be a dict modality name -> layer name, or one layer name "
        f"whose output is the stacked (batch, M, d) embeddings; got {value!r}."
    )


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
                "[0, classes). They were left out of the step, so the weights "
                "hold no NaN. Clean the data (np.isfinite on each input, the "
                "label range), or build the Distiller with "
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


@keras.saving.register_keras_serializable(package="keras_gramkd")
class Distiller(keras.Model):
    """Distils a frozen multi-modal teacher into a student.

    Args:
        teacher: trained `keras.Model` that outputs class logits. It is frozen
            and runs in inference mode, outside the gradient.
        student: `keras.Model` to train; outputs class logits.
        teacher_modalities: dict modality name -> name of the teacher layer whose
            output is that modality's embedding, or one layer name whose output
            is already (batch, M, d). Needed when `gram_weight > 0`.
        student_modalities: the same for the student. Modalities align by name;
            the student may use a subset of the teacher's.
        task_weight: weight of the compiled loss on the labels.
        kd_weight: weight of the logit KD term.
        gram_weight: weight of the modality Gram term.
        temperature: KD softening temperature.
        gram_loss: the Gram loss to use; default `ModalityGram(normalize="l2")`.
        student_mask_layer: optional name of a student layer that outputs a
            (batch, M) modality mask, such as
            `ModalityDropout(rate, return_mask=True)`: the Gram loss then
            leaves out the pairs of the modalities it dropped.
        on_bad_sample: `"raise"` (default) stops `fit` with an error after a
            step that met a sample with NaN/inf inputs or an out-of-range
            label; `"skip"` leaves such samples out and goes on. Either way
            they are counted in the `skipped_samples` metric and never reach
            the weights.
        **kwargs: `keras.Model` arguments (`name`, `dtype`).

    Inputs: a dict of arrays (each network gets the keys its inputs declare,
    plus the optional batch keys of this module's docstring), or whatever both
    networks take. `call` and `predict` return the student's logits. Metrics
    `task_loss`, `kd_loss` and `gram_loss` (unweighted) join `loss` in `fit`
    and `evaluate` for every term whose weight is not 0.

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
        kd_weight=1.0,
        gram_weight=1.0,
        temperature=4.0,
        gram_loss=None,
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
        self.task_weight = _check_weight("task_weight", task_weight)
        self.kd_weight = _check_weight("kd_weight", kd_weight)
        self.gram_weight = _check_weight("gram_weight", gram_weight)
        self.temperature = check_temperature(temperature)
        check_choice("on_bad_sample policy", on_bad_sample, BAD_SAMPLE_POLICIES)
        self.on_bad_sample = on_bad_sample
        if gram_loss is not None and not callable(gram_loss):
            raise TypeError(
                "gram_loss must be a loss called as loss(teacher_features, "
                f"student_features), like ModalityGram(); got {gram_loss!r}."
            )
        for role, model in (("teacher", teacher), ("student", student)):
            _check_logits_layer(model, role)
        self._check_classes(teacher, student)

        teacher.trainable = False
        self.teacher = teacher
        self.student = student
        self.kd_loss_fn = LogitKD(self.temperature)
        self.gram_loss_fn = gram_loss if gram_loss is not None else ModalityGram()
        self.teacher_modalities = teacher_modalities
        self.student_modalities = student_modalities
        self.student_mask_layer = student_mask_layer
        self.modality_names = None
        self._teacher = _Network(teacher, "teacher")
        self._student = _Network(student, "student")
        if self.gram_weight > 0:
            self._add_modality_features()

        self.task_loss_tracker = self._tracker_if(self.task_weight, "task_loss")
        self.kd_loss_tracker = self._tracker_if(self.kd_weight, "kd_loss")
        self.gram_loss_tracker = self._tracker_if(self.gram_weight, "gram_loss")
        self.skipped_samples_tracker = keras.metrics.Sum(name="skipped_samples")
        self._forward_cache = _ForwardCache()
        if teacher.built and student.built:
            self.built = True

    @staticmethod
    def _tracker_if(weight, name):
        return keras.metrics.Mean(name=name) if weight > 0 else None

    @staticmethod
    def _check_classes(teacher, student):
        t_out, s_out = (
            _symbolic_output(m, r)
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

    def _add_modality_features(self):
        if self.teacher_modalities is None or self.student_modalities is None:
            raise ValueError(
                "gram_weight > 0 needs teacher_modalities and student_modalities "
                "(dicts modality name -> layer name); pass them or set "
                "gram_weight=0."
            )
        teacher_spec = _check_modalities("teacher_modalities", self.teacher_modalities)
        student_spec = _check_modalities("student_modalities", self.student_modalities)
        names = _modality_names(teacher_spec, student_spec)
        m_student = self._student.add_features(
            student_spec, names, self.student_mask_layer
        )
        m_teacher = self._teacher.add_features(teacher_spec, names)
        if m_teacher != m_student:
            raise ValueError(
                f"The teacher's features have {m_teacher} modalities but the "
                f"student's have {m_student}. Give both as dicts modality name "
                "-> layer name so that they align by name (a student may use a "
                "subset of the teacher's modalities)."
            )
        self.modality_names = names
        if m_student == 1:
            warnings.warn(
                "Only one modality: its Gram matrix is 1×1 (the embedding's "
                "squared norm, always 1 under the default l2 normalisation), so "
                "the Gram term carries no relation between modalities. Name at "
                "least two modality layers, or set gram_weight=0.",
                stacklevel=3,
            )
        if m_student == 2 and getattr(self.gram_loss_fn, "normalize", None) == (
            "centered"
        ):
            warnings.warn(
                "Two modalities under normalize='centered': after removing their "
                "mean the two embeddings are u and -u, so the Gram matrix is "
                "always [[1, -1], [-1, 1]] and the term teaches nothing. Use "
                "ModalityGram(normalize='l2').",
                stacklevel=3,
            )

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

    def call(self, inputs, training=None):
        if inputs is None:  # torch's trainer builds on a missing first batch
            raise ValueError(
                f"The Distiller got no inputs (None). {EMPTY_DATA_MESSAGE}"
            )
        if training:
            ok = _finite_samples(inputs)
            if ok is not None:
                inputs = _zero_bad_samples(inputs, ok)
        logits, features, mask = self._student.forward(inputs, training)
        if features is not None:
            self._forward_cache.put(logits, (features, mask))
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

    def _cached_targets(self, x):
        """Teacher targets carried in the batch, or None to run the teacher."""
        if not isinstance(x, dict) or not any(
            key in x for key in (TEACHER_LOGITS_KEY, TEACHER_GRAM_KEY)
        ):
            return None
        needed = [TEACHER_LOGITS_KEY] if self.kd_weight > 0 else []
        if self.gram_weight > 0:
            needed.append(TEACHER_GRAM_KEY)
            if not isinstance(self.gram_loss_fn, ModalityGram):
                raise ValueError(
                    "Cached teacher Gram matrices need gram_loss to be a "
                    f"ModalityGram; got {type(self.gram_loss_fn).__name__}. "
                    "Train with the live teacher (no cached keys in the batch)."
                )
        missing = [key for key in needed if key not in x]
        if missing:
            raise ValueError(
                f"The batch carries cached teacher targets but lacks {missing}, "
                "which this Distiller's non-zero weights need. Rebuild the cache "
                "with keras_gramkd.cache.TeacherCache.build(distiller, ...) for "
                "this Distiller."
            )
        return x

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        if y_pred is None:
            y_pred = self(x, training=training)
        student_features = student_mask = None
        if self.gram_weight > 0:
            extras = self._forward_cache.take(y_pred)
            if extras is None:  # y_pred was not made by this model's call
                _, *extras = self._student.forward(x, training)
            student_features, student_mask = extras

        ok = _finite_samples(x)
        if y is not None and self.task_weight > 0:
            labels_ok = _valid_labels(y, y_pred.shape[-1])
            ok = labels_ok if ok is None else ops.logical_and(ok, labels_ok)
        if ok is not None:
            self.skipped_samples_tracker.update_state(
                ops.sum(1.0 - ops.cast(ok, "float32"))
            )
            x = _zero_bad_samples(x, ok)
            y_pred = _where_samples(ok, y_pred)
            keep = ops.cast(ok, "float32")
            sample_weight = (
                keep
                if sample_weight is None
                else ops.cast(sample_weight, "float32") * keep
            )
            if student_features is not None:
                student_features = _where_samples(ok, student_features)

        terms = {}
        if self.task_weight > 0:
            terms["task_loss"] = self._task_loss(y, y_pred, sample_weight, ok)
        if self.kd_weight > 0 or self.gram_weight > 0:
            terms.update(
                self._teacher_terms(
                    x, y_pred, student_features, student_mask, sample_weight
                )
            )

        weights = {
            "task_loss": self.task_weight,
            "kd_loss": self.kd_weight,
            "gram_loss": self.gram_weight,
        }
        # Under tf.distribute every term is already divided by the replica
        # count (Keras' convention: summed replica gradients are the global
        # batch's); the metrics report the undivided values, as Keras' do.
        total = ops.zeros((), dtype="float32")
        for name, value in terms.items():
            value = ops.cast(value, "float32")
            getattr(self, f"{name}_tracker").update_state(
                unscale_loss_for_distribution(value)
            )
            total = total + weights[name] * value
        for extra in self.losses:  # the student's regularisation losses
            extra = self._aggregate_additional_loss(ops.cast(extra, "float32"))
            total = total + extra
        return total

    def _task_loss(self, y, y_pred, sample_weight, ok):
        if y is None:
            raise ValueError(
                "The batch has no labels, but task_weight > 0. Give (x, y) "
                "batches, or set task_weight=0 to learn from the teacher only."
            )
        if self._compile_loss is None:
            raise ValueError(
                "task_weight > 0 needs a task loss: compile(loss=...), for "
                "example keras.losses.SparseCategoricalCrossentropy("
                "from_logits=True); or build the Distiller with task_weight=0."
            )
        if ok is not None:
            y = _where_samples(ok, y)
        return self._compile_loss(y, y_pred, sample_weight)

    def _teacher_terms(self, x, y_pred, student_features, student_mask, sample_weight):
        """The KD and Gram terms, from cached targets or a teacher forward."""
        mask = None
        if self.gram_weight > 0:
            mask = self._batch_mask(x, student_mask)
        cached = self._cached_targets(x)
        if cached is None:
            teacher_logits, teacher_features, _ = self._teacher.forward(
                x, training=False
            )
        else:
            teacher_logits = cached.get(TEACHER_LOGITS_KEY)
        terms = {}
        if self.kd_weight > 0:
            terms["kd_loss"] = self.kd_loss_fn(
                ops.stop_gradient(teacher_logits), y_pred, sample_weight=sample_weight
            )
        if self.gram_weight == 0:
            return terms
        if cached is None:
            terms["gram_loss"] = self.gram_loss_fn(
                ops.stop_gradient(teacher_features),
                student_features,
                sample_weight=sample_weight,
                mask=mask,
            )
            return terms
        teacher_gram = ops.cast(cached[TEACHER_GRAM_KEY], "float32")
        if student_mask is not None:
            if self.gram_loss_fn.normalize == "centered":
                raise ValueError(
                    "A cached teacher Gram cannot follow a student_mask_layer "
                    "under normalize='centered' (the centring depends on which "
                    "modalities are present). Use normalize='l2', or train "
                    "with the live teacher."
                )
            teacher_gram = teacher_gram * pair_mask(mask)
        terms["gram_loss"] = self.gram_loss_fn.from_teacher_gram(
            ops.stop_gradient(teacher_gram),
            student_features,
            sample_weight=sample_weight,
            mask=mask,
        )
        return terms

    def teacher_targets(self, x):
        """What the losses need from the teacher for the batch `x`.

        Returns a dict with `TEACHER_LOGITS_KEY` (batch, classes) and, when the
        Gram term is on, `TEACHER_GRAM_KEY` (batch, M, M) formed as the Gram
        loss forms it (with the batch's `modality_mask`). `keras_gramkd.cache`
        stores these so that training need not run the teacher.
        """
        logits, features, _ = self._teacher.forward(x, training=False)
        targets = {TEACHER_LOGITS_KEY: logits}
        if features is not None:
            if not isinstance(self.gram_loss_fn, ModalityGram):
                raise ValueError(
                    "Teacher Gram targets need gram_loss to be a ModalityGram; "
                    f"got {type(self.gram_loss_fn).__name__}."
                )
            targets[TEACHER_GRAM_KEY] = self.gram_loss_fn.gram(
                features, self._batch_mask(x, None)
            )
        return targets

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        return {
            **super().get_config(),
            "teacher": serialize(self.teacher),
            "student": serialize(self.student),
            "teacher_modalities": self.teacher_modalities,
            "student_modalities": self.student_modalities,
            "task_weight": self.task_weight,
            "kd_weight": self.kd_weight,
            "gram_weight": self.gram_weight,
            "temperature": self.temperature,
            "gram_loss": serialize(self.gram_loss_fn),
            "student_mask_layer": self.student_mask_layer,
            "on_bad_sample": self.on_bad_sample,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("teacher", "student", "gram_loss"):
            config[key] = keras.saving.deserialize_keras_object(
                config[key], custom_objects=custom_objects
            )
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
