"""Keras layers for multi-modal models: `ModalityStack`, `ModalityDropout`.

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
        return stack_modalities(tensors)


def stack_modalities(tensors):
    """`ModalityStack`'s computation as a plain function, without the layer.

    (batch, d) or (batch, ..., d) tensors of one width d, middle axes averaged,
    stacked in list order into (batch, M, d). The `Distiller` calls it on the
    embeddings its networks return: in eager PyTorch a Keras layer call costs
    about 0.4 ms of Python, here several times the stack itself.
    """
    pooled = [
        t if len(t.shape) == 2 else ops.mean(t, axis=tuple(range(1, len(t.shape) - 1)))
        for t in tensors
    ]
    return ops.stack(pooled, axis=1)


@keras.saving.register_keras_serializable(package="keras_gramkd")
class ModalityDropout(keras.layers.Layer):
    """Zeroes whole modalities at training time, independently per sample.

    Each modality tensor of a sample is zeroed with probability `rate` (not
    rescaled: a missing modality reads as zeros, as it would at test time), so
    a model learns not to lean on any single modality. Identity at inference.

    Args:
        rate: probability in [0, 1) of dropping each modality of each sample.
        seed: optional seed of the random draws.
        return_mask: also return the (batch, M) float mask of the modalities
            kept (1) and dropped (0); all ones at inference. Name this layer
            as the Distiller's `student_mask_layer` and the Gram loss leaves
            the dropped modalities' pairs out.

    Input: a list of M per-modality tensors (batch, ...).
    Output: the list with dropped modalities zeroed, or `(list, mask)`.

    Example:

    >>> import numpy as np
    >>> views = [np.ones((4, 2), "float32"), np.ones((4, 3), "float32")]
    >>> dropout = ModalityDropout(0.5, seed=0, return_mask=True)
    >>> out, mask = dropout(views, training=True)
    >>> mask = np.asarray(mask)
    >>> all(np.array_equal(np.asarray(x).max(axis=1), mask[:, i])
    ...     for i, x in enumerate(out))
    True
    """

    def __init__(self, rate, seed=None, return_mask=False, **kwargs):
        super().__init__(**kwargs)
        if isinstance(rate, bool) or not 0.0 <= float(rate) < 1.0:
            raise ValueError(
                f"ModalityDropout rate must be a number in [0, 1); got {rate!r}."
            )
        self.rate = float(rate)
        self.seed = seed
        self.return_mask = bool(return_mask)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def get_config(self):
        return {
            **super().get_config(),
            "rate": self.rate,
            "seed": self.seed,
            "return_mask": self.return_mask,
        }

    def compute_output_shape(self, input_shape):
        shapes = [tuple(shape) for shape in input_shape]
        if self.return_mask:
            return shapes, (shapes[0][0], len(shapes))
        return shapes

    def call(self, inputs, training=False):
        inputs = list(inputs)
        batch = ops.shape(inputs[0])[0]
        if not training or self.rate == 0.0:
            keep = ops.ones((batch, len(inputs)), dtype=self.compute_dtype)
            outputs = inputs
        else:
            draws = keras.random.uniform((batch, len(inputs)), seed=self.seed_generator)
            keep = ops.cast(draws >= self.rate, self.compute_dtype)
            outputs = [
                x
                * ops.cast(
                    ops.reshape(keep[:, i], (-1,) + (1,) * (len(x.shape) - 1)), x.dtype
                )
                for i, x in enumerate(inputs)
            ]
        return (outputs, keep) if self.return_mask else outputs
