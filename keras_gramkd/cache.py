"""Teacher-target cache: run the teacher once, then train without it.

The teacher of a `Distiller` is frozen and runs in inference mode, so on data
that is fed unchanged every epoch its outputs are the same every epoch.
`TeacherCache.build` runs it once over the data set and keeps what the losses
need: whatever each distillation term's `teacher_targets` returns, under the
batch keys `"teacher/<term>/<key>"` — for the short form the logits
(`"teacher/kd/logits"`, (n, classes)) and, when `gram_weight > 0`, the
teacher's modality Gram matrices (`"teacher/gram/gram"`, (n, M, M)), formed as
the Gram loss forms them, with the data's `"modality_mask"`. The cache does not
know the terms' classes: a term of your own is cached the same way.
`TeacherCache.attach` adds them to every sample's input dict; the `Distiller`
finds them in the batch and does not run the teacher.

Example:

>>> import keras, numpy as np
>>> from keras_gramkd import Distiller
>>> from keras_gramkd.cache import TeacherCache
>>> def net(prefix, width):
...     a = keras.Input((4,), name="a")
...     b = keras.Input((6,), name="b")
...     ea = keras.layers.Dense(width, name=f"{prefix}_a")(a)
...     eb = keras.layers.Dense(width, name=f"{prefix}_b")(b)
...     logits = keras.layers.Dense(3)(keras.layers.Concatenate()([ea, eb]))
...     return keras.Model({"a": a, "b": b}, logits)
>>> distiller = Distiller(
...     teacher=net("t", 16), student=net("s", 4),
...     teacher_modalities={"a": "t_a", "b": "t_b"},
...     student_modalities={"a": "s_a", "b": "s_b"},
... )
>>> distiller.compile(
...     optimizer="adam",
...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
... )
>>> x = {"a": np.ones((32, 4), "float32"), "b": np.ones((32, 6), "float32")}
>>> cache = TeacherCache.build(distiller, x, batch_size=16)
>>> len(cache), sorted(cache.targets)
(32, ['teacher/gram/gram', 'teacher/kd/logits'])
>>> data = cache.attach(x)  # x plus the targets, one row per sample
>>> sorted(data)
['a', 'b', 'teacher/gram/gram', 'teacher/kd/logits']
>>> history = distiller.fit(data, np.zeros(32, "int32"), shuffle=True, verbose=0)
>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "targets.npz")
>>> cache.save(path)
>>> len(TeacherCache.load(path))
32

Alignment. The targets travel with their samples: for numpy data they are
extra arrays of the input dict, so Keras' `shuffle=True` permutes them with
the inputs (and `validation_split` slices them with the inputs). A
`tf.data.Dataset` gets them element by element, by position: attach to the
dataset in the order it had at build time (unshuffled), then shuffle and batch.
A `keras.utils.PyDataset` gets them by batch index, so `shuffle=True` (which
reorders batches) keeps them aligned; its batches must hold the same samples
as at build time (a PyDataset that reshuffles rows between epochs fails the
checks below). Validation data needs a cache of its own, or runs the teacher.

What is checked, each time with an error that names the problem and the fix:

- the number of samples (numpy: at `attach`; PyDataset: its batch sizes;
  tf.data: its cardinality when known, and no element past the cache's end);
- the teacher, by a fingerprint (sha256 over its weights' dtypes, shapes and
  bytes): weights changed after caching, or another teacher;
- the terms' settings the cached targets depend on (each term's class and
  config without its weight: for a Gram term its normalisation and the
  teacher's feature addresses), and that the cache holds targets for every
  term whose weight is not 0;
- every sample's inputs, by a checksum recorded at build time (the inputs the
  teacher reads, and `"modality_mask"`): a different data set of the same
  size, another sample order, or inputs that change between epochs. Numpy
  data is checked once, at `attach`. A tf.data pipeline is checked inside the
  pipeline, on every element of every epoch, so augmentation placed before
  `attach` fails on the first element it changes (a `tf.errors`
  `InvalidArgumentError` when iterating, on every Keras backend). A PyDataset
  is checked in every `__getitem__`.

What the cache cannot know:

- Augmentation after `attach` (a `map` after it, or a transform in a wrapper
  around the attached PyDataset): it changes inputs after the check, and the
  student then sees inputs whose teacher targets are not the cached ones.
  Augmentation that changes inputs each epoch needs the live teacher: with it
  the teacher sees each epoch's inputs; a cache holds one epoch's targets.
- Augmentation inside the models is not a problem: a student's random layers
  act on the student only, as with the live teacher, and random layers in the
  teacher's own input path (`keras.layers.RandomFlip` and the like) are off in
  inference mode, which is how the teacher always runs.
- Numpy arrays changed in place after `attach` (`x["a"][3] = ...`,
  `x["a"] *= 2`): the returned dict holds the same array objects (no copy,
  so no second copy of the data in memory) and numpy data is checked once, at
  `attach`, so the student then trains on inputs whose cached targets belong
  to the old values. Change the arrays before `attach` (or attach again
  afterwards, which checks them again), or pass copies.
- A teacher changed after `attach`: the fingerprint is compared at `attach`
  only. Do not train or reload the teacher while training from the cache.
- Anything else the teacher's outputs depend on: its code (a subclassed
  `call`), a dtype policy, Python state, or randomness it applies in
  inference mode. The fingerprint covers the weights, not these.
- The checksums are exact 64-bit weighted sums of each sample's bytes (floats
  as float32): any change of a single number is always caught, and an
  accidental change of several passes with a probability below about 2^-15,
  but they are no defence against a deliberately crafted collision.

Cost and precision. Building runs one compiled teacher forward per batch
(Keras' `predict_on_batch`: a `tf.function`, a `jax.jit` or torch without
gradients; the last, smaller batch is padded so that it needs no second
compile), about the cost of one epoch of teacher forwards plus one compile.
Each training step then saves a teacher forward. `dtype="float16"` stores the
targets in half the bytes: logits keep 11 significant bits (relative error up
to 2^-11 ≈ 4.9e-4) and Gram entries, which lie in [-1, 1] under the default
`"l2"` normalisation, an absolute error up to 2^-12 ≈ 2.4e-4. Measured on the
mfeat digits with the demo's trained teacher (logits up to 10.5, T=4), the KD
loss moved by 1.7e-4 (of 11.4: 1.5e-5 relative) and the Gram loss by 3e-7;
three epochs of training from either cache stayed within 3e-4 of each other.
The tests accept `FLOAT16_LOSS_TOLERANCE`. A target beyond float16's range
(±65504) is refused at build time.

File format (`save` / `load`): one uncompressed `.npz` file (numpy's zip of
`.npy` arrays, read without pickle) holding the target arrays, `checksums`
(n, inputs) int64, `batch_sizes` (the batches the build read) and `metadata`,
UTF-8 JSON as uint8: format name and version, the number of samples, dtype,
teacher fingerprint, term settings and the names of the checksummed inputs.
It is written to a temporary file in the same directory and renamed over the
target (`keras_gramkd.saving.atomic_save`).
"""

import functools
import hashlib
import json
import math
import weakref
import zipfile

import keras
import numpy as np

from keras_gramkd.distiller import MODALITY_MASK_KEY
from keras_gramkd.network import input_specs
from keras_gramkd.saving import atomic_save
from keras_gramkd.terms import TARGET_PREFIX

FORMAT_NAME = "keras_gramkd.TeacherCache"
FORMAT_VERSION = 2
DTYPES = ("float32", "float16")
FLOAT16_LOSS_TOLERANCE = 1e-3
"""Largest difference of the KD or Gram loss between a float16 and a float32
cache that the tests accept (measured: up to 2e-4, see the module docstring)."""

REBUILD = "Rebuild the cache with TeacherCache.build(distiller, data)."
_CHECKSUM_SEED = 0x6B645F63  # fixes the checksum weights: part of the format
_CHUNK_WORDS = 1 << 22  # rows x words per numpy checksum chunk
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def teacher_fingerprint(teacher):
    """sha256 hex digest over the dtypes, shapes and bytes of a model's weights.

    Layer and weight names are left out: they change with the order in which a
    session creates layers, while the weights are what the outputs depend on.
    """
    digest = hashlib.sha256()
    for weight in teacher.weights:
        array = np.ascontiguousarray(keras.ops.convert_to_numpy(weight.value))
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _term_settings(distiller):
    """What the cached targets depend on besides the teacher's weights, as
    JSON (so that a loaded cache compares equal)."""
    return json.loads(json.dumps(distiller.target_settings()))


# --- per-sample checksums, the same in numpy and in TensorFlow ---------------


@functools.lru_cache(maxsize=32)
def _checksum_weights(n_words):
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


def _sample_checksums(x, keys):
    """(n, len(keys)) int64: one exact weighted sum per sample and input."""
    columns = []
    for key in keys:
        words = _np_words(x[key])
        weights = _checksum_weights(words.shape[1])
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


def _tf_sample_checksums(tf, x, keys):
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
        weights = tf.constant(_checksum_weights(n_words))
        columns.append(tf.reduce_sum(words * weights, axis=1))
    return tf.stack(columns, axis=1)


def _check_inputs(x, keys, expected, where):
    """Raises unless the inputs x have the checksums `expected` of build time."""
    missing = [key for key in keys if key not in x]
    if missing:
        raise ValueError(
            f"{where} lacks {missing}, which the cache was built with (the "
            f"teacher's inputs and {MODALITY_MASK_KEY!r} if the data had "
            f"one). Give the same inputs as at build time, or {REBUILD}"
        )
    found = _sample_checksums(x, keys)
    differ = np.flatnonzero(np.any(found != expected, axis=1))
    if differ.size:
        raise ValueError(
            f"{differ.size} of {len(found)} samples of {where} differ from "
            f"the data the cache was built from (first at position(s) "
            f"{differ[:5].tolist()}): a different data set, another sample "
            "order, or augmentation that changes inputs. Attach to the "
            "data as it was at build time, before shuffling or "
            f"augmenting; or {REBUILD} Augmentation that changes inputs "
            "each epoch needs the live teacher."
        )


# --- data sources -------------------------------------------------------------


def _split(element):
    """(x, rest) of a batch or dataset element: x, (x, y) or (x, y, weights)."""
    if isinstance(element, (tuple, list)):
        return element[0], tuple(element[1:])
    return element, ()


def _join(x, rest):
    return (x, *rest) if rest else x


def _is_tf_dataset(data):
    return hasattr(data, "element_spec") and hasattr(data, "as_numpy_iterator")


def _require_dict(x, where):
    if not isinstance(x, dict):
        raise ValueError(
            f"{where} gives inputs of type {type(x).__name__}; the cache adds "
            "the teacher's targets as extra keys of a dict of inputs. Give x "
            "as a dict input name -> array (the names of the models' "
            "keras.Input)."
        )


def _num_rows(x):
    sizes = {key: len(value) for key, value in x.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(
            f"The input arrays have different numbers of samples: {sizes}. "
            "Give every array one row per sample."
        )
    return next(iter(sizes.values()))


def _is_batched(distiller, x_spec):
    """Whether a tf.data element holds a batch: its rank against the teacher's
    declared input rank (a teacher without declared shapes: assume batched)."""
    _, shapes = input_specs(distiller.teacher)
    for key, shape in shapes.items():
        if key in x_spec and x_spec[key].shape.rank is not None:
            return x_spec[key].shape.rank == len(shape)
    return True


def _source_batches(distiller, x, batch_size):
    """The batches of inputs of a numpy dict, tf.data.Dataset or PyDataset."""
    if isinstance(x, dict):
        n = _num_rows(x)
        for start in range(0, n, batch_size):
            yield {key: value[start : start + batch_size] for key, value in x.items()}
    elif _is_tf_dataset(x):
        x_spec, _ = _split(x.element_spec)
        _require_dict(x_spec, "The tf.data.Dataset")
        if int(x.cardinality()) == -1:  # tf.data.INFINITE_CARDINALITY
            raise ValueError(
                "The tf.data.Dataset is infinite (repeat()?): a cache covers a "
                "fixed data set. Build it from the dataset before repeat()."
            )
        if not _is_batched(distiller, x_spec):
            x = x.batch(batch_size)
        for element in x.as_numpy_iterator():
            yield _split(element)[0]
    elif isinstance(x, keras.utils.PyDataset):
        if x.num_batches is None:
            raise ValueError(
                "The PyDataset is infinite (num_batches is None): a cache "
                "covers a fixed data set."
            )
        for index in range(x.num_batches):
            batch, _ = _split(x[index])
            _require_dict(batch, "The PyDataset")
            yield batch
    else:
        raise TypeError(
            "TeacherCache takes a dict of numpy arrays, a tf.data.Dataset or a "
            f"keras.utils.PyDataset; got {type(x).__name__}."
        )


def _checksum_keys(distiller, x):
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


class _TeacherTargets(keras.Model):
    """`distiller.teacher_targets` as a model, for compiled `predict_on_batch`.

    It tracks the teacher, so that the compiled call takes the teacher's
    weights as state; the Distiller itself is held as a bound method, which
    Keras does not track.
    """

    def __init__(self, distiller):
        super().__init__(name="teacher_targets")
        self.teacher = distiller.teacher
        self.targets_of = distiller.teacher_targets
        self.built = True

    def call(self, x):
        return self.targets_of(x)


def _predict(model, x, size):
    """Targets of the batch x, padded to `size` rows to reuse the compiled call."""
    rows = len(next(iter(x.values())))
    if rows < size:
        x = {
            key: np.concatenate([value, np.repeat(value[-1:], size - rows, axis=0)])
            for key, value in x.items()
        }
    outputs = model.predict_on_batch(x)
    return {key: np.asarray(value[:rows]) for key, value in outputs.items()}


def _to_storage(targets, dtype):
    if dtype == "float32":
        return {key: value.astype(np.float32) for key, value in targets.items()}
    for key, value in targets.items():
        finite = value[np.isfinite(value)]
        largest = float(np.abs(finite).max()) if finite.size else 0.0
        if largest > _FLOAT16_MAX:
            raise ValueError(
                f"{key} holds values up to {largest:.4g}, beyond float16's "
                f"range (±{_FLOAT16_MAX:.0f}). Build the cache with "
                "dtype='float32'."
            )
    return {key: value.astype(np.float16) for key, value in targets.items()}


# --- the cache ----------------------------------------------------------------


class TeacherCache:
    """The teacher's targets for every sample of a fixed data set.

    Make one with `TeacherCache.build` or `TeacherCache.load`; the constructor
    takes the arrays as they are stored.

    Attributes:
        targets: dict batch key `"teacher/<term>/<key>"` -> (n, ...) numpy
            array, for each term of the Distiller with a non-zero weight.
        dtype: `"float32"` or `"float16"`, how the targets are stored.
        checksums: (n, len(checksum_keys)) int64 checksums of each sample's
            inputs at build time.
        checksum_keys: the checksummed inputs.
        batch_sizes: the batches the build read, in order (a PyDataset's own).
        fingerprint: `teacher_fingerprint` of the teacher at build time.
        term_settings: the terms' settings at build time, by term name.
    """

    def __init__(
        self,
        targets,
        checksums,
        checksum_keys,
        batch_sizes,
        fingerprint,
        term_settings,
        dtype,
        distiller=None,
    ):
        self.targets = targets
        self.checksums = checksums
        self.checksum_keys = list(checksum_keys)
        self.batch_sizes = [int(size) for size in batch_sizes]
        self.fingerprint = fingerprint
        self.term_settings = term_settings
        self.dtype = dtype
        self._distiller = weakref.ref(distiller) if distiller is not None else None

    @classmethod
    def build(cls, distiller, x, batch_size=256, dtype="float32"):
        """Runs `distiller.teacher_targets` once over `x` and keeps the results.

        Args:
            distiller: the `Distiller` that will train from the cache.
            x: a dict of numpy arrays; a `tf.data.Dataset` of x, (x, y) or
                (x, y, sample_weight), batched or not, in a fixed order; or a
                `keras.utils.PyDataset` of such batches. x is a dict of
                inputs, with `"modality_mask"` if the data has one.
            batch_size: rows per teacher call, for numpy data and an
                unbatched dataset (batched sources keep their batches).
            dtype: `"float32"`, or `"float16"` for half the bytes.

        Returns:
            A `TeacherCache`.
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}.")
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, int)
            or batch_size < 1
        ):
            raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}.")
        fingerprint = teacher_fingerprint(distiller.teacher)
        model = _TeacherTargets(distiller)
        keys, outputs, checksums, sizes = None, [], [], []
        for batch in _source_batches(distiller, x, batch_size):
            keys = keys or _checksum_keys(distiller, batch)
            batch = {key: np.asarray(batch[key]) for key in keys}
            sizes.append(_num_rows(batch))
            checksums.append(_sample_checksums(batch, keys))
            outputs.append(_predict(model, batch, sizes[0]))
        if not sizes:
            raise ValueError("The data holds no sample: there is nothing to cache.")
        targets = {
            key: np.concatenate([output[key] for output in outputs])
            for key in outputs[0]
        }
        return cls(
            _to_storage(targets, dtype),
            np.concatenate(checksums),
            keys,
            sizes,
            fingerprint,
            _term_settings(distiller),
            dtype,
            distiller=distiller,
        )

    def __len__(self):
        return len(self.checksums)

    @property
    def nbytes(self):
        """Bytes held in memory: the targets and the checksums."""
        return self.checksums.nbytes + sum(v.nbytes for v in self.targets.values())

    def __repr__(self):
        shapes = ", ".join(
            f"{k} {tuple(v.shape)}" for k, v in sorted(self.targets.items())
        )
        return f"TeacherCache({len(self)} samples, {self.dtype}: {shapes})"

    # --- attaching ---------------------------------------------------------

    def attach(self, x, distiller=None):
        """`x` with each sample's cached teacher targets added to its inputs.

        Args:
            x: data of one of the kinds `build` takes, holding the same
                samples in the same order as at build time: a dict of numpy
                arrays (returns a new dict with the target arrays added); a
                `tf.data.Dataset`, unshuffled (returns a dataset whose x
                dicts carry the targets: shuffle and batch after attaching);
                or a `keras.utils.PyDataset` (returns a PyDataset that adds
                each batch's targets).
            distiller: the `Distiller` that will train; by default the one the
                cache was built with (needed for a loaded cache). Its teacher
                and term settings must match the cache.

        Raises:
            ValueError: when the data or the teacher differ from build time.
        """
        distiller = self._resolve(distiller)
        keys = self._keys_for(distiller)
        if isinstance(x, dict):
            return self._attach_arrays(x, keys)
        if _is_tf_dataset(x):
            return self._attach_dataset(x, keys, distiller)
        if isinstance(x, keras.utils.PyDataset):
            return self._attach_pydataset(x, keys)
        raise TypeError(
            "attach takes a dict of numpy arrays, a tf.data.Dataset or a "
            f"keras.utils.PyDataset; got {type(x).__name__}."
        )

    def _resolve(self, distiller):
        if distiller is None and self._distiller is not None:
            distiller = self._distiller()
        if distiller is None:
            raise ValueError(
                "attach needs the Distiller that will train from the cache, to "
                "check its teacher against the cache: cache.attach(x, "
                "distiller)."
            )
        return distiller

    def _keys_for(self, distiller):
        """The target keys this Distiller reads, after checking its teacher."""
        settings = _term_settings(distiller)
        missing = [name for name in settings if name not in self.term_settings]
        if missing:
            raise ValueError(
                f"The cache holds no targets for term(s) {missing} (it was built "
                f"for a Distiller with the terms {list(self.term_settings)} on), "
                f"but this Distiller uses them. {REBUILD}"
            )
        for name, setting in settings.items():
            if setting != self.term_settings[name]:
                raise ValueError(
                    f"The cache's targets of term {name!r} were formed with "
                    f"{self.term_settings[name]}, but this Distiller uses "
                    f"{setting}. {REBUILD}"
                )
        fingerprint = teacher_fingerprint(distiller.teacher)
        if fingerprint != self.fingerprint:
            raise ValueError(
                "The teacher's weights differ from those the cache was built "
                f"with (fingerprint {fingerprint[:12]}… vs {self.fingerprint[:12]}"
                "…): the teacher changed after caching, or this is another "
                f"teacher. {REBUILD}"
            )
        prefixes = [f"{TARGET_PREFIX}{name}/" for name in settings]
        return [key for key in self.targets if key.startswith(tuple(prefixes))]

    def _size_error(self, found, what):
        return ValueError(
            f"The cache holds {len(self)} samples but {what} {found}: it was "
            f"built from other data. {REBUILD}"
        )

    def _attach_arrays(self, x, keys):
        n = _num_rows(x)
        if n != len(self):
            raise self._size_error(n, "the data has")
        _check_inputs(x, self.checksum_keys, self.checksums, "the data")
        return {**x, **{key: self.targets[key] for key in keys}}

    def _attach_pydataset(self, dataset, keys):
        if dataset.num_batches != len(self.batch_sizes):
            raise ValueError(
                f"The PyDataset has {dataset.num_batches} batches, but the "
                f"cache was built from {len(self.batch_sizes)} batches "
                f"({len(self)} samples): it was built from other data. {REBUILD}"
            )
        return _CachedPyDataset(dataset, self, keys)

    def _attach_dataset(self, dataset, keys, distiller):
        import tensorflow as tf

        x_spec, _ = _split(dataset.element_spec)
        _require_dict(x_spec, "The tf.data.Dataset")
        batched = _is_batched(distiller, x_spec)
        cardinality = int(dataset.cardinality())
        if not batched and cardinality >= 0 and cardinality != len(self):
            raise self._size_error(cardinality, "the tf.data.Dataset has")
        missing = [key for key in self.checksum_keys if key not in x_spec]
        if missing:
            raise ValueError(
                f"The tf.data.Dataset lacks {missing}, which the cache was "
                f"built with. Give the same inputs as at build time, or {REBUILD}"
            )
        n = len(self)
        targets = {key: tf.constant(self.targets[key]) for key in keys}
        checksums = tf.constant(self.checksums)
        too_many = (
            f"The tf.data.Dataset yields more than the {n} samples the teacher "
            f"cache holds: it was built from other data. {REBUILD}"
        )
        differ = (
            "A sample of the tf.data pipeline differs from the data the "
            "teacher cache was built from: a different data set, another order "
            "(attach before shuffling), or augmentation before attach that "
            "changes inputs. Augmentation that changes inputs each epoch needs "
            f"the live teacher; otherwise {REBUILD} Position of the sample:"
        )

        def add_targets(offset, element):
            x, rest = _split(element)
            batch = x if batched else {key: x[key][None] for key in x}
            size = tf.shape(batch[self.checksum_keys[0]], out_type=tf.int64)[0]
            in_range = tf.debugging.Assert(offset + size <= n, [too_many])
            with tf.control_dependencies([in_range]):
                rows = tf.range(offset, offset + size)
                expected = tf.gather(checksums, rows)
            found = _tf_sample_checksums(tf, batch, self.checksum_keys)
            same = tf.reduce_all(tf.equal(found, expected), axis=1)
            first = offset + tf.argmin(tf.cast(same, tf.int64))
            check = tf.debugging.Assert(tf.reduce_all(same), [differ, first])
            with tf.control_dependencies([check]):
                picked = {
                    key: tf.gather(value, rows if batched else offset)
                    for key, value in targets.items()
                }
            return offset + size, _join({**x, **picked}, rest)

        return dataset.scan(tf.constant(0, tf.int64), add_targets)

    # --- files -------------------------------------------------------------

    def save(self, path):
        """Writes the cache to one `.npz` file at `path`, atomically."""
        metadata = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "samples": len(self),
            "dtype": self.dtype,
            "fingerprint": self.fingerprint,
            "term_settings": self.term_settings,
            "checksum_keys": self.checksum_keys,
            "targets": list(self.targets),
        }
        arrays = {
            **self.targets,
            "checksums": self.checksums,
            "batch_sizes": np.asarray(self.batch_sizes, np.int64),
            "metadata": np.frombuffer(json.dumps(metadata).encode(), np.uint8),
        }

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_save(path, write)

    @classmethod
    def load(cls, path):
        """Reads a cache written by `save`.

        Raises:
            ValueError: for a file that is not a readable TeacherCache of this
                format version.
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
            metadata = json.loads(arrays.pop("metadata").tobytes().decode())
            if metadata.get("format") != FORMAT_NAME:
                raise ValueError("it holds no TeacherCache metadata")
        except (OSError, EOFError, KeyError, zipfile.BadZipFile, ValueError) as error:
            if isinstance(error, FileNotFoundError):
                raise
            raise ValueError(
                f"{path} is not a readable TeacherCache file ({error}): it is "
                f"corrupt, truncated or another kind of file. {REBUILD}"
            ) from None
        if metadata.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} is a TeacherCache file of format version "
                f"{metadata.get('version')}; this keras_gramkd reads version "
                f"{FORMAT_VERSION}. {REBUILD}"
            )
        n = metadata["samples"]
        expected = [*metadata["targets"], "checksums", "batch_sizes"]
        if sorted(arrays) != sorted(expected) or any(
            len(arrays[key]) != n for key in expected[:-1]
        ):
            raise ValueError(
                f"{path} holds arrays {sorted(arrays)} that disagree with its "
                f"metadata ({n} samples of {metadata['targets']}): the file is "
                f"corrupt. {REBUILD}"
            )
        return cls(
            {key: arrays[key] for key in metadata["targets"]},
            arrays["checksums"],
            metadata["checksum_keys"],
            arrays["batch_sizes"],
            metadata["fingerprint"],
            metadata["term_settings"],
            metadata["dtype"],
        )


class _CachedPyDataset(keras.utils.PyDataset):
    """A PyDataset whose batches carry their cached teacher targets.

    It holds the cache's arrays, not the cache, so that it pickles for
    `use_multiprocessing=True`.
    """

    def __init__(self, dataset, cache, keys):
        super().__init__(
            workers=dataset.workers,
            use_multiprocessing=dataset.use_multiprocessing,
            max_queue_size=dataset.max_queue_size,
        )
        self.dataset = dataset
        self.targets = {key: cache.targets[key] for key in keys}
        self.checksums = cache.checksums
        self.checksum_keys = cache.checksum_keys
        self.offsets = np.concatenate([[0], np.cumsum(cache.batch_sizes)])

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, index):
        x, rest = _split(self.dataset[index])
        _require_dict(x, "The PyDataset")
        start, stop = self.offsets[index], self.offsets[index + 1]
        size = _num_rows(x)
        if size != stop - start:
            raise ValueError(
                f"Batch {index} of the PyDataset has {size} samples; at build "
                f"time it had {stop - start}. {REBUILD}"
            )
        where = f"batch {index} of the PyDataset"
        _check_inputs(x, self.checksum_keys, self.checksums[start:stop], where)
        targets = {key: value[start:stop] for key, value in self.targets.items()}
        return _join({**x, **targets}, rest)

    def on_epoch_begin(self):
        self.dataset.on_epoch_begin()

    def on_epoch_end(self):
        self.dataset.on_epoch_end()
