"""`ShardedTeacherCache`: the teacher's targets on disk in shards, streamed to `fit`.

For data sets whose targets do not fit in memory. `ShardedTeacherCache.write`
runs the teacher once over a dict of arrays (numpy memory maps for data larger
than memory) and writes the targets in shards of `shard_size` samples, each a
folder of `.npy` files (one per target, plus the inputs' checksums) and an
``index.json`` with each file's size and sha256; ``manifest.json`` holds what
every shard shares: the teacher's fingerprint, the terms' settings, the dtype,
the sample count and the shard size. A shard's folder is renamed into place
only once complete, so a killed writer leaves whole shards, and writing again
resumes at the first missing one; processes given disjoint ``shards=`` ranges
write in parallel.

`ShardedTeacherCache.open` reads the manifest; `dataset` gives a
`keras.utils.PyDataset` that streams each batch's inputs, labels and targets
together on every backend. Each batch reads its rows through memory maps; only
the last two shards' maps stay open, so memory stays bounded by two shards,
whatever the cache's size. Nothing trains on a wrong target: a shard whose
files differ from their sha256 (checked at a shard's first read in the
process), a missing or truncated shard, and inputs that differ from those the
targets were made from (each shard's checked before its first batch) are each
refused with a message naming the shard.

Why `.npy` files: a memory map reads only the rows a batch needs, with numpy
alone (no TensorFlow in the data path on JAX and PyTorch), at the speed of
the page cache; `benchmarks/shard_read.py` measures it against reading each
shard whole from a `.npz`.

Example:

>>> import keras, numpy as np, tempfile
>>> from keras_gramkd import Distiller, KDTerm
>>> def net(width):
...     a = keras.Input((4,), name="a")
...     hidden = keras.layers.Dense(width)(a)
...     return keras.Model({"a": a}, keras.layers.Dense(3)(hidden))
>>> distiller = Distiller(net(16), net(4), terms=[KDTerm()])
>>> loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
>>> distiller.compile("adam", loss)
>>> x, y = {"a": np.ones((100, 4), "float32")}, np.zeros(100, "int32")
>>> folder = tempfile.mkdtemp()
>>> cache = ShardedTeacherCache.write(distiller, x, folder, shard_size=32)
>>> len(cache), cache.num_shards
(100, 4)
>>> data = cache.dataset(x, y, batch_size=16, distiller=distiller)
>>> history = distiller.fit(data, epochs=1, shuffle=False, verbose=0)
"""

import hashlib
import json
import math
import os
import shutil
import threading

import keras
import numpy as np

from keras_gramkd.cache.checksums import check_inputs, sample_checksums
from keras_gramkd.cache.sources import checksum_keys, num_rows
from keras_gramkd.cache.teacher_cache import (
    DTYPES,
    _predict,
    _read_settings,
    _TeacherTargets,
    _term_settings,
    _to_storage,
    matching_target_keys,
    teacher_fingerprint,
)

MANIFEST = "manifest.json"
INDEX = "index.json"
FORMAT_NAME = "keras_gramkd.ShardedTeacherCache"
FORMAT_VERSION = 1
CHECKSUMS = "checksums"
REWRITE = "Write the cache again into a new folder (ShardedTeacherCache.write)."
_HASH_CHUNK = 1 << 22
OPEN_SHARDS = 2  # shards whose memory maps stay open (2: a reader thread ahead)


def _shard_folder(directory, index):
    return os.path.join(directory, f"shard-{index:05d}")


def _file_name(key):
    """A target key as a file name: "teacher/kd/logits" -> "teacher--kd--logits.npy"."""
    return key.replace("/", "--") + ".npy"


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
    return value


class ShardedTeacherCache:
    """A teacher cache on disk in shards: written once, read lazily.

    Make one with `ShardedTeacherCache.write` or `ShardedTeacherCache.open`.

    Attributes:
        directory: the cache's folder.
        manifest: what every shard shares (see the module).
    """

    def __init__(self, directory, manifest):
        self.directory = directory
        self.manifest = manifest
        self.term_settings = _read_settings(manifest["term_settings"])
        self._verified = set()  # shard indexes whose sha256 matched
        self._maps = {}  # shard index -> {key: memory map}, the last OPEN_SHARDS
        self._maps_lock = threading.Lock()

    # --- writing -------------------------------------------------------------

    @classmethod
    def write(
        cls,
        distiller,
        x,
        directory,
        shard_size=16384,
        batch_size=256,
        dtype="float32",
        shards=None,
    ):
        """Runs the teacher over `x` and writes its targets in shards.

        Args:
            distiller: the `Distiller` that will train from the cache.
            x: dict input name -> array (n, ...), numpy arrays or memory maps
                (``np.load(path, mmap_mode="r")``); with ``"modality_mask"``
                if the data has one.
            directory: the cache's folder. A folder holding part of this
                cache (same teacher, terms, data size and shard size) is
                resumed: complete shards are kept.
            shard_size: samples per shard.
            batch_size: rows per teacher call.
            dtype: ``"float32"``, or ``"float16"`` for half the bytes.
            shards: the shard indexes this process writes (default: all), for
                parallel writers with disjoint ranges.

        Returns:
            The cache, once every shard is written (`open`); None while
            shards written by other processes are still missing.
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}.")
        shard_size = _check_count("shard_size", shard_size)
        batch_size = _check_count("batch_size", batch_size)
        if not isinstance(x, dict) or not x:
            raise TypeError(
                "ShardedTeacherCache.write takes a dict input name -> array "
                "(numpy arrays or np.load(..., mmap_mode='r') memory maps); got "
                f"{type(x).__name__}."
            )
        n = num_rows(x)
        keys = checksum_keys(distiller, x)
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "samples": n,
            "shard_size": shard_size,
            "num_shards": math.ceil(n / shard_size),
            "dtype": dtype,
            "fingerprint": teacher_fingerprint(distiller.teacher),
            "term_settings": _term_settings(distiller),
            "checksum_keys": keys,
        }
        cls._write_manifest(directory, manifest)
        todo = range(manifest["num_shards"]) if shards is None else shards
        bad = [i for i in todo if not 0 <= i < manifest["num_shards"]]
        if bad:
            raise ValueError(
                f"shards {bad} are out of range: the cache has "
                f"{manifest['num_shards']} shards (0 to "
                f"{manifest['num_shards'] - 1})."
            )
        model = _TeacherTargets(distiller)
        for index in todo:
            if not os.path.exists(os.path.join(_shard_folder(directory, index), INDEX)):
                start = index * shard_size
                rows = {k: v[start : start + shard_size] for k, v in x.items()}
                cls._write_shard(directory, index, model, rows, keys, batch_size, dtype)
        missing = cls._missing(directory, manifest)
        return None if missing else cls.open(directory)

    @staticmethod
    def _write_manifest(directory, manifest):
        path = os.path.join(directory, MANIFEST)
        if os.path.exists(path):
            with open(path) as f:
                found = json.load(f)
            if found != json.loads(json.dumps(manifest)):
                differ = sorted(k for k in manifest if found.get(k) != manifest[k])
                raise ValueError(
                    f"{directory} holds a sharded cache that differs from this "
                    f"one in {differ}: another teacher, terms, data or shard "
                    f"size. Use a new folder, or delete this one."
                )
            return
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2)
        os.replace(tmp, path)

    @staticmethod
    def _write_shard(directory, index, model, x, keys, batch_size, dtype):
        """Writes one shard into a temporary folder, then renames it in place."""
        n = num_rows(x)
        outputs, sums = [], []
        for start in range(0, n, batch_size):
            batch = {k: np.asarray(x[k][start : start + batch_size]) for k in keys}
            sums.append(sample_checksums(batch, keys))
            outputs.append(_predict(model, batch, min(batch_size, n)))
        arrays = _to_storage(
            {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}, dtype
        )
        arrays[CHECKSUMS] = np.concatenate(sums)
        final = _shard_folder(directory, index)
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        files = {}
        for key, array in arrays.items():
            path = os.path.join(tmp, _file_name(key))
            np.save(path, array)
            files[key] = {
                "file": _file_name(key),
                "bytes": os.path.getsize(path),
                "sha256": _sha256(path),
            }
        with open(os.path.join(tmp, INDEX), "w") as f:
            json.dump({"rows": n, "files": files}, f, indent=2)
        os.replace(tmp, final)

    @staticmethod
    def _missing(directory, manifest):
        return [
            i
            for i in range(manifest["num_shards"])
            if not os.path.exists(os.path.join(_shard_folder(directory, i), INDEX))
        ]

    # --- reading -------------------------------------------------------------

    @classmethod
    def open(cls, directory):
        """The complete cache in `directory` (ValueError naming missing shards)."""
        path = os.path.join(directory, MANIFEST)
        try:
            with open(path) as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{directory} holds no {MANIFEST}: not a sharded teacher cache."
            ) from None
        except ValueError as error:
            raise ValueError(
                f"{path} is not readable JSON ({error}). {REWRITE}"
            ) from None
        if manifest.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not a sharded teacher cache's manifest.")
        if manifest.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} is of format version {manifest.get('version')}; this "
                f"keras_gramkd reads version {FORMAT_VERSION}. {REWRITE}"
            )
        missing = cls._missing(directory, manifest)
        if missing:
            raise ValueError(
                f"The sharded cache in {directory} lacks shard(s) {missing} of "
                f"{manifest['num_shards']}: a writer stopped before them. Run "
                "ShardedTeacherCache.write again with the same arguments: it "
                "resumes at the missing shards."
            )
        return cls(directory, manifest)

    def __getstate__(self):  # for PyDataset workers in other processes
        return {"directory": self.directory, "manifest": self.manifest}

    def __setstate__(self, state):
        self.__init__(state["directory"], state["manifest"])

    def __len__(self):
        return self.manifest["samples"]

    @property
    def num_shards(self):
        return self.manifest["num_shards"]

    def __repr__(self):
        return (
            f"ShardedTeacherCache({len(self)} samples in {self.num_shards} shards "
            f"of {self.manifest['shard_size']}, {self.manifest['dtype']}, "
            f"{self.directory})"
        )

    def shard_index(self, index):
        """The ``index.json`` of shard `index`: its rows and files."""
        with open(os.path.join(_shard_folder(self.directory, index), INDEX)) as f:
            return json.load(f)

    def verify_shard(self, index):
        """Checks each file of shard `index` against its size and sha256."""
        folder = _shard_folder(self.directory, index)
        entry = self.shard_index(index)
        expected = min(
            self.manifest["shard_size"],
            len(self) - index * self.manifest["shard_size"],
        )
        if entry["rows"] != expected:
            raise ValueError(
                f"Shard {index} ({folder}) holds {entry['rows']} rows; the "
                f"manifest gives it {expected}. {REWRITE}"
            )
        for key, file in entry["files"].items():
            path = os.path.join(folder, file["file"])
            size = os.path.getsize(path) if os.path.exists(path) else None
            if size != file["bytes"] or _sha256(path) != file["sha256"]:
                what = "is missing" if size is None else "differs from its sha256"
                if size is not None and size != file["bytes"]:
                    what = f"has {size} bytes, not {file['bytes']} (truncated?)"
                raise ValueError(
                    f"Shard {index}: {file['file']} ({key}) {what}: the shard is "
                    f"corrupt. Delete {folder} and run ShardedTeacherCache.write "
                    "again (it rewrites the missing shard)."
                )
        self._verified.add(index)

    def read(self, index, key, rows):
        """Rows `rows` (sorted indexes within shard `index`) of one stored array.

        The shard's files are checked (`verify_shard`) at its first read in
        this process; the rows are read through a memory map. The maps of the
        last `OPEN_SHARDS` shards read stay open (opening a map costs more
        than reading a batch through it); an older shard's close, so memory
        holds at most those shards' pages, whatever the cache's size.
        """
        if index not in self._verified:
            self.verify_shard(index)
        with self._maps_lock:  # PyDataset workers read from threads
            maps = self._maps.get(index)
            if maps is None:
                while len(self._maps) >= OPEN_SHARDS:
                    self._maps.pop(next(iter(self._maps)))  # the oldest closes
                maps = self._maps[index] = {}
            if key not in maps:
                folder = _shard_folder(self.directory, index)
                path = os.path.join(folder, _file_name(key))
                maps[key] = np.load(path, mmap_mode="r")
            array = maps[key]
        return array[rows]  # indexing with an array copies the rows

    def dataset(
        self,
        x,
        y=None,
        sample_weight=None,
        batch_size=32,
        shuffle=True,
        seed=0,
        distiller=None,
        shards=None,
        **kwargs,
    ):
        """A `keras.utils.PyDataset` of ``(x + targets, y[, sample_weight])``.

        Args:
            x: the dict of arrays (or memory maps) the cache was written from,
                same rows in the same order.
            y, sample_weight: optional arrays, one row per sample.
            batch_size: rows per batch; a batch never spans two shards.
            shuffle: reorders the shards and the rows within each shard
                every epoch (drawn from `seed`); False keeps the order.
            distiller: the `Distiller` that will train: its teacher and term
                settings must match the cache's.
            shards: the shard indexes to read (default: all), e.g. each
                process of a data-parallel run its own.
            **kwargs: `keras.utils.PyDataset`'s ``workers``,
                ``use_multiprocessing`` and ``max_queue_size``: with
                ``workers=2``, a thread reads the next batches while the
                current one trains.
        """
        if distiller is None:
            raise ValueError(
                "dataset needs the Distiller that will train from the cache, to "
                "check its teacher against the cache: cache.dataset(x, y, "
                "distiller=distiller)."
            )
        targets = [key for key in self.shard_index(0)["files"] if key != CHECKSUMS]
        keys = matching_target_keys(
            distiller, self.term_settings, self.manifest["fingerprint"], targets
        )
        if sample_weight is not None and y is None:
            raise ValueError("sample_weight needs y: give the labels too.")
        n = num_rows(x)
        for name, array in (("y", y), ("sample_weight", sample_weight)):
            if array is not None and len(array) != n:
                raise ValueError(f"{name} has {len(array)} rows; x has {n}.")
        if n != len(self):
            raise ValueError(
                f"The cache holds {len(self)} samples but the data has {n}: it "
                f"was written from other data. {REWRITE}"
            )
        shards = list(range(self.num_shards) if shards is None else shards)
        bad = [i for i in shards if not 0 <= i < self.num_shards]
        if bad or not shards:
            raise ValueError(
                f"shards must name some of the cache's {self.num_shards} shards "
                f"(0 to {self.num_shards - 1}); got {shards}."
            )
        return ShardedBatches(
            self, x, y, sample_weight, keys, batch_size, shuffle, seed, shards, **kwargs
        )

    def tf_dataset(self, x, y=None, sample_weight=None, **kwargs):
        """The batches of `dataset` as a `tf.data.Dataset` (needs TensorFlow).

        The same batches, in the same order, with the same checks; each pass
        over the dataset (each epoch of `fit`) draws the next order, as
        `dataset` does at each epoch's end. On the TensorFlow backend it is
        the faster path: Keras feeds a `PyDataset` to TensorFlow through
        `tf.data.Dataset.from_generator`, which costs more per batch than
        reading it (`docs/guide/teacher-cache.md` has the numbers); here
        `tf.data` reads each batch through one `tf.numpy_function` and
        prefetches the next while a step trains. It feeds `fit` on JAX and
        PyTorch too.

        Args:
            x, y, sample_weight: as `dataset`.
            **kwargs: `dataset`'s ``batch_size``, ``shuffle``, ``seed``,
                ``distiller`` and ``shards``.
        """
        try:
            import tensorflow as tf
        except ImportError:
            raise ImportError(
                "tf_dataset needs TensorFlow: pip install 'keras-gramkd[tensorflow]', "
                "or use cache.dataset(...), a keras.utils.PyDataset, on every "
                "backend."
            ) from None
        bad = sorted(
            set(kwargs) - {"batch_size", "shuffle", "seed", "distiller", "shards"}
        )
        if bad:
            raise TypeError(
                f"tf_dataset takes no {bad}: PyDataset's workers and queue do not "
                "apply to tf.data, which prefetches by itself."
            )
        return _as_tf_dataset(self.dataset(x, y, sample_weight, **kwargs), tf)


class ShardedBatches(keras.utils.PyDataset):
    """Batches of inputs, labels and cached targets read shard by shard.

    Made by `ShardedTeacherCache.dataset`. A shard's inputs are checked against
    the checksums written with its targets before its first batch.
    """

    def __init__(
        self,
        cache,
        x,
        y,
        sample_weight,
        keys,
        batch_size,
        shuffle,
        seed,
        shards,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.cache, self.x, self.y, self.sample_weight = cache, x, y, sample_weight
        self.keys = keys
        self.batch_size = _check_count("batch_size", batch_size)
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)
        size, n = cache.manifest["shard_size"], len(cache)
        self.shard_rows = [min(size, n - i * size) for i in range(cache.num_shards)]
        self.shards = shards
        self._checked = set()  # shards whose inputs matched their checksums
        self._plan()

    def _plan(self):
        """This epoch's batches: (shard, sorted rows within it)."""
        order = self.rng.permutation(self.shards) if self.shuffle else self.shards
        self.batches = []
        for shard in order:
            rows = np.arange(self.shard_rows[shard])
            if self.shuffle:
                rows = self.rng.permutation(rows)
            for start in range(0, len(rows), self.batch_size):
                chunk = np.sort(rows[start : start + self.batch_size])
                self.batches.append((int(shard), chunk))

    def __len__(self):
        return len(self.batches)

    def _check_inputs(self, shard):
        """Checks the inputs of every row of `shard` against the checksums
        written with its targets, a batch of rows at a time: once per shard
        and dataset, as the in-memory cache checks its data once, at `attach`.
        """
        start, rows = shard * self.cache.manifest["shard_size"], self.shard_rows[shard]
        keys = self.cache.manifest["checksum_keys"]
        stored = self.cache.read(shard, CHECKSUMS, np.arange(rows))
        for first in range(0, rows, self.batch_size):
            last = min(first + self.batch_size, rows)
            x = {
                key: np.asarray(self.x[key][start + first : start + last])
                for key in keys
                if key in self.x
            }
            where = f"shard {shard} of the data (its rows {first} to {last - 1})"
            check_inputs(x, keys, stored[first:last], where, REWRITE)
        self._checked.add(shard)

    def __getitem__(self, index):
        shard, rows = self.batches[index]
        if shard not in self._checked:
            self._check_inputs(shard)
        where = shard * self.cache.manifest["shard_size"] + rows
        x = {key: np.asarray(value[where]) for key, value in self.x.items()}
        x.update({key: self.cache.read(shard, key, rows) for key in self.keys})
        batch = (x,)
        if self.y is not None:
            batch += (np.asarray(self.y[where]),)
        if self.sample_weight is not None:
            batch += (np.asarray(self.sample_weight[where]),)
        return batch if len(batch) > 1 else x

    def on_epoch_end(self):
        if self.shuffle:
            self._plan()


def _as_tf_dataset(batches, tf):
    """`batches` (a `ShardedBatches`) as a `tf.data.Dataset`; each iteration
    after the first calls its ``on_epoch_end`` (a new order) first."""
    first = batches[0]
    flat = tf.nest.flatten(first)
    dtypes = [tf.as_dtype(a.dtype) for a in flat]
    passes = [0]  # iterations started

    def start():
        if passes[0]:
            batches.on_epoch_end()
        passes[0] += 1
        return np.int64(len(batches))

    def read(index):
        return tf.nest.flatten(batches[int(index)])

    def batch(index):
        # stateful: which rows an index reads depends on the pass's order.
        tensors = tf.numpy_function(read, [index], dtypes, stateful=True)
        for tensor, array in zip(tensors, flat, strict=True):
            tensor.set_shape((None,) + array.shape[1:])
        return tf.nest.pack_sequence_as(first, tensors)

    def one_pass(_):
        count = tf.numpy_function(start, [], tf.int64, stateful=True)
        count.set_shape(())
        return tf.data.Dataset.range(count).map(batch)

    data = tf.data.Dataset.range(1).flat_map(one_pass)
    # flat_map hides the length: state it, so that fit knows its steps.
    data = data.apply(tf.data.experimental.assert_cardinality(len(batches)))
    return data.prefetch(tf.data.AUTOTUNE)
