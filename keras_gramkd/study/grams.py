"""Per-sample modality Gram matrices of a trained model, as numpy arrays."""

import keras
import numpy as np

from keras_gramkd.features import FeatureExtractor, as_feature, pool_tokens
from keras_gramkd.network import Network
from keras_gramkd.ops import gram_matrix


def modality_grams(model, modalities, x, normalize="l2", batch_size=256):
    """The (n, M, M) modality Gram matrices of `model` on inputs `x`.

    Args:
        model: a functional or Sequential `keras.Model`.
        modalities: dict modality name -> feature address (a layer name, a
            path into nested models, a layer object or a `Feature`), as the
            `Distiller` takes them; the Gram rows follow the dict's order.
        x: the model's inputs (a dict of arrays; extra keys are ignored).
        normalize: as `keras_gramkd.ops.gram_matrix`.
        batch_size: rows per forward call.

    Returns:
        float32 numpy array (n, M, M).

    Example:

    >>> import keras, numpy as np
    >>> a, b = keras.Input((3,), name="a"), keras.Input((5,), name="b")
    >>> ea = keras.layers.Dense(4, name="ea")(a)
    >>> eb = keras.layers.Dense(4, name="eb")(b)
    >>> model = keras.Model({"a": a, "b": b}, keras.layers.Add()([ea, eb]))
    >>> x = {"a": np.ones((10, 3), "float32"), "b": np.ones((10, 5), "float32")}
    >>> modality_grams(model, {"a": "ea", "b": "eb"}, x).shape
    (10, 2, 2)
    """
    if not isinstance(modalities, dict) or not modalities:
        raise ValueError(
            "modalities must be a non-empty dict modality name -> feature "
            f"address; got {modalities!r}."
        )
    network = Network(model, "model")
    features = {name: as_feature(spec) for name, spec in modalities.items()}
    network.add_features(list(features.values()))
    extractor: FeatureExtractor = network.extractor
    inputs = network.select_inputs(x)
    n = len(keras.tree.flatten(inputs)[0])
    grams = []
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        batch = keras.tree.map_structure(lambda v, rows=rows: v[rows], inputs)
        _, found = extractor(batch, training=False)
        stacked = keras.ops.stack(
            [pool_tokens(found[f.address], f.pool) for f in features.values()], 1
        )
        grams.append(keras.ops.convert_to_numpy(gram_matrix(stacked, normalize)))
    return np.concatenate(grams).astype("float32")
