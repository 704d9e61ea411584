"""Data for multi-modal distillation: embedded real digits, synthetic sets, TFDS.

- `load_mfeat`: the UCI "Multiple Features" digits (six views, shipped inside
  the package, CC BY 4.0; see `keras_gramkd.datasets.mfeat` for attribution).
- `make_multimodal`: synthetic classes with a known modality correlation.
- `load_av_mnist`: MNIST images paired with spoken digits (needs the `data`
  extra and TFDS data).
"""

from keras_gramkd.datasets.av_mnist import load_av_mnist
from keras_gramkd.datasets.mfeat import MFEAT_VIEWS, load_mfeat
from keras_gramkd.datasets.synthetic import make_multimodal

__all__ = ["MFEAT_VIEWS", "load_av_mnist", "load_mfeat", "make_multimodal"]
