"""The demo's methods: name -> distillation terms, for `compare_methods`.

Every method but ``labels`` adds its term to logit KD, so each paired
difference against ``kd`` is what that term buys on top of KD:

- ``labels``: the task loss only; ``kd``: + logit KD (Hinton);
- ``keras_kd``: `keras.distillation.Distiller` with
  `LogitsDistillation(temperature=T, loss=keras.losses.KLDivergence())`, the
  reference Keras ships: total ``w·task + (1 - w)·T²·KL`` with ``w = 1 / (1 +
  kd_weight)``, which is the ``kd`` loss ``task + kd_weight·T²·KL`` divided by
  ``1 + kd_weight``. Adam's step is the same for a scaled loss but for its
  epsilon, so keras_kd trains like kd with epsilon ``(1 + kd_weight)·1e-7``
  (with epsilon ``1e-7 / (1 + kd_weight)`` instead, its student's weights
  equal kd's to 3e-6 after 30 epochs; TensorFlow, noisy setting);
- ``gram``: + the modality Gram of the view embeddings (M × M per sample);
- ``gram_fused``: + the modality Gram of the tokens after the attention fusion
  (students with ``fusion="attention"`` only);
- the controls of the setting's main Gram (``gram``, or ``gram_fused`` where
  it exists), same weight and normalisation: ``…_batch_mean`` (the batch's
  mean teacher Gram: no per-sample relations), ``…_diagonal`` (modality
  norms only; not run for the ``"l2"`` and ``"centered"`` Grams, whose
  diagonal is always 1) and ``…_off_diagonal``;
- ``sp``, ``rkd``, ``pkt``, ``fitnet``: the relational baselines on the fused
  vectors (``t_pool``, ``s_pool``) at the weights of the authors' reference
  code (RepDistiller: SP 3000, RKD 25 distance + 50 angle, PKT 30000,
  FitNet 100), which were set for CIFAR with the task loss alone;
- ``modality_sp``: SP on each view's embeddings (B × B per modality, weight
  3000): the other reading of a "modality-level Gram".

Example:

>>> from keras_gramkd.demo.methods import demo_methods
>>> cfg = {"kd_weight": 1.0, "temperature": 4.0, "gram_weight": 3.0,
...        "gram_normalize": "l2"}
>>> methods, skipped = demo_methods(cfg, ["fou", "mor"], fusion="concat")
>>> list(methods)[:4], list(skipped)
(['labels', 'kd', 'keras_kd', 'gram'], ['gram_diagonal'])
"""

import keras

from gramkd import options
from keras_gramkd.losses import ModalityGram
from keras_gramkd.relational import (
    FitNetTerm,
    ModalitySPTerm,
    PKTTerm,
    RKDTerm,
    SPTerm,
)
from keras_gramkd.terms import GramTerm, KDTerm
from keras_gramkd.tuning.families import PUBLISHED_SCALES
from keras_gramkd.zoo import FEATURES, view_addresses

RELATIONAL_WEIGHTS = {f: PUBLISHED_SCALES[f] for f in ("sp", "rkd", "pkt", "fitnet")}
MODALITY_SP_WEIGHT = PUBLISHED_SCALES["modality_sp"]
CONTROLS = {
    "batch_mean": {"target": "batch_mean"},
    "diagonal": {"entries": "diagonal"},
    "off_diagonal": {"entries": "off_diagonal"},
}
QUICK_METHODS = ("labels", "kd", "gram", "gram_fused")
# The default methods live with the command line, which prints them without keras.
DEFAULT_METHODS = options.DEMO_METHODS
# One epoch of each method, in kd epochs: CPU seconds of epochs 2-30 (after
# tracing) over those of the kd runs just before and after it, the mean of two
# repeats (TensorFlow, noisy setting, six views; both repeats within 0.16 of the
# mean but RKD's, 4.6 and 3.6). A Gram or control not listed costs what "gram"
# does. Used by `keras_gramkd.demo.study.expected_seconds`.
METHOD_COST = {
    "labels": 0.67,
    "kd": 1.0,
    "keras_kd": 1.0,
    "gram": 1.1,
    "gram_off_diagonal": 1.25,
    "sp": 0.9,
    "rkd": 4.1,
    "pkt": 1.05,
    "fitnet": 1.1,
    "modality_sp": 1.2,
}


def method_cost(name):
    """An epoch of `name` in kd epochs (`METHOD_COST`).

    >>> method_cost("kd"), method_cost("gram_batch_mean") == method_cost("gram")
    (1.0, True)
    """
    if name in METHOD_COST:
        return METHOD_COST[name]
    return METHOD_COST["gram"] if name.startswith("gram") else METHOD_COST["kd"]


def skipped_controls(normalize, main="gram"):
    """Controls that cannot differ from KD under this normalisation, and why."""
    if normalize in ("l2", "centered"):
        return {
            f"{main}_diagonal": (
                f"the diagonal of a {normalize!r} Gram matrix is 1 for every "
                "sample, so a diagonal-only loss is 0 and the run would equal "
                "labels+KD; use --gram-normalize dim or none for a norms-only "
                "control"
            )
        }
    return {}


def keras_kd(temperature, kd_weight):
    """A `(teacher, student) -> keras.distillation.Distiller` method."""

    def build(teacher, student):
        return keras.distillation.Distiller(
            teacher=teacher,
            student=student,
            distillation_losses=keras.distillation.LogitsDistillation(
                temperature=temperature, loss=keras.losses.KLDivergence()
            ),
            student_loss_weight=1.0 / (1.0 + kd_weight),
        )

    return build


def main_gram(fusion):
    """The Gram method whose controls the demo runs."""
    return "gram_fused" if fusion == "attention" else "gram"


def demo_methods(cfg, views, fusion="concat"):
    """(methods, skipped controls) for one setting's networks.

    `cfg` holds ``kd_weight``, ``temperature``, ``gram_weight`` and
    ``gram_normalize``; `fusion` is the student's (see `keras_gramkd.zoo`).
    """
    kd = KDTerm(cfg["temperature"], weight=cfg["kd_weight"])
    t_views, s_views = view_addresses("t", views), view_addresses("s", views)
    t, s = FEATURES["teacher"], FEATURES["student"]

    def gram(name, teacher, student, **control):
        loss = ModalityGram(cfg["gram_normalize"], **control)
        term = GramTerm(teacher, student, cfg["gram_weight"], loss=loss, name=name)
        return [kd, term]

    methods = {
        "labels": [],
        "kd": [kd],
        "keras_kd": keras_kd(cfg["temperature"], cfg["kd_weight"]),
        "gram": gram("gram", t_views, s_views),
    }
    grams = {"gram": (t_views, s_views)}
    if fusion == "attention":
        methods["gram_fused"] = gram("gram_fused", t["fused"], s["fused"])
        grams["gram_fused"] = (t["fused"], s["fused"])
    main = main_gram(fusion)
    skipped = skipped_controls(cfg["gram_normalize"], main)
    for control, spec in CONTROLS.items():
        name = f"{main}_{control}"
        if name not in skipped:
            methods[name] = gram(main, *grams[main], **spec)
    pooled = (t["pooled"], s["pooled"])
    w = RELATIONAL_WEIGHTS
    methods["sp"] = [kd, SPTerm(*pooled, weight=w["sp"])]
    methods["rkd"] = [kd, RKDTerm(*pooled, weight=w["rkd"])]
    methods["pkt"] = [kd, PKTTerm(*pooled, weight=w["pkt"])]
    methods["fitnet"] = [kd, FitNetTerm(*pooled, weight=w["fitnet"])]
    methods["modality_sp"] = [
        kd,
        ModalitySPTerm(t_views, s_views, weight=MODALITY_SP_WEIGHT),
    ]
    return methods, skipped
