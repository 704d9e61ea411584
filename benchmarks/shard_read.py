"""The sharded teacher cache: its storage read against the alternatives, and `fit`.

    python benchmarks/shard_read.py [--backend tensorflow|jax|torch] [--quick]
        [--json PATH] [--rounds N] [--threads N]

Reads: the rows per second of batches of shuffled rows of one target array
(the teacher's logits), shard by shard, from

- ``npy_mmap``: the cache's format, a `.npy` file per target per shard read
  through a memory map (only the batch's rows; sha256 checked once per shard);
- ``npz_shard``: a `.npz` per shard, loaded whole once per shard (one shard in
  memory), its batches indexed from it;
- ``tfrecord``: a TFRecord file per shard (a record per row), parsed and batched
  by `tf.data` (TensorFlow backend only; it shuffles in a buffer of a batch);
- ``in_memory``: one array in memory (the in-memory `TeacherCache`), the bound.

Fit: the median epoch time (after a warm-up epoch) of a Distiller trained from
the in-memory cache and from the sharded one (`ShardedTeacherCache.dataset`),
the same batches per epoch, and their ratio.
"""

import os
import statistics
import tempfile
import time

from step_time import common_parser, configure

SIZES = {"quick": (2048, 100, 512, 64), "full": (65536, 1000, 8192, 256)}


def _rows_per_second(batches, read):
    start = time.perf_counter()
    rows = sum(len(read(shard, rows)) for shard, rows in batches)
    return rows / (time.perf_counter() - start)


def _tfrecord_rows_per_second(folder, logits, shard_size, batch):
    import tensorflow as tf

    paths = []
    for i, start in enumerate(range(0, len(logits), shard_size)):
        path = os.path.join(folder, f"shard-{i}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for row in logits[start : start + shard_size]:
                feature = tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[row.tobytes()])
                )
                example = tf.train.Example(
                    features=tf.train.Features(feature={"logits": feature})
                )
                writer.write(example.SerializeToString())
        paths.append(path)
    spec = {"logits": tf.io.FixedLenFeature([], tf.string)}

    def parse(records):
        parsed = tf.io.parse_example(records, spec)
        return tf.io.decode_raw(parsed["logits"], tf.float32)

    dataset = (
        tf.data.TFRecordDataset(paths)
        .shuffle(batch)
        .batch(batch)
        .map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    )
    start = time.perf_counter()
    rows = sum(int(b.shape[0]) for b in dataset)
    return rows / (time.perf_counter() - start)


def main(argv=None):
    args = common_parser(__doc__, "a small cache").parse_args(argv)
    configure(args)
    import harness
    import keras
    import numpy as np

    from keras_gramkd import Distiller, KDTerm
    from keras_gramkd.cache import ShardedTeacherCache, TeacherCache

    n, classes, shard_size, batch = SIZES["quick" if args.quick else "full"]
    rng = np.random.default_rng(0)
    x = {"a": rng.normal(size=(n, 32)).astype("float32")}
    y = rng.integers(0, classes, n).astype("int32")

    def net(width):
        a = keras.Input((32,), name="a")
        hidden = keras.layers.Dense(width, activation="relu")(a)
        return keras.Model({"a": a}, keras.layers.Dense(classes)(hidden))

    distiller = Distiller(net(256), net(32), terms=[KDTerm()])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    distiller.compile("adam", loss, jit_compile=args.jit)
    folder = tempfile.mkdtemp(prefix="shard_read-")
    cache = ShardedTeacherCache.write(distiller, x, folder, shard_size, batch_size=512)
    key = "teacher/kd/logits"
    stream = cache.dataset(x, y, batch_size=batch, seed=1, distiller=distiller)
    batches = stream.batches
    logits = np.concatenate(
        [cache.read(i, key, np.arange(r)) for i, r in enumerate(stream.shard_rows)]
    )
    npz = []
    for i, start in enumerate(range(0, n, shard_size)):
        npz.append(os.path.join(folder, f"shard-{i}.npz"))
        np.savez(npz[-1], logits=logits[start : start + shard_size])
    loaded = {}

    def npz_read(shard, rows):
        if shard not in loaded:
            loaded.clear()  # one shard in memory
            with np.load(npz[shard]) as data:
                loaded[shard] = data["logits"]
        return loaded[shard][rows]

    reads = {}
    for _ in range(args.rounds):
        for name, read in (
            ("npy_mmap", lambda s, r: cache.read(s, key, r)),
            ("npz_shard", npz_read),
            ("in_memory", lambda s, r: logits[s * shard_size + r]),
        ):
            reads.setdefault(name, []).append(_rows_per_second(batches, read))
        if args.backend == "tensorflow":
            reads.setdefault("tfrecord", []).append(
                _tfrecord_rows_per_second(folder, logits, shard_size, batch)
            )
    read_rows = {name: statistics.median(v) for name, v in reads.items()}

    # fit: the same batches per epoch from memory and from the shards.
    attached = TeacherCache.build(distiller, x, batch_size=512).attach(x)
    memory_times, shard_times = [], []
    distiller.fit(attached, y, batch_size=batch, epochs=1, verbose=0)  # warm up
    distiller.fit(stream, epochs=1, verbose=0)
    for _ in range(args.rounds):
        start = time.perf_counter()
        distiller.fit(attached, y, batch_size=batch, epochs=1, verbose=0)
        memory_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        distiller.fit(stream, epochs=1, verbose=0)
        shard_times.append(time.perf_counter() - start)
    fit = {
        "in_memory_epoch_s": statistics.median(memory_times),
        "sharded_epoch_s": statistics.median(shard_times),
    }
    fit["ratio"] = fit["sharded_epoch_s"] / fit["in_memory_epoch_s"]
    data = {
        "machine": harness.machine_info(),
        "settings": {
            "quick": args.quick,
            "rounds": args.rounds,
            "samples": n,
            "classes": classes,
            "shard_size": shard_size,
            "batch_size": batch,
            "cache_mib": logits.nbytes / 2**20,
        },
        "read_rows_per_s": read_rows,
        "fit": fit,
    }
    harness.print_table(
        f"Reading shuffled batches of {batch} rows ({n} x {classes} float32)",
        ["storage", "rows/s", "vs in memory"],
        [
            [name, f"{rate:,.0f}", f"{rate / read_rows['in_memory']:.3f}"]
            for name, rate in read_rows.items()
        ],
    )
    harness.print_table(
        "One epoch of fit",
        ["in memory (s)", "sharded (s)", "ratio"],
        [
            [
                f"{fit['in_memory_epoch_s']:.3f}",
                f"{fit['sharded_epoch_s']:.3f}",
                f"{fit['ratio']:.3f}",
            ]
        ],
    )
    harness.write_json(args.json or harness.default_json("shard_read"), data)


if __name__ == "__main__":
    main()
