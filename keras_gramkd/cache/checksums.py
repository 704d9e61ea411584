"""Per-sample checksums of a cache's inputs, the same in numpy and in TensorFlow.

Each sample's bytes (floats as float32) are read as 16-bit words (8-bit for
one-byte dtypes) and summed with fixed random integer weights, exactly in
int64: `sample_checksums` for numpy arrays, `tf_sample_checksums` inside a
tf.data map. `check_inputs` compares a batch with the checksums of build time.

>>> import numpy as np
>>> x = {"a": np.arange(6, dtype="float32").reshape(3, 2)}
>>> sums = sample_checksums(x, ["a"])
>>> sums.shape, bool((sums[0] != sums[1]).all())
((3, 1), True)
"""

import functools
import math

import numpy as np

from keras_gramkd.bad_samples import MODALITY_MASK_KEY

REBUILD = "Rebuild the cache with TeacherCache.build(distiller, data)."
_CHECKSUM_SEED = 0x6B645F63  # fixes the checksum weights: part of the format
_CHUNK_WORDS = 1 << 22  # rows x words per numpy checksum chunk


@functools.lru_cache(maxsize=32)
def checksum_weights(n_words):
    """Random integer weights small enough that sums of 16-bit words times
    weights stay below 2^62: the int64 sums are exact in any order."""
    bits = min(31, 46 - math.ceil(math.log2(max(n_words, 2))))
    rng = np.random.default_rng(_CHECKSUM_SEED + n_words)
    weights = rng.integers(1, 2**bits, size=n_words, dtype=np.int64)
    weights.flags.writeable = False
    return weights


def _np_words(array):
    """(n, words) unsigned words of each sample's bytes (floats as float32)."""
    array = np.asarray(array)
    if array.dtype.kind == "f":
        array = array.astype(np.float32)
    array = np.ascontiguousarray(array.reshape(len(array), -1))
    word = np.uint8 if array.dtype.itemsize == 1 else np.uint16
    return array.view(word).reshape(len(array), -1)


def sample_checksums(x, keys):
    """(n, len(keys)) int64: one exact weighted sum per sample and input."""
    columns = []
    for key in keys:
        words = _np_words(x[key])
        weights = checksum_weights(words.shape[1])
        rows = max(1, _CHUNK_WORDS // max(words.shape[1], 1))
        columns.append(
            np.concatenate(
                [
                    words[start : start + rows].astype(np.int64) @ weights
                    for start in range(0, len(words), rows)
                ]
            )
        )
    return np.stack(columns, axis=1)


def tf_sample_checksums(tf, x, keys):
    """`_sample_checksums` of a batch, as TensorFlow ops for a tf.data map."""
    columns = []
    for key in keys:
        tensor = x[key]
        if tensor.dtype.is_floating:
            tensor = tf.cast(tensor, tf.float32)
        if tensor.dtype == tf.bool:
            tensor = tf.cast(tensor, tf.uint8)
        word = tf.uint8 if tensor.dtype.size == 1 else tf.uint16
        if tensor.dtype != word:
            tensor = tf.bitcast(tensor, word)
        n_words = math.prod(tensor.shape[1:])
        if n_words is None:
            raise ValueError(
                f"Input {key!r} of the tf.data pipeline has shape "
                f"{tensor.shape} per batch; the cache's checksums need a fixed "
                "shape per sample. Pad or resize the samples to one shape."
            )
        words = tf.cast(tf.reshape(tensor, (-1, n_words)), tf.int64)
        weights = tf.constant(checksum_weights(n_words))
        columns.append(tf.reduce_sum(words * weights, axis=1))
    return tf.stack(columns, axis=1)


def check_inputs(x, keys, expected, where, rebuild=REBUILD):
    """Raises unless the inputs x have the checksums `expected` of build time
    (the message ends with `rebuild`, how to make the cache again)."""
    missing = [key for key in keys if key not in x]
    if missing:
        raise ValueError(
            f"{where} lacks {missing}, which the cache was built with (the "
            f"teacher's inputs and {MODALITY_MASK_KEY!r} if the data had "
            f"one). Give the same inputs as at build time, or {rebuild}"
        )
    found = sample_checksums(x, keys)
    differ = np.flatnonzero(np.any(found != expected, axis=1))
    if differ.size:
        raise ValueError(
            f"{differ.size} of {len(found)} samples of {where} differ from "
            f"the data the cache was built from (first at position(s) "
            f"{differ[:5].tolist()}): a different data set, another sample "
            "order, or augmentation that changes inputs. Attach to the "
            "data as it was at build time, before shuffling or "
            f"augmenting; or {rebuild} Augmentation that changes inputs "
            "each epoch needs the live teacher."
        )
