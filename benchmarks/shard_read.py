"""The sharded teacher cache: storages and pipelines, `fit`, and peak memory.

    python benchmarks/shard_read.py [--backend tensorflow|jax|torch] [--quick]
        [--json PATH] [--rounds N] [--threads N] [--parts reads,fit,memory]

Reads: the rows per second of shuffled batches of one target array (the
teacher's logits, 1000 classes), shard by shard, for each storage through each
data pipeline of the backend. Storages:

- ``npy_mmap``: the cache's format, a `.npy` file per target per shard read
  through a memory map (only the batch's rows; sha256 checked once per shard);
- ``npz_shard``: a `.npz` per shard, loaded whole once per shard (one shard in
  memory), its batches indexed from it;
- ``array_record``: an ArrayRecord file per shard (a record per row), the
  batch's records read by random access (``ArrayRecordDataSource``);
- ``tfrecord``: a TFRecord file per shard (a record per row), parsed and
  batched by `tf.data` (TensorFlow only; it shuffles in a buffer of a batch);
- ``in_memory``: one array in memory (the in-memory `TeacherCache`), the bound.

Pipelines: ``pydataset`` (a `keras.utils.PyDataset` indexed batch by batch, as
`fit` reads it on every backend), ``tf_data`` (`tf.data.Dataset.from_generator`
over it, TensorFlow) and ``torch_dataloader`` (a `torch.utils.data.DataLoader`
over it, PyTorch).

Fit: per case, the median epoch time of a Distiller trained from the in-memory
cache and from the sharded one (`ShardedTeacherCache.dataset`, read in the
training thread, and with ``workers=2``: a thread reads ahead; on TensorFlow
also `ShardedTeacherCache.tf_dataset`), the same batch size, interleaved epochs
after a warm-up, and the ratios. Cases: ``synthetic``
(one 32-d input, 1000 classes, KD), ``demo`` and ``teacher-sized`` (the
benchmarks' demo cases, KD + Gram).

Memory: the growth of the peak resident memory over one epoch of `fit` (cache
build or open included) from each cache, as the data grows: the synthetic case
at 1, 4 and 16 times its size, each point in a fresh process (two at a time).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from step_time import common_parser, configure

# samples, classes, shard size, batch size (reads); steps of the demo cases
SIZES = {"quick": (2048, 100, 512, 64), "full": (65536, 1000, 8192, 256)}
DEMO_STEPS = {"quick": 4, "full": 64}
MEMORY_SCALES = {"quick": (1, 4), "full": (1, 4, 16)}
MEMORY_BASE = {"quick": 1024, "full": 8192}  # samples at scale 1
PARTS = ("reads", "fit", "memory")


def parse_args(argv=None):
    parser = common_parser(__doc__, "a small cache, short runs")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated of {PARTS}"
    )
    parser.add_argument("--memory-point", help=argparse.SUPPRESS)  # a child
    args = parser.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {PARTS}")
    return args


# ----------------------------------------------------------------------------
# Storages and pipelines


def _write_storages(folder, logits, shard_size):
    """Each storage's read(shard, rows) -> array, over the same logits."""
    import numpy as np
    from array_record.python import array_record_data_source as records
    from array_record.python import array_record_module as record_files

    starts = range(0, len(logits), shard_size)
    npz, sources = [], []
    for i, start in enumerate(starts):
        part = logits[start : start + shard_size]
        npz.append(os.path.join(folder, f"shard-{i}.npz"))
        np.savez(npz[-1], logits=part)
        path = os.path.join(folder, f"shard-{i}.array_record")
        writer = record_files.ArrayRecordWriter(path, "group_size:1")
        for row in part:
            writer.write(row.tobytes())
        writer.close()
        sources.append(records.ArrayRecordDataSource([path]))
    loaded = {}
    width = logits.shape[1]

    def npz_read(shard, rows):
        if shard not in loaded:
            loaded.clear()  # one shard in memory
            with np.load(npz[shard]) as data:
                loaded[shard] = data["logits"]
        return loaded[shard][rows]

    def array_record_read(shard, rows):
        data = b"".join(sources[shard].__getitems__(rows.tolist()))
        return np.frombuffer(data, "float32").reshape(-1, width)

    return {
        "npz_shard": npz_read,
        "array_record": array_record_read,
        "in_memory": lambda shard, rows: logits[shard * shard_size + rows],
    }


def _batches_of(read, batches):
    """A `keras.utils.PyDataset` of `read(shard, rows)` for each planned batch."""
    import keras

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, index):
            return read(*batches[index])

    return Batches()


def _rows_per_second(iterable):
    start = time.perf_counter()
    rows = sum(int(batch.shape[0]) for batch in iterable)
    return rows / (time.perf_counter() - start)


def _pipelines(backend, classes):
    """name -> function(PyDataset) -> iterable of batches."""

    def pydataset(data):
        return (data[i] for i in range(len(data)))

    pipes = {"pydataset": pydataset}
    if backend == "tensorflow":
        import tensorflow as tf

        def tf_data(data):
            spec = tf.TensorSpec((None, classes), tf.float32)
            return tf.data.Dataset.from_generator(
                lambda: pydataset(data), output_signature=spec
            ).prefetch(2)

        pipes["tf_data"] = tf_data
    if backend == "torch":
        import torch

        def torch_dataloader(data):
            return torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)

        pipes["torch_dataloader"] = torch_dataloader
    return pipes


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
    return _rows_per_second(dataset)


def _synthetic(n, classes):
    """The synthetic data and a KD Distiller: a 256-wide teacher, 32-wide student."""
    import keras
    import numpy as np

    from keras_gramkd import Distiller, KDTerm

    rng = np.random.default_rng(0)
    x = {"a": rng.normal(size=(n, 32)).astype("float32")}
    y = rng.integers(0, classes, n).astype("int32")

    def net(width):
        a = keras.Input((32,), name="a")
        hidden = keras.layers.Dense(width, activation="relu")(a)
        return keras.Model({"a": a}, keras.layers.Dense(classes)(hidden))

    keras.utils.set_random_seed(0)
    distiller = Distiller(net(256), net(32), terms=[KDTerm()])
    return distiller, x, y


def _compile(distiller, jit):
    import keras

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    distiller.compile(keras.optimizers.Adam(1e-3), loss, jit_compile=jit)


def measure_reads(args, size, scratch):
    import numpy as np

    from keras_gramkd.cache import ShardedTeacherCache

    n, classes, shard_size, batch = size
    distiller, x, y = _synthetic(n, classes)
    _compile(distiller, args.jit)
    folder = os.path.join(scratch, "reads")
    cache = ShardedTeacherCache.write(distiller, x, folder, shard_size, batch_size=512)
    key = "teacher/kd/logits"
    stream = cache.dataset(x, y, batch_size=batch, seed=1, distiller=distiller)
    batches = stream.batches
    logits = np.concatenate(
        [cache.read(i, key, np.arange(r)) for i, r in enumerate(stream.shard_rows)]
    )
    storages = {"npy_mmap": lambda s, r: cache.read(s, key, r)}
    storages.update(_write_storages(folder, logits, shard_size))
    pipes = _pipelines(args.backend, classes)
    rates = {}
    for _ in range(args.rounds):
        for storage, read in storages.items():
            for pipe, make in pipes.items():
                rate = _rows_per_second(make(_batches_of(read, batches)))
                rates.setdefault(storage, {}).setdefault(pipe, []).append(rate)
        if args.backend == "tensorflow":
            rate = _tfrecord_rows_per_second(folder, logits, shard_size, batch)
            rates.setdefault("tfrecord", {}).setdefault("tf_data", []).append(rate)
    return {
        "settings": {
            "samples": n,
            "classes": classes,
            "shard_size": shard_size,
            "batch_size": batch,
            "cache_mib": logits.nbytes / 2**20,
        },
        "rows_per_s": {
            storage: {pipe: statistics.median(v) for pipe, v in by_pipe.items()}
            for storage, by_pipe in rates.items()
        },
    }


# ----------------------------------------------------------------------------
# fit


def _fit_cases(args, harness, quick):
    """name -> (distiller, x, y, batch size, shard size), compiled."""
    n, classes, shard_size, batch = SIZES["quick" if quick else "full"]
    distiller, x, y = _synthetic(n // 4, classes)
    _compile(distiller, args.jit)
    cases = {"synthetic": (distiller, x, y, batch, shard_size)}
    for name in ("demo", "teacher-sized"):
        steps = DEMO_STEPS["quick" if quick else "full"]
        case = harness.demo_case(steps, teacher_sized=name == "teacher-sized")
        run = harness.build_variant(case, "d", jit_compile=args.jit)
        shard = max(case.batch_size, len(case.y) // 4)
        cases[name] = (run.model, case.x, case.y, case.batch_size, shard)
    return cases


def _counter_reset(harness, teacher):
    """A function that sets the teacher's forward counter, if any, to 0."""
    try:
        counter = harness.counter_of(teacher)
    except ValueError:  # an uncounted teacher
        return lambda: None
    return lambda: counter.executed.assign(0)


def measure_fit(args, harness, quick, scratch):
    from keras_gramkd.cache import ShardedTeacherCache, TeacherCache

    results = {}
    for name, (distiller, x, y, batch, shard_size) in _fit_cases(
        args, harness, quick
    ).items():
        # The demo cases' teacher counts its forward passes in a variable that
        # the teacher's fingerprint includes: back to 0 after each teacher run.
        reset = _counter_reset(harness, distiller.teacher)
        folder = os.path.join(scratch, f"fit-{name}")
        sharded = ShardedTeacherCache.write(distiller, x, folder, shard_size, batch)
        reset()
        cache = TeacherCache.build(distiller, x, batch_size=batch)
        reset()
        attached = cache.attach(x)
        counters = {}
        runs = [
            harness.Run("in_memory", distiller, attached, y, batch, counters),
            harness.Run(
                "sharded",
                distiller,
                sharded.dataset(x, y, batch_size=batch, seed=1, distiller=distiller),
                y,
                batch,
                counters,
            ),
            harness.Run(
                "sharded_read_ahead",
                distiller,
                sharded.dataset(
                    x, y, batch_size=batch, seed=1, distiller=distiller, workers=2
                ),
                y,
                batch,
                counters,
            ),
        ]
        if args.backend == "tensorflow":
            tf_data = sharded.tf_dataset(
                x, y, batch_size=batch, seed=1, distiller=distiller
            )
            runs.append(
                harness.Run("sharded_tf_data", distiller, tf_data, y, batch, counters)
            )
        harness.measure(runs, warmup=1, rounds=args.rounds)
        epochs = {run.name: run.result()["median_epoch_s"] for run in runs}
        fastest = {run.name: min(run.epoch_times) for run in runs}
        results[name] = {
            "samples": len(y),
            "batch_size": batch,
            "shard_size": shard_size,
            "median_epoch_s": epochs,
            "epoch_times_s": {run.name: run.epoch_times for run in runs},
            "fastest_ratio": fastest["sharded"] / fastest["in_memory"],
            "ratio": epochs["sharded"] / epochs["in_memory"],
            "ratio_read_ahead": epochs["sharded_read_ahead"] / epochs["in_memory"],
        }
        if "sharded_tf_data" in epochs:
            results[name]["ratio_tf_data"] = (
                epochs["sharded_tf_data"] / epochs["in_memory"]
            )
            results[name]["fastest_ratio_tf_data"] = (
                fastest["sharded_tf_data"] / fastest["in_memory"]
            )
    return results


# ----------------------------------------------------------------------------
# Peak memory, one fresh process per point


def _rss_mib(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_point(args, storage, samples, out):
    """Peak memory growth of one epoch of fit from `storage` ("in_memory" or
    "sharded") over `samples` synthetic rows, in this process (a sharded cache
    is written beside `out`, the file of the result)."""
    from keras_gramkd.cache import ShardedTeacherCache, TeacherCache

    _, classes, _, batch = SIZES["quick" if args.quick else "full"]
    shard_size = MEMORY_BASE["quick" if args.quick else "full"] // 4
    distiller, x, y = _synthetic(samples, classes)
    _compile(distiller, args.jit)
    warm = {k: v[:batch] for k, v in x.items()}
    warm_cache = TeacherCache.build(distiller, warm, batch_size=batch)
    distiller.fit(warm_cache.attach(warm), y[:batch], batch_size=batch, verbose=0)
    if storage == "sharded":
        folder = os.path.splitext(out)[0] + "-cache"
        ShardedTeacherCache.write(distiller, x, folder, shard_size, batch_size=512)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    base = _rss_mib("VmRSS")
    if storage == "sharded":
        cache = ShardedTeacherCache.open(folder)
        data = cache.dataset(x, y, batch_size=batch, distiller=distiller)
        distiller.fit(data, epochs=1, verbose=0)
        cache_mib = 0.0
    else:
        cache = TeacherCache.build(distiller, x, batch_size=512)
        distiller.fit(cache.attach(x), y, batch_size=batch, epochs=1, verbose=0)
        cache_mib = cache.nbytes / 2**20
    return {
        "storage": storage,
        "samples": samples,
        "targets_mib": samples * classes * 4 / 2**20,
        "in_memory_cache_mib": cache_mib,
        "peak_growth_mib": _rss_mib("VmHWM") - base,
    }


def measure_memory(args, scratch):
    """Every point in its own process, two at a time (each measures only its
    own peak memory)."""
    base = MEMORY_BASE["quick" if args.quick else "full"]
    points = [
        (scale, storage, os.path.join(scratch, f"memory-{scale}-{storage}.json"))
        for scale in MEMORY_SCALES["quick" if args.quick else "full"]
        for storage in ("in_memory", "sharded")
    ]
    options = ["--backend", args.backend, "--jit-compile", args.jit_compile]
    options += ["--quick"] if args.quick else []
    options += ["--threads", str(args.threads)] if args.threads else []
    for pair in range(0, len(points), 2):
        children = [
            subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), *options]
                + ["--memory-point", f"{storage},{base * scale},{out}"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for scale, storage, out in points[pair : pair + 2]
        ]
        for child in children:
            _, errors = child.communicate()
            if child.returncode:
                raise RuntimeError(f"a memory point failed:\n{errors.decode()[-3000:]}")
    results = []
    for scale, _, out in points:
        with open(out) as f:
            results.append(dict(json.load(f), scale=scale))
    return results


# ----------------------------------------------------------------------------


def _print(harness, data):
    reads = data.get("reads")
    if reads:
        rates = reads["rows_per_s"]
        pipes = sorted({p for by_pipe in rates.values() for p in by_pipe})
        s = reads["settings"]
        harness.print_table(
            f"Rows/s of shuffled batches of {s['batch_size']} rows "
            f"({s['samples']} x {s['classes']} float32, shards of {s['shard_size']})",
            ["storage", *pipes],
            [
                [name, *(f"{by_pipe[p]:,.0f}" if p in by_pipe else "-" for p in pipes)]
                for name, by_pipe in rates.items()
            ],
        )
    if data.get("fit"):
        harness.print_table(
            "One epoch of fit: median epoch seconds and ratio to the in-memory cache",
            ["case", "in memory", "sharded", "ratio", "read ahead", "ratio", "tf.data"],
            [
                [
                    name,
                    f"{f['median_epoch_s']['in_memory']:.3f}",
                    f"{f['median_epoch_s']['sharded']:.3f}",
                    f"{f['ratio']:.3f}",
                    f"{f['median_epoch_s']['sharded_read_ahead']:.3f}",
                    f"{f['ratio_read_ahead']:.3f}",
                    f"{f['ratio_tf_data']:.3f}" if "ratio_tf_data" in f else "-",
                ]
                for name, f in data["fit"].items()
            ],
        )
    if data.get("memory"):
        harness.print_table(
            "Peak memory growth over one epoch of fit (MiB)",
            ["scale", "samples", "targets", "in-memory cache", "sharded cache"],
            [
                [
                    f"{p['scale']}x",
                    str(p["samples"]),
                    f"{p['targets_mib']:.0f}",
                    f"{p['peak_growth_mib']:.0f}",
                    f"{q['peak_growth_mib']:.0f}",
                ]
                for p, q in zip(data["memory"][::2], data["memory"][1::2], strict=True)
            ],
        )


def main(argv=None):
    args = parse_args(argv)
    configure(args)
    if args.memory_point:
        storage, samples, out = args.memory_point.split(",")
        point = memory_point(args, storage, int(samples), out)
        with open(out, "w") as f:
            json.dump(point, f)
        return
    import harness

    size = SIZES["quick" if args.quick else "full"]
    data = {
        "machine": harness.machine_info(),
        "settings": {"quick": args.quick, "rounds": args.rounds, "parts": args.parts},
    }
    with tempfile.TemporaryDirectory(prefix="shard_read-") as scratch:
        if "reads" in args.parts:
            data["reads"] = measure_reads(args, size, scratch)
        if "fit" in args.parts:
            data["fit"] = measure_fit(args, harness, args.quick, scratch)
        if "memory" in args.parts:
            data["memory"] = measure_memory(args, scratch)
    _print(harness, data)
    harness.write_json(args.json or harness.default_json("shard_read"), data)


if __name__ == "__main__":
    main()
