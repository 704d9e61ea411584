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

For targets larger than memory, `ShardedTeacherCache` (module `shards`) writes
them to disk in shards, resumably and in parallel, and streams them to `fit`
with their inputs as a `keras.utils.PyDataset`, checking each shard's sha256
and each batch's inputs.

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
(±65504) is refused at build time; nonzero targets below its smallest normal
number (6.1e-5), where float16 keeps fewer bits and flushes values below
about 6e-8 to 0, give a `UserWarning` with the key, their count and the worst
relative error.

File format (`save` / `load`): one uncompressed `.npz` file (numpy's zip of
`.npy` arrays, read without pickle) holding the target arrays, `checksums`
(n, inputs) int64, `batch_sizes` (the batches the build read) and `metadata`,
UTF-8 JSON as uint8: format name and version, the number of samples, dtype,
teacher fingerprint, term settings and the names of the checksummed inputs.
It is written to a temporary file in the same directory and renamed over the
target (`keras_gramkd.saving.atomic_save`).
"""

from keras_gramkd.cache.shards import ShardedBatches, ShardedTeacherCache
from keras_gramkd.cache.teacher_cache import (
    DTYPES,
    FLOAT16_LOSS_TOLERANCE,
    FORMAT_NAME,
    FORMAT_VERSION,
    TeacherCache,
    teacher_fingerprint,
)

__all__ = [
    "DTYPES",
    "FLOAT16_LOSS_TOLERANCE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ShardedBatches",
    "ShardedTeacherCache",
    "TeacherCache",
    "teacher_fingerprint",
]
