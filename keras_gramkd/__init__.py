"""keras_gramkd: multi-modality knowledge distillation for Keras 3.

A frozen multi-modal teacher teaches a small student through the task loss,
logit KD and the modality-level Gram matrix loss (arXiv 2112.11447), on the
TensorFlow, JAX and PyTorch backends.

As in keras-hub, importing the package imports keras and registers the classes
Keras needs to load saved files, so ``keras.saving.load_model("d.keras")`` finds
a saved `Distiller` after ``import keras_gramkd``. Choose the backend before the
import, as for Keras itself: ``KERAS_BACKEND=jax python train.py``.

Example:

>>> from keras_gramkd import Distiller, GramTerm, KDTerm
>>> KDTerm(temperature=4.0).weight
1.0
"""

__version__ = "0.1.0"

# The package each Keras backend needs (each is an extra of keras-gramkd).
BACKEND_PACKAGES = ("tensorflow", "jax", "torch")

try:
    import keras  # noqa: F401 (Keras reads KERAS_BACKEND here)
except ModuleNotFoundError as error:
    if error.name not in BACKEND_PACKAGES:
        raise
    raise ModuleNotFoundError(
        f"The Keras backend {error.name!r} needs the {error.name} package, which is "
        f'not installed. Install it with: pip install "keras-gramkd[{error.name}]" '
        "(or pick an installed backend with KERAS_BACKEND).",
        name=error.name,
    ) from error

from keras_gramkd import (  # noqa: E402 (after the backend check)
    cache,
    datasets,
    features,
    layers,
    losses,
    ops,
    plots,
    relational,
    relational_ops,
    study,
    terms,
    tuning,
)
from keras_gramkd.cache import TeacherCache  # noqa: E402
from keras_gramkd.distiller import Distiller  # noqa: E402
from keras_gramkd.features import Feature  # noqa: E402
from keras_gramkd.layers import ModalityDropout, ModalityStack  # noqa: E402
from keras_gramkd.losses import LogitKD, ModalityGram  # noqa: E402
from keras_gramkd.relational import (  # noqa: E402
    FitNetTerm,
    ModalitySPTerm,
    PKTTerm,
    RKDTerm,
    SPTerm,
)
from keras_gramkd.robustness import evaluate_robustness  # noqa: E402
from keras_gramkd.terms import (  # noqa: E402
    DistillationTerm,
    GramTerm,
    KDTerm,
    ModalityTerm,
)

__all__ = [
    "DistillationTerm",
    "Distiller",
    "Feature",
    "FitNetTerm",
    "GramTerm",
    "KDTerm",
    "LogitKD",
    "ModalityDropout",
    "ModalityGram",
    "ModalitySPTerm",
    "ModalityStack",
    "ModalityTerm",
    "PKTTerm",
    "RKDTerm",
    "SPTerm",
    "TeacherCache",
    "evaluate_robustness",
    "cache",
    "datasets",
    "features",
    "layers",
    "losses",
    "ops",
    "plots",
    "relational",
    "relational_ops",
    "study",
    "terms",
    "tuning",
]
