"""Distillation terms: what each reads from the two networks, and its loss.

A `Distiller` trains the student on the task loss plus a list of terms, each
with its own non-negative weight and its own `<name>_loss` metric:

    loss = task_weight · task_loss + Σ_term term.weight · term.loss(...)

A term says which features it reads from each network (`teacher_features`,
`student_features`: one address, or a dict modality name -> address; see
`keras_gramkd.features`). Each step the `Distiller` runs each network once,
hands every term a `NetworkOutputs` of each side, and

1. `teacher_targets(teacher, mask)` turns the teacher's outputs into the
   per-sample targets the loss needs (a dict of (batch, ...) tensors);
2. `loss(targets, student, sample_weight, mask)` compares them with the
   student's outputs and returns a scalar.

Because the targets are all a term needs from the teacher,
`keras_gramkd.cache.TeacherCache` stores them without knowing the term's
class, under the batch keys `"teacher/<term name>/<target key>"`.

Features given as a dict reach the term pooled to (batch, d) per modality
(`Feature.pool`, "mean" by default); a single address reaches it as the
layer outputs it, or pooled to (batch, d) when its `Feature` names a pool.
Terms are Keras layers, so a term may own weights (a regressor, say): they
train with the student and are never part of the saved or exported student.

Example, a user's own term (cosine distance of the fused embeddings):

>>> import keras
>>> from keras import ops
>>> from keras_gramkd.terms import DistillationTerm
>>> class CosineEmbedding(DistillationTerm):
...     def teacher_targets(self, teacher, mask=None):
...         return {"direction": ops.normalize(teacher.features, axis=-1)}
...     def loss(self, targets, student, sample_weight=None, mask=None):
...         cosine = ops.sum(
...             targets["direction"] * ops.normalize(student.features, axis=-1), -1)
...         return self.reduce(1.0 - cosine, sample_weight)
>>> term = CosineEmbedding(
...     teacher_features="t_fused", student_features="s_fused", name="cosine")
>>> term.name, term.weight
('cosine', 1.0)
"""

import warnings

import keras
from keras import ops

from keras_gramkd import ops as kd_ops
from keras_gramkd.checks import check_number
from keras_gramkd.features import Feature, as_feature
from keras_gramkd.layers import stack_modalities
from keras_gramkd.losses import LogitKD, ModalityGram, check_temperature
from keras_gramkd.replicas import scale_for_replicas

TARGET_PREFIX = "teacher/"
"""Batch keys of cached teacher targets: `TARGET_PREFIX + term + "/" + key`."""


def check_weight(name, value):
    """Returns `value` as a float; raises unless it is finite and >= 0."""
    return check_number(name, value, 0, hint="Use 0 to switch the term off.")


def target_key(term_name, key):
    """The batch key under which a cached target of a term travels."""
    return f"{TARGET_PREFIX}{term_name}/{key}"


def as_spec(spec, what):
    """None, one `Feature`, or a dict modality name -> `Feature`."""
    if spec is None:
        return None
    if isinstance(spec, dict) and not set(spec) <= {"address", "pool", "pooling"}:
        if not spec or not all(isinstance(k, str) and k for k in spec):
            raise ValueError(
                f"{what} must map modality names (non-empty strings) to "
                f"feature addresses; got {spec!r}."
            )
        return {name: _feature(value, what, True) for name, value in spec.items()}
    return _feature(spec, what, False)


def _feature(value, what, modality):
    try:
        return as_feature(value, modality)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None


def spec_config(spec):
    """The JSON-able form of a spec (`as_spec` reads it back)."""
    if spec is None:
        return None
    if isinstance(spec, dict):
        return {name: feature.get_config() for name, feature in spec.items()}
    return spec.get_config()


def spec_features(spec):
    """The `Feature`s of a spec, as a list."""
    if spec is None:
        return []
    return list(spec.values()) if isinstance(spec, dict) else [spec]


class NetworkOutputs:
    """What one network gives a term in one step.

    Attributes:
        logits: (batch, classes), the network's output.
        features: the term's features: a dict modality name -> (batch, d)
            tensor (pooled) when the term names modalities, the layer's output
            (pooled to (batch, d) if its `Feature` names a pool) when it names
            one address, None when it names none.
    """

    def __init__(self, logits, features=None):
        self.logits = logits
        self.features = features


@keras.saving.register_keras_serializable(package="keras_gramkd")
class TermWeight(keras.layers.Layer):
    """A term's weight as a non-trainable float32 scalar variable.

    The training step reads the variable, so a weight changed after the
    Distiller is built (between fits, or by a callback) is honoured on every
    backend without retracing. A file saved before terms kept their weight as
    a variable holds no value for it: loading keeps the weight of the config.
    """

    def __init__(self, value, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.variable = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(value),
            trainable=False,
            name="value",
        )
        self.built = True

    def load_own_variables(self, store):
        if len(store.keys()):
            super().load_own_variables(store)


@keras.saving.register_keras_serializable(package="keras_gramkd")
class DistillationTerm(keras.layers.Layer):
    """Base class of a distillation term; subclass it to add your own.

    Args:
        weight: non-negative weight of the term. A term whose weight is 0 when
            the Distiller is built is left out of its step (nothing computed);
            any other weight may change later (`term.weight = 0.5`, also from
            a callback) and the step follows it.
        teacher_features: what the term reads from the teacher: None, one
            feature address (a layer name, a path `"encoder/embed"`, a layer
            object or a `Feature`), or a dict modality name -> address.
        student_features: the same for the student.
        name: the term's name; its metric is `<name>_loss`.

    Override `loss` (and `teacher_targets` unless the teacher's logits, or
    its features, are the targets). Use `self.reduce` for per-sample values so
    that the term follows the Distiller's reduction (and replica scaling).
    """

    uses_mask = False
    """Whether the term takes the (batch, M) modality mask."""

    def __init__(
        self,
        weight=1.0,
        teacher_features=None,
        student_features=None,
        name=None,
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.loss_weight = TermWeight(self._checked_weight(weight), name="weight")
        self.teacher_features = as_spec(
            teacher_features, f"teacher_features of term {self.name!r}"
        )
        self.student_features = as_spec(
            student_features, f"student_features of term {self.name!r}"
        )
        self.in_distiller = False
        """True once a Distiller has taken the term: it belongs to that one."""
        # A term is never called as a layer: it has nothing for Keras to build,
        # and an unbuilt one would make Keras trace the Distiller symbolically
        # (one extra student call) at every fit and evaluate. A term with
        # weights creates them in check_features (see FitNetTerm).
        self.built = True

    def _checked_weight(self, value):
        return check_weight(f"The weight of term {self.name!r}", value)

    @property
    def weight(self):
        """The term's weight, a float >= 0 (the value of `loss_weight`)."""
        return float(ops.convert_to_numpy(self.loss_weight.variable))

    @weight.setter
    def weight(self, value):
        self.loss_weight.variable.assign(self._checked_weight(value))

    def teacher_spec(self):
        """The teacher features this term reads (by default all it names)."""
        return self.teacher_features

    def student_spec(self):
        """The student features this term reads."""
        return self.student_features

    @property
    def modality_names(self):
        """The modality names of the student's features, or None."""
        spec = self.student_spec()
        return list(spec) if isinstance(spec, dict) else None

    def check_features(self, teacher_shapes, student_shapes):
        """Called once with the features' shapes (the specs' structure);
        raises when they cannot work. The default accepts any."""

    def check_cached(self, has_student_mask):
        """Raises when cached targets cannot serve this term; default: they can."""

    def teacher_targets(self, teacher, mask=None):
        """Per-sample targets from the teacher's `NetworkOutputs`.

        Default: `{"logits": teacher.logits}` when the term names no teacher
        features, else `{"features": teacher.features}` (a dict spec's
        features as `"features/<modality>"`).
        """
        features = teacher.features
        if features is None:
            return {"logits": teacher.logits}
        if isinstance(features, dict):
            return {f"features/{name}": value for name, value in features.items()}
        return {"features": features}

    def loss(self, targets, student, sample_weight=None, mask=None):
        """The term's scalar loss for a batch.

        Args:
            targets: the dict `teacher_targets` returned (live or cached).
            student: the student's `NetworkOutputs`.
            sample_weight: (batch,) weights (0 for skipped samples), or None.
            mask: (batch, M) 0/1 modality mask, for terms with `uses_mask`.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement loss(targets, student, "
            "sample_weight=None, mask=None)."
        )

    def reduce(self, values, sample_weight=None):
        """Per-sample `values` (batch, ...) to the term's scalar.

        The mean over each sample's entries, then Keras' own reduction
        ("sum_over_batch_size"): sum(sample_weight · value) / batch size, the
        convention of the task loss and of every term. Skipped samples have
        weight 0: they add exactly 0 (even a NaN value) and count in the batch
        size. Scaled for replicas under `tf.distribute`.
        """
        return scale_for_replicas(kd_ops.sum_over_batch(values, sample_weight))

    def target_settings(self):
        """What cached targets depend on besides the teacher's weights."""
        config = self.get_config()
        for key in ("weight", "name", "trainable", "dtype", "student_features"):
            config.pop(key, None)
        if "teacher_features" in config:
            config["teacher_features"] = spec_config(self.teacher_spec())
        return {"class": type(self).__name__, **config}

    def get_config(self):
        return {
            **super().get_config(),
            "weight": self.weight,
            "teacher_features": spec_config(self.teacher_features),
            "student_features": spec_config(self.student_features),
        }


@keras.saving.register_keras_serializable(package="keras_gramkd")
class KDTerm(DistillationTerm):
    """Logit distillation (Hinton et al. 2015) as a term: `LogitKD` on logits.

    Args:
        temperature: softening temperature T > 0.
        weight: the term's weight.
        name: its name (metric `<name>_loss`), `"kd"` by default.

    Example:

    >>> KDTerm(temperature=2.0, weight=0.5).get_config()["temperature"]
    2.0
    """

    def __init__(self, temperature=4.0, weight=1.0, name="kd", **kwargs):
        kwargs.pop("teacher_features", None)
        kwargs.pop("student_features", None)
        super().__init__(weight=weight, name=name, **kwargs)
        self.kd_loss = LogitKD(check_temperature(temperature))

    @property
    def temperature(self):
        """The softening temperature, fixed at construction."""
        return self.kd_loss.temperature

    @temperature.setter
    def temperature(self, value):
        raise AttributeError(
            f"The temperature of term {self.name!r} is fixed when it is built: "
            f"build a new KDTerm(temperature={value!r}) (and a new Distiller)."
        )

    def teacher_targets(self, teacher, mask=None):
        return {"logits": teacher.logits}

    def loss(self, targets, student, sample_weight=None, mask=None):
        # LogitKD's per-sample values, reduced as every term reduces (the
        # value of LogitKD's own call, in fewer operations than Keras' Loss).
        return self.reduce(
            self.kd_loss.call(targets["logits"], student.logits), sample_weight
        )

    def get_config(self):
        config = super().get_config()
        del config["teacher_features"], config["student_features"]
        return {**config, "temperature": self.temperature}


class ModalityTerm(DistillationTerm):
    """A term that reads one embedding per modality from each network.

    Its features are dicts modality name -> address that align by name (the
    student may use a subset of the teacher's modalities), or one address
    whose output is the stacked (batch, M, d) embeddings. It takes the
    (batch, M) modality mask (`uses_mask`). Base of `GramTerm` and
    `keras_gramkd.relational.ModalitySPTerm`.
    """

    uses_mask = True

    def __init__(
        self,
        weight=1.0,
        teacher_features=None,
        student_features=None,
        name=None,
        **kwargs,
    ):
        super().__init__(weight, teacher_features, student_features, name, **kwargs)
        for role, spec in (
            ("teacher_features", self.teacher_features),
            ("student_features", self.student_features),
        ):
            if isinstance(spec, Feature) and spec.pool is not None:
                raise ValueError(
                    f"In {type(self).__name__} {self.name!r}, {role} is one "
                    f"address with pool={spec.pool!r}; a single address must "
                    "output the stacked (batch, M, d) embeddings, whose middle "
                    "axis is the modalities, so it cannot be pooled. Leave the "
                    "pool out, or pass a dict modality name -> Feature(address, "
                    "pool=...) to pool each modality's tokens."
                )

    def check_modalities_align(self):
        """Raises unless the student's modality names are among the teacher's."""
        teacher, student = self.teacher_features, self.student_features
        if isinstance(teacher, dict) and isinstance(student, dict):
            unknown = [name for name in student if name not in teacher]
            if unknown:
                raise ValueError(
                    f"Student modalities {unknown} are not among the teacher's "
                    f"{list(teacher)}. Modalities align by name: use the same "
                    "names in the teacher's and the student's features."
                )

    @property
    def modality_names(self):
        for spec in (self.student_features, self.teacher_features):
            if isinstance(spec, dict):
                return list(spec)
        return None

    def teacher_spec(self):
        teacher, student = self.teacher_features, self.student_features
        if isinstance(teacher, dict) and isinstance(student, dict):
            return {name: teacher[name] for name in student}
        return teacher


@keras.saving.register_keras_serializable(package="keras_gramkd")
class GramTerm(ModalityTerm):
    """The modality-level Gram matrix loss (arXiv 2112.11447) as a term.

    Per sample, the M modality embeddings of each network form an M×M Gram
    matrix; the loss (`ModalityGram` by default) is the mean squared
    difference of teacher and student matrices. Several GramTerms (with other
    names) may read other depths: the encoders' outputs, the tokens after a
    fusion block.

    Args:
        teacher_features: dict modality name -> address of that modality's
            embedding, or one address whose output is (batch, M, d).
        student_features: the same for the student; modalities align by name,
            and the student may use a subset of the teacher's.
        weight: the term's weight.
        loss: a `ModalityGram` (default `ModalityGram()`), or a callable
            `loss(teacher_features, student_features, sample_weight=None,
            mask=None)` on (batch, M, d) tensors.
        name: its name (metric `<name>_loss`), `"gram"` by default.

    Example:

    >>> term = GramTerm(
    ...     {"a": "t_a", "b": "t_b"}, {"a": "s_a", "b": "s_b"}, name="gram_enc")
    >>> term.modality_names
    ['a', 'b']
    """

    def __init__(
        self,
        teacher_features=None,
        student_features=None,
        weight=1.0,
        loss=None,
        name="gram",
        **kwargs,
    ):
        super().__init__(weight, teacher_features, student_features, name, **kwargs)
        if isinstance(loss, dict):
            loss = keras.saving.deserialize_keras_object(loss)
        if loss is not None and not callable(loss):
            raise TypeError(
                "The Gram loss must be called as loss(teacher_features, "
                f"student_features), like ModalityGram(); got {loss!r}."
            )
        self.gram_loss = loss if loss is not None else ModalityGram()
        if self.weight == 0:
            return
        if self.teacher_features is None or self.student_features is None:
            raise ValueError(
                f"Gram term {self.name!r} needs teacher_features and "
                "student_features (in the Distiller's short form: "
                "teacher_modalities and student_modalities): dicts modality "
                "name -> layer name or path, or one layer whose output is "
                "(batch, M, d). Pass them, or set its weight (gram_weight) to 0."
            )
        self.check_modalities_align()

    def check_features(self, teacher_shapes, student_shapes):
        counts = {}
        for role, shapes in (("teacher", teacher_shapes), ("student", student_shapes)):
            counts[role] = _stacked_modalities(self.name, role, shapes)
        if counts["teacher"] != counts["student"]:
            raise ValueError(
                f"In Gram term {self.name!r} the teacher's features have "
                f"{counts['teacher']} modalities but the student's have "
                f"{counts['student']}. Give both as dicts modality name -> "
                "address so that they align by name."
            )
        m = counts["student"]
        if m == 1:
            warnings.warn(
                "Only one modality: its Gram matrix is 1×1 (the embedding's "
                "squared norm, always 1 under the default l2 normalisation), so "
                "the Gram term carries no relation between modalities. Name at "
                "least two modality layers, or set gram_weight=0.",
                stacklevel=4,
            )
        if m == 2 and getattr(self.gram_loss, "normalize", None) == "centered":
            warnings.warn(
                "Two modalities under normalize='centered': after removing their "
                "mean the two embeddings are u and -u, so the Gram matrix is "
                "always [[1, -1], [-1, 1]] and the term teaches nothing. Use "
                "ModalityGram(normalize='l2').",
                stacklevel=4,
            )

    def check_cached(self, has_student_mask):
        if not isinstance(self.gram_loss, ModalityGram):
            return
        if has_student_mask and self.gram_loss.normalize == "centered":
            raise ValueError(
                "A cached teacher Gram cannot follow a student_mask_layer "
                "under normalize='centered' (the centring depends on which "
                "modalities are present). Use normalize='l2', or train "
                "with the live teacher."
            )

    def teacher_targets(self, teacher, mask=None):
        features = _stacked(teacher.features)
        if isinstance(self.gram_loss, ModalityGram):
            return {"gram": self.gram_loss.gram(features, mask)}
        return {"features": features}

    def loss(self, targets, student, sample_weight=None, mask=None):
        features = _stacked(student.features)
        if "features" in targets:
            return self.gram_loss(
                targets["features"], features, sample_weight=sample_weight, mask=mask
            )
        teacher_gram = ops.cast(targets["gram"], "float32")
        if mask is not None:  # a student mask layer may drop more modalities
            teacher_gram = teacher_gram * kd_ops.pair_mask(mask)
        return self.gram_loss.from_teacher_gram(
            teacher_gram, features, sample_weight=sample_weight, mask=mask
        )

    def get_config(self):
        return {
            **super().get_config(),
            "loss": keras.saving.serialize_keras_object(self.gram_loss),
        }


def _stacked(features):
    """(batch, M, d) from a dict of (batch, d) embeddings, or as it is."""
    if isinstance(features, dict):
        return stack_modalities(list(features.values()))
    return features


def _stacked_modalities(term, role, shapes):
    """M of a Gram term's features: checks one width, or a (batch, M, d)."""
    if isinstance(shapes, dict):
        widths = {name: shape[-1] for name, shape in shapes.items()}
        if len(set(widths.values())) > 1:
            raise ValueError(
                f"In Gram term {term!r}, the {role}'s modality widths differ "
                f"({widths}); the Gram matrix needs one width d for all "
                "modalities. Add a projection (for example "
                "keras.layers.Dense(d)) after each embedding."
            )
        return len(shapes)
    if len(shapes) != 3:
        raise ValueError(
            f"In Gram term {term!r}, the {role}'s single feature has shape "
            f"{tuple(shapes)}; a single address must output the stacked "
            "(batch, M, d) embeddings. Otherwise pass a dict modality name "
            "-> address."
        )
    return shapes[1]
