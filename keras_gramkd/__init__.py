"""keras_gramkd: multi-modality knowledge distillation for Keras 3.

A frozen multi-modal teacher teaches a small student through the task loss,
logit KD and the modality-level Gram matrix loss (arXiv 2112.11447), on the
TensorFlow, JAX and PyTorch backends.

The public names below load on first use, so `import keras_gramkd` imports
nothing heavy, and the `gramkd` command can pick the Keras backend before keras
is imported. Beyond keras and numpy, nothing else is ever imported by the core.
Once keras is imported, the classes Keras needs to load saved files register
themselves (`keras_gramkd.registration`), so `keras.saving.load_model` finds a
saved `Distiller` after `import keras_gramkd`.
"""

import importlib
import importlib.util

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Distiller": "keras_gramkd.distiller",
    "DistillationTerm": "keras_gramkd.terms",
    "Feature": "keras_gramkd.features",
    "FitNetTerm": "keras_gramkd.relational",
    "GramTerm": "keras_gramkd.terms",
    "KDTerm": "keras_gramkd.terms",
    "LogitKD": "keras_gramkd.losses",
    "ModalityGram": "keras_gramkd.losses",
    "ModalityDropout": "keras_gramkd.layers",
    "ModalitySPTerm": "keras_gramkd.relational",
    "ModalityStack": "keras_gramkd.layers",
    "ModalityTerm": "keras_gramkd.terms",
    "PKTTerm": "keras_gramkd.relational",
    "RKDTerm": "keras_gramkd.relational",
    "SPTerm": "keras_gramkd.relational",
    "TeacherCache": "keras_gramkd.cache",
    "evaluate_robustness": "keras_gramkd.robustness",
}
_SUBMODULES = (
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
)

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


# Keras backend -> the package it needs (each is an extra of keras-gramkd).
BACKEND_PACKAGES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def missing_backend_message(backend):
    """The fix for a Keras backend whose package is not installed, or None.

    >>> missing_backend_message("numpy") is None
    True
    """
    package = BACKEND_PACKAGES.get(backend)
    if package is None or importlib.util.find_spec(package) is not None:
        return None
    return (
        f"The Keras backend {backend!r} needs the {package} package, which is not "
        f'installed. Install it with: pip install "keras-gramkd[{backend}]" (or '
        "pick an installed backend with KERAS_BACKEND)."
    )


def _import(module):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        backend = next(
            (b for b, p in BACKEND_PACKAGES.items() if error.name == p), None
        )
        message = backend and missing_backend_message(backend)
        if message:
            raise ModuleNotFoundError(message, name=error.name) from error
        raise


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(_import(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return _import(f"keras_gramkd.{name}")
    raise AttributeError(f"module 'keras_gramkd' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


# Saved Distillers and layers load after `import keras_gramkd` (see the module).
importlib.import_module("keras_gramkd.registration").install()
