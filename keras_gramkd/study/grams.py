"""Per-sample modality Gram matrices of a trained model, as numpy arrays."""

import keras
import numpy as np

from keras_gramkd.features import FeatureExtractor, pool_tokens
from keras_gramkd.network import Network
from keras_gramkd.ops import gram_matrix
from keras_gramkd.terms import GramTerm, spec_features


def gram_specs(
    teacher_modalities,
    student_modalities,
    what="teacher_modalities and student_modalities (for |ΔG|)",
):
    """The teacher's and the student's specs of a |ΔG| measurement, aligned.

    Each is what a `GramTerm` takes (a dict modality name -> address, or one
    address whose output is the stacked (batch, M, d) embeddings) and is
    refused as a `GramTerm` refuses it. Where both are dicts, the teacher's
    is cut to the student's modalities, in the student's order. `what`
    names the arguments in the messages.

    >>> gram_specs({"a": "t_a", "b": "t_b"}, {"b": "s_b", "a": "s_a"})[0]
    {'b': Feature('t_b', pool='mean'), 'a': Feature('t_a', pool='mean')}
    """
    try:
        term = GramTerm(teacher_modalities, student_modalities, name="gram_gap")
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} take what a GramTerm takes: {error}") from None
    return term.teacher_spec(), term.student_spec()


def modality_grams(model, modalities, x, normalize="l2", batch_size=256):
    """The (n, M, M) modality Gram matrices of `model` on inputs `x`.

    Args:
        model: a functional or Sequential `keras.Model`.
        modalities: dict modality name -> feature address (a layer name, a
            path into nested models, a layer object or a `Feature`), as the
            `Distiller` takes them; the Gram rows follow the dict's order.
            Or one address whose output is already the stacked (batch, M, d)
            embeddings (a fused block's tokens), whose Gram is taken as it is.
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
    if modalities is None or (isinstance(modalities, dict) and not modalities):
        raise ValueError(
            "modalities must be a non-empty dict modality name -> feature "
            "address, or one address whose output is (batch, M, d); got "
            f"{modalities!r}."
        )
    spec = gram_specs(modalities, modalities, "modalities")[0]
    features = spec_features(spec)
    network = Network(model, "model")
    shapes = network.add_features(features)
    if not isinstance(spec, dict) and len(shapes[spec.address]) != 3:
        raise ValueError(
            f"modalities is one address, {spec.address!r}, whose output has "
            f"shape {shapes[spec.address]}; a single address must output the "
            "stacked (batch, M, d) embeddings. Otherwise pass a dict modality "
            "name -> address."
        )
    extractor: FeatureExtractor = network.extractor
    inputs = network.select_inputs(x)
    n = len(keras.tree.flatten(inputs)[0])
    grams = []
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        batch = keras.tree.map_structure(lambda v, rows=rows: v[rows], inputs)
        _, found = extractor(batch, training=False)
        if isinstance(spec, dict):
            stacked = keras.ops.stack(
                [pool_tokens(found[f.address], f.pool) for f in features], 1
            )
        else:
            stacked = found[spec.address]
        grams.append(keras.ops.convert_to_numpy(gram_matrix(stacked, normalize)))
    return np.concatenate(grams).astype("float32")
