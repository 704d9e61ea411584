"""Distillation losses as `keras.losses.Loss` subclasses: `LogitKD`, `ModalityGram`.

Both are called as `loss(teacher_outputs, student_outputs)`: the teacher plays
the part of `y_true`. Both compute in float32 and serialise with `get_config`.

Example:

>>> import numpy as np
>>> from keras_gramkd.losses import LogitKD, ModalityGram
>>> t = np.array([[2.0, 0.0, -1.0]], "float32")
>>> round(float(LogitKD(temperature=1.0)(t, t)), 6)
0.0
>>> feats = np.ones((2, 3, 4), "float32")
>>> round(float(ModalityGram()(feats, np.ones((2, 3, 9), "float32"))), 6)
0.0
"""

import keras

from keras_gramkd import ops as kd_ops
from keras_gramkd.checks import check_choice, check_number
from keras_gramkd.replicas import scale_for_replicas


def check_temperature(temperature):
    """Returns `temperature` as a float; raises unless it is finite and > 0."""
    return check_number(
        "temperature",
        temperature,
        0,
        strict=True,
        hint="Typical values are 1 to 8 (4 is a good start).",
    )


@keras.saving.register_keras_serializable(package="keras_gramkd")
class LogitKD(keras.losses.Loss):
    """Hinton logit distillation: T² · mean over the batch of KL(p_t ‖ p_s).

    p = softmax(logits / T), formed with log-softmax in float32 (no clipping).
    Equals `keras.distillation.LogitsDistillation(temperature=T,
    loss=keras.losses.KLDivergence())`; beware that keras' default
    `loss="kl_divergence"` string applies no softmax and no T² factor.

    Args:
        temperature: softening temperature T > 0.
        reduction: Keras loss reduction over the per-sample values.
        name: loss name.

    Example:

    >>> import numpy as np
    >>> kd = LogitKD(temperature=2.0)
    >>> t = np.array([[3.0, 0.0]], "float32")
    >>> s = np.array([[0.0, 3.0]], "float32")
    >>> round(float(kd(t, s)), 4)
    3.8109
    """

    def __init__(
        self, temperature=4.0, reduction="sum_over_batch_size", name="logit_kd"
    ):
        super().__init__(name=name, reduction=reduction, dtype="float32")
        self.temperature = check_temperature(temperature)

    def get_config(self):
        return {
            "temperature": self.temperature,
            "reduction": self.reduction,
            "name": self.name,
        }

    def call(self, teacher_logits, student_logits):
        return kd_ops.logit_kd(teacher_logits, student_logits, self.temperature)


@keras.saving.register_keras_serializable(package="keras_gramkd")
class ModalityGram(keras.losses.Loss):
    """Modality-level Gram matrix loss (arXiv 2112.11447).

    Per sample, the M×M Gram matrix of the M modality embeddings of each network
    is formed (see `keras_gramkd.ops.gram_matrix`), and the loss is the mean of
    (G_teacher − G_student)² over samples and entries. Teacher and student
    widths may differ. With `mask` (batch, M) of 0/1, the mean is over present
    pairs only; a sample with every modality missing adds nothing. Under
    `tf.distribute` the value is divided by the number of replicas in sync, as
    Keras divides every loss it reduces, so that summed replica gradients are
    those of the global batch.

    Args:
        normalize: `"l2"` (cosine Gram, default), `"none"`, `"dim"` or
            `"centered"`.
        entries: `"all"` (default), `"diagonal"` or `"off_diagonal"`: which
            entries of the M×M matrices are matched (the last two are
            ablations: norms only, relations only).
        target: `"sample"` (default: each sample's teacher Gram) or
            `"batch_mean"` (a control: the batch-averaged teacher Gram).
        name: loss name.

    Call arguments:
        teacher_features: (batch, M, d_t).
        student_features: (batch, M, d_s).
        sample_weight: optional (batch,) sample weights.
        mask: optional (batch, M) modality mask.

    Example:

    >>> import numpy as np
    >>> t = np.array([[[1.0, 0.0], [0.0, 1.0]]], "float32")
    >>> s = np.array([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]], "float32")
    >>> float(ModalityGram()(t, s))   # off-diagonal 0 vs 1, twice out of 4 entries
    0.5
    """

    def __init__(
        self, normalize="l2", entries="all", target="sample", name="modality_gram"
    ):
        kd_ops.check_gram_normalization(normalize)
        check_choice("Gram entries", entries, kd_ops.GRAM_ENTRIES)
        check_choice("Gram target", target, kd_ops.GRAM_TARGETS)
        super().__init__(name=name, dtype="float32")
        self.normalize = normalize
        self.entries = entries
        self.target = target

    def get_config(self):
        return {
            "normalize": self.normalize,
            "entries": self.entries,
            "target": self.target,
            "name": self.name,
        }

    def __call__(
        self, teacher_features, student_features, sample_weight=None, mask=None
    ):
        loss = kd_ops.gram_loss(
            teacher_features,
            student_features,
            normalize=self.normalize,
            mask=mask,
            sample_weight=sample_weight,
            entries=self.entries,
            target=self.target,
        )
        return scale_for_replicas(loss)

    def gram(self, features, mask=None):
        """The (batch, M, M) Gram matrices this loss compares, for caching."""
        return kd_ops.gram_matrix(features, self.normalize, mask)

    def from_teacher_gram(
        self, teacher_gram, student_features, sample_weight=None, mask=None
    ):
        """The loss against a precomputed teacher Gram (see `keras_gramkd.cache`).

        Equals `self(teacher_features, student_features, ...)` when
        `teacher_gram == self.gram(teacher_features, mask)`.
        """
        loss = kd_ops.gram_distance(
            teacher_gram,
            self.gram(student_features, mask),
            mask=mask,
            sample_weight=sample_weight,
            entries=self.entries,
            target=self.target,
        )
        return scale_for_replicas(loss)
