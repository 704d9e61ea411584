"""keras_gramkd: multi-modality knowledge distillation for Keras 3.

A frozen multi-modal teacher teaches a small student through the task loss,
logit KD and the modality-level Gram matrix loss (arXiv 2112.11447), on the
TensorFlow, JAX and PyTorch backends. Importing the package imports only keras
and numpy.
"""

from keras_gramkd import layers, losses, ops
from keras_gramkd.distiller import Distiller
from keras_gramkd.layers import ModalityStack
from keras_gramkd.losses import LogitKD, ModalityGram

__version__ = "0.1.0"

__all__ = [
    "Distiller",
    "LogitKD",
    "ModalityGram",
    "ModalityStack",
    "layers",
    "losses",
    "ops",
]
