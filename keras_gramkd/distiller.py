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
"""

import difflib
import math

import keras
from keras import ops

from keras_gramkd.layers import ModalityStack
from keras_gramkd.losses import LogitKD, ModalityGram, check_temperature


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


def _input_names(model):
    """How a model takes its inputs: dict keys, a list of names, one name, or None."""
    try:
        structure = model.input
    except (AttributeError, ValueError):
        return None
    if isinstance(structure, dict):
        return dict.fromkeys(structure)
    if isinstance(structure, (list, tuple)):
        return [tensor.name for tensor in structure]
    return structure.name


class _Network:
    """A teacher or a student: which batch keys it reads, and one forward call.

    `forward` returns (logits, features) where features is the stacked
    (batch, M, d) modality embedding (or None), from a single call through a
    functional view that shares every layer and weight with the model.
    """

    def __init__(self, model, role):
        self.model = model
        self.role = role
        self.inputs = _input_names(model)
        self.extractor = None

    def add_features(self, modalities, names):
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
        else:
            per_modality = [
                _layer_output(self.model, self.role, modalities[name]) for name in names
            ]
            try:
                features = ModalityStack(name=f"{self.role}_modality_stack")(
                    per_modality
                )
            except ValueError as error:
                raise ValueError(f"In the {self.role}: {error}") from None
        self.extractor = keras.Model(
            self.model.input, [logits, features], name=f"{self.role}_with_features"
        )
        return features.shape[1]

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
        if isinstance(self.inputs, dict):
            return {key: x[key] for key in keys}
        if isinstance(self.inputs, list):
            return [x[key] for key in keys]
        return x[self.inputs]

    def forward(self, x, training):
        inputs = self.select_inputs(x)
        if self.extractor is None:
            return self.model(inputs, training=training), None
        logits, features = self.extractor(inputs, training=training)
        return logits, features


class _ForwardCache:
    """Hands the student's modality features from `call` to `compute_loss`.

    Keras' train and test steps compute `y_pred = model(x)` and then pass it to
    `compute_loss` inside the same trace; keeping the features of that call
    here is what lets logits and features come from one forward pass. A plain
    object, so Keras does not track it.
    """

    def __init__(self):
        self._entry = None

    def put(self, logits, features):
        self._entry = (logits, features)

    def take(self, logits):
        entry, self._entry = self._entry, None
        if entry is not None and entry[0] is logits:
            return entry[1]
        return None


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
        **kwargs: `keras.Model` arguments (`name`, `dtype`).

    Inputs: a dict of arrays (each network gets the keys its inputs declare),
    or whatever both networks take. `call` and `predict` return the student's
    logits. Metrics `task_loss`, `kd_loss` and `gram_loss` (unweighted) join
    `loss` in `fit` and `evaluate` for every term whose weight is not 0.

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
    ['gram_loss', 'kd_loss', 'loss', 'task_loss']
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
        self._teacher = _Network(teacher, "teacher")
        self._student = _Network(student, "student")
        if self.gram_weight > 0:
            self._add_modality_features()

        self.task_loss_tracker = self._tracker_if(self.task_weight, "task_loss")
        self.kd_loss_tracker = self._tracker_if(self.kd_weight, "kd_loss")
        self.gram_loss_tracker = self._tracker_if(self.gram_weight, "gram_loss")
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
        m_student = self._student.add_features(student_spec, names)
        m_teacher = self._teacher.add_features(teacher_spec, names)
        if m_teacher != m_student:
            raise ValueError(
                f"The teacher's features have {m_teacher} modalities but the "
                f"student's have {m_student}. Give both as dicts modality name "
                "-> layer name so that they align by name (a student may use a "
                "subset of the teacher's modalities)."
            )

    def call(self, inputs, training=None):
        logits, features = self._student.forward(inputs, training)
        if features is not None:
            self._forward_cache.put(logits, features)
        return logits

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        if y_pred is None:
            y_pred = self(x, training=training)
        student_features = None
        if self.gram_weight > 0:
            student_features = self._forward_cache.take(y_pred)
            if student_features is None:  # y_pred was not made by this model's call
                _, student_features = self._student.forward(x, training)

        terms = {}
        if self.task_weight > 0:
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
            terms["task_loss"] = self._compile_loss(y, y_pred, sample_weight)
        if self.kd_weight > 0 or self.gram_weight > 0:
            teacher_logits, teacher_features = self._teacher.forward(x, training=False)
            if self.kd_weight > 0:
                terms["kd_loss"] = self.kd_loss_fn(
                    ops.stop_gradient(teacher_logits),
                    y_pred,
                    sample_weight=sample_weight,
                )
            if self.gram_weight > 0:
                terms["gram_loss"] = self.gram_loss_fn(
                    ops.stop_gradient(teacher_features),
                    student_features,
                    sample_weight=sample_weight,
                )

        weights = {
            "task_loss": self.task_weight,
            "kd_loss": self.kd_weight,
            "gram_loss": self.gram_weight,
        }
        total = ops.zeros((), dtype="float32")
        for name, value in terms.items():
            value = ops.cast(value, "float32")
            getattr(self, f"{name}_tracker").update_state(value)
            total = total + weights[name] * value
        for extra in self.losses:  # the student's regularisation losses
            total = total + ops.sum(ops.cast(extra, "float32"))
        return total

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
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("teacher", "student", "gram_loss"):
            config[key] = keras.saving.deserialize_keras_object(
                config[key], custom_objects=custom_objects
            )
        return cls(**config)
