"""`TeacherCache`: the teacher's targets for every sample, built, saved, attached.

See the package docstring (`keras_gramkd.cache`) for what it stores and when
it is safe; `checksums` and `sources` hold its two helpers' concerns.
"""

import hashlib
import json
import warnings
import weakref
import zipfile

import keras
import numpy as np

from keras_gramkd.cache.checksums import (
    REBUILD,
    check_inputs,
    sample_checksums,
    tf_sample_checksums,
)
from keras_gramkd.cache.sources import (
    checksum_keys,
    is_batched,
    is_tf_dataset,
    join_element,
    num_rows,
    require_dict,
    source_batches,
    split_element,
)
from keras_gramkd.saving import atomic_save
from keras_gramkd.terms import TARGET_PREFIX, as_spec, spec_config

FORMAT_NAME = "keras_gramkd.TeacherCache"
FORMAT_VERSION = 2
DTYPES = ("float32", "float16")
FLOAT16_LOSS_TOLERANCE = 1e-3
"""Largest difference of the KD or Gram loss between a float16 and a float32
cache that the tests accept (measured: up to 2e-4, see the module docstring)."""

_FLOAT16_MAX = float(np.finfo(np.float16).max)
_FLOAT16_TINY = float(np.finfo(np.float16).tiny)


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


def _read_settings(term_settings):
    """Term settings read from a file, their teacher features in the config
    form written now (a cache saved before pooling applied to single
    addresses holds the older form, `keras_gramkd.features.as_feature`)."""
    settings = json.loads(json.dumps(term_settings))
    for name, setting in settings.items():
        if setting.get("teacher_features") is not None:
            spec = as_spec(setting["teacher_features"], f"cached term {name!r}")
            setting["teacher_features"] = spec_config(spec)
    return settings


def matching_target_keys(distiller, term_settings, fingerprint, keys):
    """The cached target `keys` that `distiller` reads, once its terms' settings
    and its teacher's fingerprint are checked against the cache's (ValueError
    naming the difference)."""
    settings = _term_settings(distiller)
    missing = [name for name in settings if name not in term_settings]
    if missing:
        raise ValueError(
            f"The cache holds no targets for term(s) {missing} (it was built "
            f"for a Distiller with the terms {list(term_settings)} on), "
            f"but this Distiller uses them. {REBUILD}"
        )
    for name, setting in settings.items():
        if setting != term_settings[name]:
            raise ValueError(
                f"The cache's targets of term {name!r} were formed with "
                f"{term_settings[name]}, but this Distiller uses "
                f"{setting}. {REBUILD}"
            )
    found = teacher_fingerprint(distiller.teacher)
    if found != fingerprint:
        raise ValueError(
            "The teacher's weights differ from those the cache was built "
            f"with (fingerprint {found[:12]}… vs {fingerprint[:12]}"
            "…): the teacher changed after caching, or this is another "
            f"teacher. {REBUILD}"
        )
    prefixes = tuple(f"{TARGET_PREFIX}{name}/" for name in settings)
    return [key for key in keys if key.startswith(prefixes)]


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
        return {
            key: value.astype(np.float32, copy=False) for key, value in targets.items()
        }
    for key, value in targets.items():
        finite = np.abs(value[np.isfinite(value)].astype(np.float64))
        largest = float(finite.max()) if finite.size else 0.0
        if largest > _FLOAT16_MAX:
            raise ValueError(
                f"{key} holds values up to {largest:.4g}, beyond float16's "
                f"range (±{_FLOAT16_MAX:.0f}). Build the cache with "
                "dtype='float32'."
            )
        _warn_subnormal(key, finite)
    return {key: value.astype(np.float16) for key, value in targets.items()}


def _warn_subnormal(key, magnitudes):
    """Warns when nonzero |values| lie below float16's smallest normal number,
    where float16 keeps fewer bits (and flushes below about 6e-8 to 0)."""
    small = magnitudes[(magnitudes > 0) & (magnitudes < _FLOAT16_TINY)]
    if not small.size:
        return
    stored = small.astype(np.float16).astype(np.float64)
    worst = float(np.max(np.abs(stored - small) / small))
    warnings.warn(
        f"{key} holds {small.size} nonzero value(s) below float16's smallest "
        f"normal number ({_FLOAT16_TINY:.3g}); stored in float16 they lose "
        f"precision (worst relative error {worst:.3g}; below about 6e-8 they "
        "become 0). Build the cache with dtype='float32' to keep them.",
        UserWarning,
        stacklevel=4,
    )


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
        for batch in source_batches(distiller, x, batch_size):
            keys = keys or checksum_keys(distiller, batch)
            batch = {key: np.asarray(batch[key]) for key in keys}
            sizes.append(num_rows(batch))
            checksums.append(sample_checksums(batch, keys))
            outputs.append(_predict(model, batch, sizes[0]))
        if not sizes:
            raise ValueError("The data holds no sample: there is nothing to cache.")
        # Each key's batches are dropped as it is joined: peak memory is the
        # targets plus one key's, not twice the targets.
        targets = {
            key: np.concatenate([output.pop(key) for output in outputs])
            for key in list(outputs[0])
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
        if is_tf_dataset(x):
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
        return matching_target_keys(
            distiller, self.term_settings, self.fingerprint, self.targets
        )

    def _size_error(self, found, what):
        return ValueError(
            f"The cache holds {len(self)} samples but {what} {found}: it was "
            f"built from other data. {REBUILD}"
        )

    def _attach_arrays(self, x, keys):
        n = num_rows(x)
        if n != len(self):
            raise self._size_error(n, "the data has")
        check_inputs(x, self.checksum_keys, self.checksums, "the data")
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

        x_spec, _ = split_element(dataset.element_spec)
        require_dict(x_spec, "The tf.data.Dataset")
        batched = is_batched(distiller, x_spec)
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
            x, rest = split_element(element)
            batch = x if batched else {key: x[key][None] for key in x}
            size = tf.shape(batch[self.checksum_keys[0]], out_type=tf.int64)[0]
            in_range = tf.debugging.Assert(offset + size <= n, [too_many])
            with tf.control_dependencies([in_range]):
                rows = tf.range(offset, offset + size)
                expected = tf.gather(checksums, rows)
            found = tf_sample_checksums(tf, batch, self.checksum_keys)
            same = tf.reduce_all(tf.equal(found, expected), axis=1)
            first = offset + tf.argmin(tf.cast(same, tf.int64))
            check = tf.debugging.Assert(tf.reduce_all(same), [differ, first])
            with tf.control_dependencies([check]):
                picked = {
                    key: tf.gather(value, rows if batched else offset)
                    for key, value in targets.items()
                }
            return offset + size, join_element({**x, **picked}, rest)

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
            _read_settings(metadata["term_settings"]),
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
        x, rest = split_element(self.dataset[index])
        require_dict(x, "The PyDataset")
        start, stop = self.offsets[index], self.offsets[index + 1]
        size = num_rows(x)
        if size != stop - start:
            raise ValueError(
                f"Batch {index} of the PyDataset has {size} samples; at build "
                f"time it had {stop - start}. {REBUILD}"
            )
        where = f"batch {index} of the PyDataset"
        check_inputs(x, self.checksum_keys, self.checksums[start:stop], where)
        targets = {key: value[start:stop] for key, value in self.targets.items()}
        return join_element({**x, **targets}, rest)

    def on_epoch_begin(self):
        self.dataset.on_epoch_begin()

    def on_epoch_end(self):
        self.dataset.on_epoch_end()
