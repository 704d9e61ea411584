"""Relational distillation terms: SP, RKD, PKT, FitNet hints, per-modality SP.

Baselines beside the modality Gram term (`keras_gramkd.terms.GramTerm`), each
a `DistillationTerm` with its own weight and `<name>_loss` metric:

- `SPTerm`: similarity preserving (Tung & Mori 2019), B×B similarity maps;
- `RKDTerm`: relational KD (Park et al. 2019), distances and angles;
- `PKTTerm`: probabilistic knowledge transfer (Passalis & Tefas 2018);
- `FitNetTerm`: FitNet hints (Romero et al. 2015), through a learned regressor
  that the term owns;
- `ModalitySPTerm`: SP on each modality's embeddings, averaged: the batch ×
  batch reading of a "modality-level Gram", beside `GramTerm`'s per-sample
  M × M one.

SP, RKD, PKT and FitNet read one feature address per network (a fused
embedding, say; widths may differ), as the layer outputs it or, given a
`Feature(address, pool=...)`, its tokens pooled to (batch, d);
`ModalitySPTerm` reads a dict modality name -> address, as `GramTerm` does.
The losses are `keras_gramkd.ops` functions; see them for the formulas and
the reference code's conventions.

Batches, weights and masks. SP, RKD, PKT and per-modality SP relate the
samples of a batch to each other, so their value is not a mean of per-sample
values and `DistillationTerm.reduce` does not apply. Instead:

- a sample of weight 0 is left out of the batch's relations altogether (the
  loss is that of the batch without it). The `Distiller` gives weight 0 to the
  samples it skips (NaN/inf inputs, bad labels) and zeroes their inputs, so
  without this their zeroed features would join every relation;
- the remaining entries count with the product of their samples' weights
  (wᵢ·wⱼ for a pair, wᵢ·wⱼ·wₖ for RKD's angle triplets);
- `ModalitySPTerm` takes the (batch, M) modality mask (`uses_mask`): each
  modality's relations leave out the samples that miss it;
- under `tf.distribute`, relations are formed within each replica's batch.

The batch size is part of these losses: their scale (and RKD's mean distance)
depends on it, so keep it fixed while comparing weights.

Cached teachers (`keras_gramkd.cache.TeacherCache`): the cached target of a
sample is the teacher's feature vector (`"teacher/<term>/features"`, or
`".../features/<modality>"`), not a relation, so the relations are formed
per batch from the cached rows, and shuffling works as with the live teacher.

Example:

>>> from keras_gramkd.relational import RKDTerm, SPTerm
>>> sp = SPTerm("t_fused", "s_fused", weight=3000.0)
>>> rkd = RKDTerm("t_fused", "s_fused", weight=25.0)  # 25·distance + 50·angle
>>> sp.name, rkd.name, rkd.angle_weight
('sp', 'rkd', 2.0)
"""

import keras
from keras import ops

from keras_gramkd import relational_ops
from keras_gramkd.replicas import scale_for_replicas
from keras_gramkd.terms import DistillationTerm, ModalityTerm, check_weight


class _RelationTerm(DistillationTerm):
    """A term whose loss relates the rows of one feature of each network."""

    def __init__(
        self,
        teacher_features=None,
        student_features=None,
        weight=1.0,
        name=None,
        **kwargs,
    ):
        super().__init__(weight, teacher_features, student_features, name, **kwargs)
        if self.weight == 0:
            return
        for role, spec in (
            ("teacher_features", self.teacher_features),
            ("student_features", self.student_features),
        ):
            if spec is None or isinstance(spec, dict):
                raise ValueError(
                    f"{type(self).__name__} {self.name!r} needs {role}: one "
                    "feature address (a layer name, a path 'encoder/embed', a "
                    f"layer or a Feature), got {_spec_repr(spec)}. For one "
                    "relation per modality use ModalitySPTerm."
                )

    def check_features(self, teacher_shapes, student_shapes):
        for role, shape in (("teacher", teacher_shapes), ("student", student_shapes)):
            if len(shape) < 2:
                raise ValueError(
                    f"In term {self.name!r}, the {role}'s feature has shape "
                    f"{tuple(shape)}; it needs per-sample features (batch, d)."
                )

    def relation_loss(self, teacher_features, student_features, sample_weight):
        raise NotImplementedError

    def loss(self, targets, student, sample_weight=None, mask=None):
        value = self.relation_loss(targets["features"], student.features, sample_weight)
        return scale_for_replicas(value)


def _spec_repr(spec):
    if isinstance(spec, dict):
        return f"a dict of modalities {list(spec)}"
    return repr(spec)


@keras.saving.register_keras_serializable(package="keras_gramkd")
class SPTerm(_RelationTerm):
    """Similarity-preserving distillation (Tung & Mori, ICCV 2019) as a term.

    The student matches the teacher's row-normalised B×B similarity map of a
    batch (`keras_gramkd.relational_ops.similarity_preserving`). The paper weights it
    3000 on CIFAR (its scale is small: entries are divided by B²).

    Args:
        teacher_features: one address of the teacher's feature (batch, d_t).
        student_features: one address of the student's (batch, d_s).
        weight: the term's weight.
        name: its name (metric `<name>_loss`), `"sp"` by default.

    Samples of weight 0 are left out of the batch's relations (see the module).

    Example:

    >>> SPTerm("t_fused", "s_fused", weight=3000.0).get_config()["weight"]
    3000.0
    """

    def __init__(
        self,
        teacher_features=None,
        student_features=None,
        weight=1.0,
        name="sp",
        **kwargs,
    ):
        super().__init__(teacher_features, student_features, weight, name, **kwargs)

    def relation_loss(self, teacher_features, student_features, sample_weight):
        return relational_ops.similarity_preserving(
            teacher_features, student_features, sample_weight
        )


@keras.saving.register_keras_serializable(package="keras_gramkd")
class PKTTerm(_RelationTerm):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018) as a term.

    KL divergence between the teacher's and the student's cosine-affinity
    distributions over a batch (`keras_gramkd.relational_ops.pkt`).

    Args:
        teacher_features: one address of the teacher's feature (batch, d_t).
        student_features: one address of the student's (batch, d_s).
        weight: the term's weight.
        name: its name (metric `<name>_loss`), `"pkt"` by default.

    Samples of weight 0 are left out of the batch's relations (see the module).

    Example:

    >>> PKTTerm("t_fused", "s_fused").name
    'pkt'
    """

    def __init__(
        self,
        teacher_features=None,
        student_features=None,
        weight=1.0,
        name="pkt",
        **kwargs,
    ):
        super().__init__(teacher_features, student_features, weight, name, **kwargs)

    def relation_loss(self, teacher_features, student_features, sample_weight):
        return relational_ops.pkt(teacher_features, student_features, sample_weight)


@keras.saving.register_keras_serializable(package="keras_gramkd")
class RKDTerm(_RelationTerm):
    """Relational knowledge distillation (Park et al., CVPR 2019) as one term.

    loss = distance_weight · `rkd_distance` + angle_weight · `rkd_angle`
    (`keras_gramkd.ops`), and the term's `weight` scales the sum. One term
    holds both parts because the paper defines RKD as their combination on
    the same embedding: the paper's 25 (distance) and 50 (angle) are
    `RKDTerm(..., weight=25.0)` with the default 1 : 2 split. For a metric
    per part, use two terms, e.g. `RKDTerm(..., angle_weight=0, name="rkd_d")`
    and `RKDTerm(..., distance_weight=0, name="rkd_a")`. A part of weight 0 is
    not computed (the angle costs O(B³) memory and time).

    Args:
        teacher_features: one address of the teacher's feature (batch, d_t).
        student_features: one address of the student's (batch, d_s).
        weight: the term's weight.
        distance_weight: weight of the distance loss inside the term (>= 0).
        angle_weight: weight of the angle loss inside the term (>= 0).
        name: its name (metric `<name>_loss`), `"rkd"` by default.

    Samples of weight 0 are left out of the batch's relations (see the module).

    Example:

    >>> RKDTerm("t_fused", "s_fused", angle_weight=0.0).get_config()["angle_weight"]
    0.0
    """

    def __init__(
        self,
        teacher_features=None,
        student_features=None,
        weight=1.0,
        distance_weight=1.0,
        angle_weight=2.0,
        name="rkd",
        **kwargs,
    ):
        super().__init__(teacher_features, student_features, weight, name, **kwargs)
        self.distance_weight = check_weight(
            f"distance_weight of term {self.name!r}", distance_weight
        )
        self.angle_weight = check_weight(
            f"angle_weight of term {self.name!r}", angle_weight
        )
        if self.weight > 0 and self.distance_weight == 0 and self.angle_weight == 0:
            raise ValueError(
                f"RKD term {self.name!r} has distance_weight and angle_weight "
                "both 0, so it computes nothing. Give one of them a positive "
                "weight, or set the term's weight to 0."
            )

    def relation_loss(self, teacher_features, student_features, sample_weight):
        total = ops.zeros((), "float32")
        if self.distance_weight > 0:
            total = total + self.distance_weight * relational_ops.rkd_distance(
                teacher_features, student_features, sample_weight
            )
        if self.angle_weight > 0:
            total = total + self.angle_weight * relational_ops.rkd_angle(
                teacher_features, student_features, sample_weight
            )
        return total

    def target_settings(self):
        settings = super().target_settings()
        settings.pop("distance_weight", None)
        settings.pop("angle_weight", None)
        return settings

    def get_config(self):
        return {
            **super().get_config(),
            "distance_weight": self.distance_weight,
            "angle_weight": self.angle_weight,
        }


@keras.saving.register_keras_serializable(package="keras_gramkd")
class FitNetTerm(_RelationTerm):
    """FitNet hints (Romero et al., ICLR 2015): regress the teacher's feature.

    A linear regressor r (a `Dense` layer to the teacher's width d_t, on the
    last axis) maps the student's feature to the teacher's; the loss is the
    mean of (F_t − r(F_s))², per sample over its entries, then the
    sample-weighted mean over samples (the term's `reduce`): a per-sample
    loss, so weights and skipped samples act as in any term.

    The regressor belongs to the term: it is built when the `Distiller` is
    (from the two features' widths), trains with the student (it is among the
    Distiller's trainable variables) and is saved with the Distiller, but it
    is never part of the student, so a saved or exported student does not
    hold it. The paper's regressor is a convolution for feature maps; here
    feature maps (batch, ..., d) must match the teacher's but for the last
    axis, and the regressor maps that axis (or pool them: `Feature(address,
    pool=...)`).

    Args:
        teacher_features: one address of the teacher's feature (batch, ..., d_t).
        student_features: one address of the student's (batch, ..., d_s).
        weight: the term's weight.
        name: its name (metric `<name>_loss`), `"fitnet"` by default.

    Example:

    >>> term = FitNetTerm("t_fused", "s_fused")
    >>> term.check_features((None, 16), (None, 4))
    >>> [tuple(w.shape) for w in term.trainable_weights]
    [(4, 16), (16,)]
    """

    def __init__(
        self,
        teacher_features=None,
        student_features=None,
        weight=1.0,
        name="fitnet",
        **kwargs,
    ):
        super().__init__(teacher_features, student_features, weight, name, **kwargs)
        self.regressor = None

    def check_features(self, teacher_shapes, student_shapes):
        super().check_features(teacher_shapes, student_shapes)
        teacher_shapes, student_shapes = tuple(teacher_shapes), tuple(student_shapes)
        if teacher_shapes[1:-1] != student_shapes[1:-1]:
            raise ValueError(
                f"In FitNet term {self.name!r} the teacher's feature has shape "
                f"{teacher_shapes} and the student's {student_shapes}: they "
                "may differ in the last axis only (the regressor maps it). "
                "Pool them, e.g. Feature(address, pool='mean'), or reshape "
                "one of them to match."
            )
        self.build_regressor(student_shapes[-1], teacher_shapes[-1])

    def build_regressor(self, student_width, teacher_width):
        """Creates the regressor `student_width -> teacher_width` (once)."""
        if self.regressor is not None:
            kernel = self.regressor.kernel
            if tuple(kernel.shape) != (student_width, teacher_width):
                raise ValueError(
                    f"FitNet term {self.name!r} already has a regressor "
                    f"{tuple(kernel.shape)}; its features now need "
                    f"({student_width}, {teacher_width}). Use a new term for "
                    "another pair of networks."
                )
            return
        self.regressor = keras.layers.Dense(
            teacher_width, dtype="float32", name=f"{self.name}_regressor"
        )
        self.regressor.build((None, student_width))
        self.built = True

    def loss(self, targets, student, sample_weight=None, mask=None):
        teacher = ops.cast(targets["features"], "float32")
        features = ops.cast(student.features, "float32")
        if self.regressor is None:  # used outside a Distiller, eagerly
            self.build_regressor(features.shape[-1], teacher.shape[-1])
        return self.reduce(
            ops.square(teacher - self.regressor(features)), sample_weight
        )


@keras.saving.register_keras_serializable(package="keras_gramkd")
class ModalitySPTerm(ModalityTerm):
    """Per-modality similarity preserving: a batch × batch map per modality.

    For each modality, `similarity_preserving` between the teacher's and the
    student's embeddings of that modality over the batch, averaged over the
    modalities (`keras_gramkd.relational_ops.modality_similarity_preserving`). It is the
    other reading of a "modality-level Gram matrix": `GramTerm` relates the
    M modalities within each sample (M × M), this relates the samples within
    each modality (B × B). Widths may differ, between the networks and
    between modalities.

    Args:
        teacher_features: dict modality name -> address of that modality's
            embedding, or one address whose output is (batch, M, d).
        student_features: the same for the student; modalities align by name,
            and the student may use a subset of the teacher's.
        weight: the term's weight.
        name: its name (metric `<name>_loss`), `"modality_sp"` by default.

    Takes the modality mask (`uses_mask`): each modality's relations leave out
    the samples that miss it; samples of weight 0 are left out of all.

    Example:

    >>> term = ModalitySPTerm({"a": "t_a", "b": "t_b"}, {"b": "s_b"})
    >>> term.modality_names, list(term.teacher_spec())
    (['b'], ['b'])
    """

    def __init__(
        self,
        teacher_features=None,
        student_features=None,
        weight=1.0,
        name="modality_sp",
        **kwargs,
    ):
        super().__init__(weight, teacher_features, student_features, name, **kwargs)
        if self.weight == 0:
            return
        teacher, student = self.teacher_features, self.student_features
        if teacher is None or student is None:
            raise ValueError(
                f"ModalitySPTerm {self.name!r} needs teacher_features and "
                "student_features: dicts modality name -> address, or one "
                "address whose output is (batch, M, d), on both sides."
            )
        if isinstance(teacher, dict) != isinstance(student, dict):
            raise ValueError(
                f"In ModalitySPTerm {self.name!r} one side names modalities "
                "(a dict) and the other one address; give both as dicts "
                "modality name -> address so that they align by name."
            )
        self.check_modalities_align()

    def check_features(self, teacher_shapes, student_shapes):
        if isinstance(student_shapes, dict):
            return
        for role, shape in (("teacher", teacher_shapes), ("student", student_shapes)):
            if len(shape) != 3:
                raise ValueError(
                    f"In ModalitySPTerm {self.name!r}, the {role}'s single "
                    f"feature has shape {tuple(shape)}; a single address must "
                    "output the stacked (batch, M, d) embeddings. Otherwise "
                    "pass a dict modality name -> address."
                )
        if teacher_shapes[1] != student_shapes[1]:
            raise ValueError(
                f"In ModalitySPTerm {self.name!r} the teacher's features have "
                f"{teacher_shapes[1]} modalities but the student's have "
                f"{student_shapes[1]}. Give both as dicts modality name -> "
                "address so that they align by name."
            )

    def loss(self, targets, student, sample_weight=None, mask=None):
        features = student.features
        if isinstance(features, dict):
            names = list(features)
            teacher = [targets[f"features/{name}"] for name in names]
            features = [features[name] for name in names]
        else:
            teacher = targets["features"]
        value = relational_ops.modality_similarity_preserving(
            teacher, features, sample_weight, mask
        )
        return scale_for_replicas(value)
