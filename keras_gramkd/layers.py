"""Keras layers for multi-modal models: `ModalityStack`.

Example:

>>> import numpy as np
>>> from keras_gramkd.layers import ModalityStack
>>> image = np.ones((2, 4, 4, 8), "float32")   # (batch, h, w, d): averaged over h, w
>>> audio = np.ones((2, 8), "float32")
>>> tuple(ModalityStack()([image, audio]).shape)
(2, 2, 8)
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_gramkd")
class ModalityStack(keras.layers.Layer):
    """Stacks per-modality embeddings into one (batch, M, d) tensor.

    Each input is (batch, d) or (batch, ..., d); the middle axes of the latter
    are averaged away (a sequence or a feature map becomes one vector). All
    modalities must share the width d: the Gram matrix takes inner products
    between them.

    Args:
        names: for dict inputs, the order of the modalities along axis 1.
            Without it a dict is stacked in sorted key order.

    Input: a list (stacked in list order) or a dict of tensors.
    Output: (batch, M, d).
    """

    def __init__(self, names=None, **kwargs):
        super().__init__(**kwargs)
        self.names = None if names is None else list(names)

    def get_config(self):
        return {**super().get_config(), "names": self.names}

    def _ordered(self, inputs):
        if not isinstance(inputs, dict):
            return list(inputs)
        names = self.names if self.names is not None else sorted(inputs)
        missing = [name for name in names if name not in inputs]
        if missing:
            raise ValueError(
                f"ModalityStack: no input for modalities {missing}; "
                f"got keys {sorted(inputs)}."
            )
        return [inputs[name] for name in names]

    def _check_shapes(self, shapes):
        if not shapes:
            raise ValueError("ModalityStack needs at least one modality.")
        for shape in shapes:
            if len(shape) < 2:
                raise ValueError(
                    "ModalityStack: each modality must be (batch, d) or "
                    f"(batch, ..., d); got shape {tuple(shape)}."
                )
        widths = [shape[-1] for shape in shapes]
        if len(set(widths)) > 1:
            raise ValueError(
                f"ModalityStack: modality widths differ ({widths}); the Gram "
                "matrix needs one width d for all modalities. Add a projection "
                "(for example keras.layers.Dense(d)) after each embedding."
            )

    def compute_output_shape(self, input_shape):
        shapes = self._ordered(input_shape)
        self._check_shapes(shapes)
        return (shapes[0][0], len(shapes), shapes[0][-1])

    def call(self, inputs):
        tensors = self._ordered(inputs)
        self._check_shapes([tuple(t.shape) for t in tensors])
        pooled = [
            t
            if len(t.shape) == 2
            else ops.mean(t, axis=tuple(range(1, len(t.shape) - 1)))
            for t in tensors
        ]
        return ops.stack(pooled, axis=1)
