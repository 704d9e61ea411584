"""The Distiller's distillation terms: the list, its checks, and the active terms.

`short_form_terms` is the list the `Distiller`'s short form stands for;
`check_terms` refuses lists that could not train. `ActiveTerms` are the terms
whose weight is not 0, wired to the teacher and the student: it resolves their
features in each network (one extractor per network), keeps the modality
order of the modality mask, reads cached teacher targets from a batch, and
computes each term's teacher targets and loss from one step's outputs.

>>> from keras_gramkd.terms import KDTerm
>>> [term.name for term in check_terms([KDTerm(4.0, name="kd")])]
['kd']
>>> check_terms([KDTerm(4.0, name="kd"), KDTerm(2.0, name="kd")])  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: Several terms are named ['kd']; ...
"""

import keras
from keras import ops

from keras_gramkd import ops as kd_ops
from keras_gramkd.bad_samples import MODALITY_MASK_KEY
from keras_gramkd.features import pool_tokens
from keras_gramkd.terms import (
    TARGET_PREFIX,
    DistillationTerm,
    GramTerm,
    KDTerm,
    NetworkOutputs,
    spec_features,
    target_key,
)


def short_form_terms(
    teacher_modalities=None,
    student_modalities=None,
    kd_weight=None,
    gram_weight=None,
    temperature=None,
    gram_loss=None,
):
    """The terms of the Distiller's short form: `KDTerm` "kd", `GramTerm` "gram".

    A setting left None takes the term's own default (weights 1, T = 4); the
    terms check every value.
    """

    def given(**settings):
        return {key: value for key, value in settings.items() if value is not None}

    return [
        KDTerm(name="kd", **given(temperature=temperature, weight=kd_weight)),
        GramTerm(
            teacher_modalities,
            student_modalities,
            name="gram",
            **given(weight=gram_weight, loss=gram_loss),
        ),
    ]


def check_terms(terms):
    """`terms` as a list; raises for a non-term, a name that cannot be a
    metric, or a term another Distiller has taken."""
    if isinstance(terms, DistillationTerm):
        raise TypeError(
            f"terms must be a list of terms; got the single term "
            f"{type(terms).__name__}. Wrap it in a list: terms=[{type(terms).__name__}"
            "(...)]."
        )
    if not isinstance(terms, (list, tuple)):
        raise TypeError(
            "terms must be a list of keras_gramkd.DistillationTerm (KDTerm, "
            f"GramTerm, or your subclass); got {type(terms).__name__}."
        )
    terms = list(terms)
    for term in terms:
        if not isinstance(term, DistillationTerm):
            raise TypeError(
                "terms must be a list of keras_gramkd.DistillationTerm (KDTerm, "
                f"GramTerm, or your subclass); got {type(term).__name__}."
            )
    taken = [term.name for term in terms if term.in_distiller]
    if taken:
        raise ValueError(
            f"Term(s) {taken} already belong to another Distiller. A term holds "
            "its weight variable (a FitNetTerm also its regressor), so two "
            "Distillers would share them: setting or training one would change "
            "the other. Give each Distiller its own term objects: build them "
            "again, or copy one with type(term).from_config(term.get_config())."
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


def _check_unique_modalities(role, terms):
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


def _spec_view(spec, features, pooled):
    """A term's features of one network, from the network's {path: tensor}.

    `pooled` ({(path, pool): tensor}) is shared by the terms of one step, so
    a feature several terms read is pooled once.
    """
    if spec is None:
        return None

    def view(feature):
        if feature.pool is None:  # a single address, as the layer outputs it
            return features[feature.address]
        key = (feature.address, feature.pool)
        if key not in pooled:
            pooled[key] = pool_tokens(features[feature.address], feature.pool)
        return pooled[key]

    if isinstance(spec, dict):
        return {name: view(feature) for name, feature in spec.items()}
    return view(spec)


def _spec_shapes(spec, shapes):
    """The shapes a term's `check_features` gets, from the network's {path: shape}:
    (batch, d) for each pooled feature, the layer's output shape otherwise."""

    def shape(feature):
        found = shapes[feature.address]
        return found if feature.pool is None else (found[0], found[-1])

    if isinstance(spec, dict):
        return {name: shape(feature) for name, feature in spec.items()}
    return shape(spec) if spec is not None else None


class ActiveTerms:
    """The terms of a Distiller whose weight is not 0, wired to its networks.

    Iterates over those terms, in order; false when there is none. Once
    their features are resolved, all the terms belong to this Distiller
    (`check_terms` refuses them to another one).

    Args:
        terms: the Distiller's terms (weight 0 ones are left out).
        teacher, student: the `keras_gramkd.network.Network`s.
        student_mask_layer: address of a student layer that outputs a
            (batch, M) modality mask, or None.
    """

    def __init__(self, terms, teacher, student, student_mask_layer=None):
        self.terms = [term for term in terms if term.weight > 0]
        self.left_out = [term for term in terms if term.weight == 0]
        self.teacher, self.student = teacher, student
        self.uses_mask = any(term.uses_mask for term in self.terms)
        names = []
        for term in self.terms:
            if term.uses_mask:
                names.extend(n for n in term.modality_names or [] if n not in names)
        self.modality_names = names or None
        # The mask only acts on terms that take it: with those off (a KD-only
        # run of a student built with ModalityDropout) there is nothing to mask.
        self._add_features(student_mask_layer if self.uses_mask else None)
        for term in terms:
            term.in_distiller = True

    def __iter__(self):
        return iter(self.terms)

    def check_left_out(self):
        """Raises if a term left out (weight 0 when built) has a weight now."""
        switched = [term.name for term in self.left_out if term.weight > 0]
        if switched:
            raise ValueError(
                f"Term(s) {switched} had weight 0 when the Distiller was built, "
                "so its step leaves them out, and a weight set later cannot "
                "switch them on. Build the Distiller with their weight > 0 and "
                "set it to 0 where they should be off (a weight changed after "
                "the build is honoured), or build a new Distiller."
            )

    def __len__(self):
        return len(self.terms)

    def _add_features(self, mask_layer):
        """Resolves every term's features; one extractor per network."""
        t_shapes = self.teacher.add_features(
            [f for term in self.terms for f in spec_features(term.teacher_spec())]
        )
        s_shapes = self.student.add_features(
            [f for term in self.terms for f in spec_features(term.student_spec())],
            mask_layer,
        )
        for role in ("teacher", "student"):
            _check_unique_modalities(role, self.terms)
        n_modalities = len(self.modality_names or [])
        for term in self.terms:
            term.check_features(
                _spec_shapes(term.teacher_spec(), t_shapes),
                _spec_shapes(term.student_spec(), s_shapes),
            )
            spec = term.student_spec()
            if term.uses_mask and spec is not None and not isinstance(spec, dict):
                n_modalities = n_modalities or s_shapes[spec.address][1]
        if self.student.mask_path is not None:
            self.student.check_mask(n_modalities)

    def batch_mask(self, x, student_mask):
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

    def cached_targets(self, x):
        """{term name: targets} carried in the batch, or None to run the teacher."""
        if not self.terms or not isinstance(x, dict):
            return None
        if not any(str(key).startswith(TARGET_PREFIX) for key in x):
            return None
        cached = {}
        for term in self.terms:
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
            term.check_cached(self.student.mask_path is not None)
            cached[term.name] = targets
        return cached

    def teacher_targets(self, teacher, mask):
        """{term name: {key: tensor}} from the teacher's (logits, features)."""
        logits, features = teacher
        targets, pooled = {}, {}
        for term in self.terms:
            outputs = NetworkOutputs(
                logits, _spec_view(term.teacher_spec(), features, pooled)
            )
            targets[term.name] = term.teacher_targets(
                outputs, self._term_mask(term, mask)
            )
        return targets

    def losses(
        self,
        x,
        student,
        student_mask,
        sample_weight,
        teacher,
        cached,
        guard_gradients=True,
    ):
        """Each term's loss, from cached targets or the teacher's outputs.

        `student` and `teacher` are (logits, {path: feature}); `cached` the
        batch's targets (`cached_targets`) or None. With `guard_gradients`, a
        term whose gradient is not finite adds nothing to the student's.
        """
        guard = kd_ops.finite_gradient if guard_gradients else _identity
        mask = self.batch_mask(x, student_mask) if self.uses_mask else None
        if cached is None:
            cached = self.teacher_targets(teacher, mask)
        logits, features = student
        pooled, losses = {}, []
        for term in self.terms:
            targets = {k: ops.stop_gradient(v) for k, v in cached[term.name].items()}
            view = _spec_view(term.student_spec(), features, pooled)
            outputs = NetworkOutputs(
                guard(logits),
                None if view is None else keras.tree.map_structure(guard, view),
            )
            term_mask = self._term_mask(term, mask)
            variables = len(term.variables)
            value = term.loss(targets, outputs, sample_weight, term_mask)
            if len(term.variables) != variables:
                raise ValueError(
                    f"Term {term.name!r} created variables inside its loss "
                    f"({[v.path for v in term.variables[variables:]]}), so the "
                    "optimizer, built before the first step, cannot train them. "
                    "Create and build the term's layers before training: in "
                    "__init__ with a known input shape, or in check_features("
                    "teacher_shapes, student_shapes), which the Distiller calls "
                    "once with the features' shapes."
                )
            losses.append(_checked_loss(term, value))
        return losses


def _identity(tensor):
    return tensor


def _checked_loss(term, value):
    """A term's loss, refused unless it is a floating-point scalar."""
    value = ops.convert_to_tensor(value)
    dtype = keras.backend.standardize_dtype(value.dtype)
    if "float" not in dtype:
        raise TypeError(
            f"Term {term.name!r} returned a loss of dtype {dtype}: an integer "
            "or boolean loss has no gradient, so the term would train nothing. "
            "Compute it in floating point, e.g. ops.cast(values, 'float32') "
            "before reducing."
        )
    if len(value.shape):
        raise ValueError(
            f"Term {term.name!r} returned a loss of shape {tuple(value.shape)}; "
            "a term's loss is a scalar. Reduce per-sample values with "
            "self.reduce(values, sample_weight)."
        )
    return value


class LeftOutTermsGuard(keras.callbacks.Callback):
    """Stops `fit` at the start of an epoch if a callback gave a weight to a
    term the step leaves out (`ActiveTerms.check_left_out`)."""

    def __init__(self, active_terms):
        super().__init__()
        self.active_terms = active_terms

    def on_epoch_begin(self, epoch, logs=None):
        self.active_terms.check_left_out()
