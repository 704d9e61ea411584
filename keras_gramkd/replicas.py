"""Keras' replica scaling of losses: the one place this package reaches inside Keras.

Under `tf.distribute`, Keras divides every loss it reduces by the number of
replicas in sync (the replicas' summed gradients are then the global batch's),
and its metrics report the undivided value. Keras exposes no public API for
this, so the two functions below call `keras.src.losses.loss`'s. If a Keras
release moves them, only this module changes; `tests/test_distribution.py`
checks the result against one device on every backend.

>>> float(scale_for_replicas(2.0)), float(unscale_for_replicas(2.0))  # one device
(2.0, 2.0)
"""

import keras
from keras.src.losses.loss import (
    scale_loss_for_distribution,
    unscale_loss_for_distribution,
)


def scale_for_replicas(loss):
    """`loss` divided by the replicas in sync under `tf.distribute`, as Keras
    divides every loss it reduces (identity on one device and other backends).
    """
    return scale_loss_for_distribution(loss)


def unscale_for_replicas(loss):
    """The inverse of `scale_for_replicas`: the value a metric reports."""
    return unscale_loss_for_distribution(loss)


MULTI_WORKER_MESSAGE = (
    "Keras 3 cannot fit or evaluate any model under "
    "tf.distribute.MultiWorkerMirroredStrategy: its TensorFlow trainer fails "
    "with 'Attempt to convert a value (PerReplica...)' for a plain keras.Model "
    "too (keras-team/keras#20585). Across machines, use the JAX backend with "
    "keras.distribution.initialize and DataParallel; on one machine, "
    "tf.distribute.MirroredStrategy."
)


def check_strategy(model):
    """Raises a ValueError under a TensorFlow strategy Keras cannot train with.

    >>> check_strategy(keras.Sequential())  # the default strategy: nothing
    """
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    if isinstance(model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
        raise ValueError(MULTI_WORKER_MESSAGE)
