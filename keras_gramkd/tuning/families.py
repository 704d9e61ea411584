"""The term families a term search compares, and each one's search space.

A family is logit KD plus one more term (``"kd"`` is KD alone, the control).
Every family searches KD's weight and temperature, its own weight on a log
range of two decades around its published scale, and its own options:

    kd            kd_weight log-uniform in [0.1, 10], temperature in 1, 2, 4, 8
    gram          + GramTerm: gram_weight near 3 (the weight of `gramkd demo`), the
                  modality set (one of `modalities`), the normalisation
                  ("l2", "none", "dim", "centered": what `ModalityGram` offers)
    modality_sp   + ModalitySPTerm: weight around 3000, the modality set
    sp            + SPTerm: weight around 3000, the feature (one of `features`)
    rkd           + RKDTerm: weight around 25 (distance; angle twice it)
    pkt           + PKTTerm: weight around 30000
    fitnet        + FitNetTerm: weight around 100

The relational scales are those of the authors' reference code (RepDistiller),
set for CIFAR with the task loss alone; the range lets the search move a
hundredfold from them. Nothing here imports keras_tuner: `FamilySpace.terms`
takes a `keras_tuner.HyperParameters`.

Example:

>>> space = FamilySpace("sp", features={"pooled": ("t_pool", "s_pool")})
>>> space.hyperparameter_names
['kd_weight', 'temperature', 'sp_weight', 'sp_feature']
"""

from keras_gramkd.losses import ModalityGram
from keras_gramkd.ops import GRAM_NORMALIZATIONS
from keras_gramkd.relational import FitNetTerm, ModalitySPTerm, PKTTerm, RKDTerm, SPTerm
from keras_gramkd.terms import GramTerm, KDTerm

# family -> (term class, published weight scale, candidates it draws from).
_FAMILIES = {
    "kd": (None, None, None),
    "gram": (GramTerm, 3.0, "modalities"),
    "modality_sp": (ModalitySPTerm, 3000.0, "modalities"),
    "sp": (SPTerm, 3000.0, "features"),
    "rkd": (RKDTerm, 25.0, "features"),
    "pkt": (PKTTerm, 30000.0, "features"),
    "fitnet": (FitNetTerm, 100.0, "features"),
}
FAMILIES = tuple(_FAMILIES)
PUBLISHED_SCALES = {f: scale for f, (_, scale, _) in _FAMILIES.items() if scale}
SPREAD = 10.0  # a family's weight is searched in [scale / SPREAD, scale * SPREAD]
KD_WEIGHT_RANGE = (0.1, 10.0)
TEMPERATURES = [1.0, 2.0, 4.0, 8.0]


def _check_candidates(name, candidates):
    """`candidates` as a dict name -> (teacher spec, student spec)."""
    candidates = dict(candidates or {})
    for key, pair in candidates.items():
        if not isinstance(key, str) or not isinstance(pair, tuple) or len(pair) != 2:
            raise ValueError(
                f"{name} must map a name to a (teacher, student) pair of feature "
                f"addresses, e.g. {{'pooled': ('t_pool', 's_pool')}}; got "
                f"{key!r}: {pair!r}."
            )
    return candidates


def available_families(features=None, modalities=None):
    """The families that the given candidates allow, in `FAMILIES` order.

    >>> available_families(features={"pooled": ("t_pool", "s_pool")})
    ['kd', 'sp', 'rkd', 'pkt', 'fitnet']
    """
    given = {"features": bool(features), "modalities": bool(modalities), None: True}
    return [f for f, (_, _, needs) in _FAMILIES.items() if given[needs]]


class FamilySpace:
    """One family's search space: declares its hyperparameters, builds its terms.

    Args:
        family: one of `FAMILIES`.
        features: dict name -> (teacher address, student address) of vector
            features, the candidates of SP, RKD, PKT and FitNet.
        modalities: dict name -> (teacher modalities, student modalities), as
            `GramTerm` takes them (dicts, or one stacked (batch, M, d)
            address), the candidates of the Gram and per-modality SP.
    """

    def __init__(self, family, features=None, modalities=None):
        if family not in _FAMILIES:
            raise ValueError(f"Unknown term family {family!r}; choose from {FAMILIES}.")
        self.family = family
        self.term_class, self.scale, needs = _FAMILIES[family]
        given = {
            "features": _check_candidates("features", features),
            "modalities": _check_candidates("modalities", modalities),
        }
        self.candidates = given.get(needs, {})
        if needs and not self.candidates:
            raise ValueError(
                f"The {family!r} family needs candidate {needs}: pass {needs}="
                f"{{name: (teacher, student)}} to search it, or leave it out of "
                "the families."
            )

    @property
    def hyperparameter_names(self):
        """The names this family declares, in order."""
        names = ["kd_weight", "temperature"]
        if self.term_class is not None:
            names += [f"{self.family}_weight", f"{self.family}_feature"]
        if self.family == "gram":
            names.append("gram_normalize")
        return names

    def terms(self, hp):
        """Declares the family's hyperparameters on `hp`; returns its terms
        (KD first). On a copy of a trial's hyperparameters it rebuilds that
        trial's terms."""
        kd = KDTerm(
            hp.Choice("temperature", TEMPERATURES, ordered=True),
            weight=hp.Float("kd_weight", *KD_WEIGHT_RANGE, sampling="log"),
        )
        if self.term_class is None:
            return [kd]
        weight = hp.Float(
            f"{self.family}_weight",
            self.scale / SPREAD,
            self.scale * SPREAD,
            sampling="log",
        )
        names = list(self.candidates)
        feature = hp.Choice(f"{self.family}_feature", names)
        teacher, student = self.candidates[feature]
        kwargs = {}
        if self.family == "gram":
            normalize = hp.Choice("gram_normalize", list(GRAM_NORMALIZATIONS))
            kwargs["loss"] = ModalityGram(normalize)
        term = self.term_class(teacher, student, weight=weight, **kwargs)
        return [kd, term]

    def settings(self, hp):
        """The values of this family's hyperparameters in `hp`, by name."""
        values = hp.values
        return {name: values[name] for name in self.hyperparameter_names}


def describe_settings(settings):
    """A short text of a family's settings, for progress lines and tables.

    >>> describe_settings({"kd_weight": 1.234, "temperature": 4.0,
    ...                    "sp_weight": 2999.0, "sp_feature": "pooled"})
    'kd 1.23, T 4, sp 3e+03, pooled'
    """
    words = []
    for name, value in settings.items():
        if isinstance(value, str):
            words.append(value)
            continue
        label = "T" if name == "temperature" else name.removesuffix("_weight")
        words.append(f"{label} {value:.3g}")
    return ", ".join(words)
