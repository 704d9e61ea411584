"""The data a cache is built from or attached to: numpy dicts, tf.data, PyDataset.

`source_batches` yields the input dicts of a data source batch by batch;
`split_element` / `join_element` take a batch apart into x and the rest (labels,
weights) and put it back; `checksum_keys` names the inputs a teacher's
targets depend on.

>>> import numpy as np
>>> x, rest = split_element(({"a": np.zeros(2)}, np.ones(2)))
>>> sorted(x), len(rest)
(['a'], 1)
"""

import keras

from keras_gramkd.bad_samples import MODALITY_MASK_KEY
from keras_gramkd.network import input_specs
from keras_gramkd.terms import TARGET_PREFIX


def split_element(element):
    """(x, rest) of a batch or dataset element: x, (x, y) or (x, y, weights)."""
    if isinstance(element, (tuple, list)):
        return element[0], tuple(element[1:])
    return element, ()


def join_element(x, rest):
    return (x, *rest) if rest else x


def is_tf_dataset(data):
    return hasattr(data, "element_spec") and hasattr(data, "as_numpy_iterator")


def require_dict(x, where):
    if not isinstance(x, dict):
        raise ValueError(
            f"{where} gives inputs of type {type(x).__name__}; the cache adds "
            "the teacher's targets as extra keys of a dict of inputs. Give x "
            "as a dict input name -> array (the names of the models' "
            "keras.Input)."
        )


def num_rows(x):
    sizes = {key: len(value) for key, value in x.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(
            f"The input arrays have different numbers of samples: {sizes}. "
            "Give every array one row per sample."
        )
    return next(iter(sizes.values()))


def is_batched(distiller, x_spec):
    """Whether a tf.data element holds a batch: its rank against the teacher's
    declared input rank (a teacher without declared shapes: assume batched)."""
    _, shapes = input_specs(distiller.teacher)
    for key, shape in shapes.items():
        if key in x_spec and x_spec[key].shape.rank is not None:
            return x_spec[key].shape.rank == len(shape)
    return True


def source_batches(distiller, x, batch_size):
    """The batches of inputs of a numpy dict, tf.data.Dataset or PyDataset."""
    if isinstance(x, dict):
        n = num_rows(x)
        for start in range(0, n, batch_size):
            yield {key: value[start : start + batch_size] for key, value in x.items()}
    elif is_tf_dataset(x):
        x_spec, _ = split_element(x.element_spec)
        require_dict(x_spec, "The tf.data.Dataset")
        if int(x.cardinality()) == -1:  # tf.data.INFINITE_CARDINALITY
            raise ValueError(
                "The tf.data.Dataset is infinite (repeat()?): a cache covers a "
                "fixed data set. Build it from the dataset before repeat()."
            )
        if not is_batched(distiller, x_spec):
            x = x.batch(batch_size)
        for element in x.as_numpy_iterator():
            yield split_element(element)[0]
    elif isinstance(x, keras.utils.PyDataset):
        if x.num_batches is None:
            raise ValueError(
                "The PyDataset is infinite (num_batches is None): a cache "
                "covers a fixed data set."
            )
        for index in range(x.num_batches):
            batch, _ = split_element(x[index])
            require_dict(batch, "The PyDataset")
            yield batch
    else:
        raise TypeError(
            "TeacherCache takes a dict of numpy arrays, a tf.data.Dataset or a "
            f"keras.utils.PyDataset; got {type(x).__name__}."
        )


def checksum_keys(distiller, x):
    """The inputs the teacher's targets depend on, sorted."""
    names, _ = input_specs(distiller.teacher)
    if names is None:
        keys = [key for key in x if not str(key).startswith(TARGET_PREFIX)]
    else:
        keys = [names] if isinstance(names, str) else list(names)
        if distiller.modality_names and MODALITY_MASK_KEY in x:
            keys.append(MODALITY_MASK_KEY)
    missing = [key for key in keys if key not in x]
    if missing:
        raise ValueError(
            f"The data lacks the teacher's input(s) {missing}; it has keys "
            f"{sorted(x)}. Give one entry per teacher input."
        )
    return sorted(keys)
