"""`ShardedTeacherCache`: shards on disk, resumed writes, checked streaming reads."""

import json
import os
import pickle
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_gramkd import Distiller, GramTerm, KDTerm
from keras_gramkd.cache import ShardedTeacherCache, TeacherCache

N, SHARD, BATCH = 100, 32, 16  # four shards, the last of 4 rows


def _net(prefix, width, seed):
    keras.utils.set_random_seed(seed)
    a, b = keras.Input((4,), name="a"), keras.Input((6,), name="b")
    ea = keras.layers.Dense(width, name=f"{prefix}_a")(a)
    eb = keras.layers.Dense(width, name=f"{prefix}_b")(b)
    joined = keras.layers.Concatenate()([ea, eb])
    return keras.Model({"a": a, "b": b}, keras.layers.Dense(3)(joined))


def _distiller(teacher_seed=1):
    distiller = Distiller(
        _net("t", 16, teacher_seed),
        _net("s", 4, 2),
        terms=[
            KDTerm(2.0),
            GramTerm({"a": "t_a", "b": "t_b"}, {"a": "s_a", "b": "s_b"}, 0.5),
        ],
    )
    distiller.compile(
        keras.optimizers.SGD(0.1),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return distiller


def _data(n=N, seed=0):
    """Inputs whose first column is the row's index, and labels."""
    rng = np.random.default_rng(seed)
    x = {
        "a": rng.normal(size=(n, 4)).astype("float32"),
        "b": rng.normal(size=(n, 6)).astype("float32"),
    }
    x["a"][:, 0] = np.arange(n) / n
    return x, rng.integers(0, 3, n).astype("int32")


def _all_rows(cache, key):
    return np.concatenate(
        [
            cache.read(i, key, np.arange(cache.shard_index(i)["rows"]))
            for i in range(cache.num_shards)
        ]
    )


def test_the_shards_hold_the_in_memory_caches_targets(tmp_path):
    distiller = _distiller()
    x, _ = _data()
    cache = ShardedTeacherCache.write(distiller, x, str(tmp_path), SHARD, BATCH)
    assert (len(cache), cache.num_shards) == (N, 4)
    assert [cache.shard_index(i)["rows"] for i in range(4)] == [32, 32, 32, 4]
    memory = TeacherCache.build(distiller, x, batch_size=BATCH)
    for key, value in memory.targets.items():
        np.testing.assert_allclose(_all_rows(cache, key), value, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(_all_rows(cache, "checksums"), memory.checksums)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["samples"] == N and manifest["shard_size"] == SHARD
    assert manifest["checksum_keys"] == ["a", "b"]


def test_training_from_the_shards_equals_training_from_memory(tmp_path):
    x, y = _data()
    streamed, in_memory = _distiller(), _distiller()
    cache = ShardedTeacherCache.write(streamed, x, str(tmp_path), SHARD, BATCH)
    data = cache.dataset(x, y, batch_size=BATCH, shuffle=False, distiller=streamed)
    # Shards of 32 and batches of 16: the same batches as the in-memory cache's,
    # but the last shard's 4 rows, which make a batch of their own either way.
    assert [len(rows) for _, rows in data.batches] == [16] * 6 + [4]
    history = streamed.fit(data, epochs=2, shuffle=False, verbose=0).history
    memory = TeacherCache.build(in_memory, x, batch_size=BATCH)
    reference = in_memory.fit(
        memory.attach(x), y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0
    ).history
    np.testing.assert_allclose(history["loss"], reference["loss"], rtol=1e-5)
    for a, b in zip(streamed.student.weights, in_memory.student.weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_reader_thread_ahead_trains_the_same(tmp_path):
    """`workers=2` (PyDataset's read-ahead threads) gives the batches of the
    training thread's reads: the same losses and weights over two shuffled
    epochs; an unknown PyDataset argument is refused by name."""
    x, y = _data()
    ahead, inline = _distiller(), _distiller()
    cache = ShardedTeacherCache.write(ahead, x, str(tmp_path), SHARD, BATCH)
    histories = [
        model.fit(
            cache.dataset(x, y, batch_size=BATCH, seed=5, distiller=model, **kwargs),
            epochs=2,
            shuffle=False,  # the dataset shuffles itself, shard by shard
            verbose=0,
        ).history
        for model, kwargs in ((ahead, {"workers": 2}), (inline, {}))
    ]
    np.testing.assert_allclose(histories[0]["loss"], histories[1]["loss"], rtol=1e-6)
    for a, b in zip(ahead.student.weights, inline.student.weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="worker"):
        cache.dataset(x, y, distiller=ahead, worker=2)


def test_the_tf_data_path_gives_the_same_batches_and_weights(tmp_path):
    """`tf_dataset`: `dataset`'s batches in the same order for each of two
    shuffled passes, and `fit` from it trains the same weights as from
    `dataset`, on every backend."""
    x, y = _data()
    through_tf, through_py = _distiller(), _distiller()
    cache = ShardedTeacherCache.write(through_tf, x, str(tmp_path), SHARD, BATCH)
    batches = cache.dataset(x, y, batch_size=BATCH, seed=4, distiller=through_py)
    tf_data = cache.tf_dataset(x, y, batch_size=BATCH, seed=4, distiller=through_tf)
    for _ in range(2):
        got = list(tf_data.as_numpy_iterator())
        assert len(got) == len(batches) == 7
        for index, (xb, yb) in enumerate(got):
            expected_x, expected_y = batches[index]
            assert (
                set(xb)
                == set(expected_x)
                == {"a", "b", "teacher/kd/logits", "teacher/gram/gram"}
            )
            for key, value in expected_x.items():
                np.testing.assert_array_equal(xb[key], value)
            np.testing.assert_array_equal(yb, expected_y)
        batches.on_epoch_end()
    # Keras' fit starts a PyDataset with an on_epoch_end: unshuffled, the two
    # paths give fit the same batches, and fit trains the same weights.
    models = (through_tf, through_py)
    sources = (
        cache.tf_dataset(x, y, batch_size=BATCH, shuffle=False, distiller=through_tf),
        cache.dataset(x, y, batch_size=BATCH, shuffle=False, distiller=through_py),
    )
    histories = [
        model.fit(data, epochs=2, shuffle=False, verbose=0).history
        for model, data in zip(models, sources, strict=True)
    ]
    np.testing.assert_allclose(histories[0]["loss"], histories[1]["loss"], rtol=1e-6)
    for a, b in zip(
        through_tf.student.weights, through_py.student.weights, strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="takes no \\['workers'\\]"):
        cache.tf_dataset(x, y, distiller=through_tf, workers=2)


def test_the_tf_data_path_refuses_a_damaged_shard_by_name(tmp_path):
    distiller = _distiller()
    x, y = _data()
    cache = ShardedTeacherCache.write(distiller, x, str(tmp_path), SHARD)
    path = tmp_path / "shard-00002" / "teacher--kd--logits.npy"
    path.write_bytes(path.read_bytes()[:-8])
    data = cache.tf_dataset(x, y, batch_size=BATCH, shuffle=False, distiller=distiller)
    with pytest.raises(Exception) as error:
        distiller.fit(data, epochs=1, shuffle=False, verbose=0)
    assert re.search(
        r"Shard 2: .* has \d+ bytes, not \d+ \(truncated\?\)", str(error.value)
    )


def test_the_tf_data_path_without_tensorflow_says_what_to_install(
    tmp_path, monkeypatch
):
    distiller = _distiller()
    x, y = _data()
    cache = ShardedTeacherCache.write(distiller, x, str(tmp_path), SHARD)
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import fails
    with pytest.raises(ImportError, match=r"keras-gramkd\[tensorflow\].*cache.dataset"):
        cache.tf_dataset(x, y, distiller=distiller)


def test_a_pickled_cache_reads_the_same_rows(tmp_path):
    """A cache sent to another process (PyDataset's multiprocessing workers)
    reopens its shards there."""
    distiller = _distiller()
    x, _ = _data()
    cache = ShardedTeacherCache.write(distiller, x, str(tmp_path), SHARD, BATCH)
    rows = np.array([1, 5, 30])
    cache.read(0, "teacher/kd/logits", rows)  # a map open in this one
    copy = pickle.loads(pickle.dumps(cache))
    for index in range(cache.num_shards):
        some = rows[rows < cache.shard_index(index)["rows"]]
        np.testing.assert_array_equal(
            copy.read(index, "teacher/kd/logits", some),
            cache.read(index, "teacher/kd/logits", some),
        )


def test_a_shuffled_epoch_covers_every_row_once_and_keeps_rows_aligned(tmp_path):
    distiller = _distiller()
    x, y = _data()
    cache = ShardedTeacherCache.write(distiller, x, str(tmp_path), SHARD, BATCH)
    data = cache.dataset(x, y, batch_size=BATCH, seed=3, distiller=distiller)
    memory = TeacherCache.build(distiller, x, batch_size=BATCH)
    orders = []
    for _ in range(2):
        seen = []
        for index in range(len(data)):
            xb, yb = data[index]
            rows = np.round(xb["a"][:, 0] * N).astype(int)
            np.testing.assert_array_equal(xb["b"], x["b"][rows])
            np.testing.assert_array_equal(yb, y[rows])
            np.testing.assert_allclose(  # the teacher on other batches: 1 ulp
                xb["teacher/kd/logits"],
                memory.targets["teacher/kd/logits"][rows],
                rtol=1e-6,
                atol=1e-6,
            )
            seen.extend(rows)
        assert sorted(seen) == list(range(N))
        orders.append(seen)
        data.on_epoch_end()
    assert orders[0] != orders[1]  # each epoch draws a new order


def test_a_killed_writer_resumes_at_the_missing_shards(tmp_path):
    distiller = _distiller()
    x, _ = _data()
    assert (
        ShardedTeacherCache.write(distiller, x, str(tmp_path), SHARD, shards=[0, 2])
        is None
    )
    with pytest.raises(ValueError, match=r"lacks shard\(s\) \[1, 3\] of 4"):
        ShardedTeacherCache.open(str(tmp_path))
    # A writer killed mid-shard leaves only a temporary folder, never a shard.
    (tmp_path / "shard-00001.tmp-999").mkdir()
    first = os.path.getmtime(tmp_path / "shard-00000" / "index.json")
    cache = ShardedTeacherCache.write(distiller, x, str(tmp_path), SHARD)
    assert os.path.getmtime(tmp_path / "shard-00000" / "index.json") == first
    whole = ShardedTeacherCache.write(distiller, x, str(tmp_path / "whole"), SHARD)
    key = "teacher/kd/logits"
    np.testing.assert_array_equal(_all_rows(cache, key), _all_rows(whole, key))


def test_disjoint_writers_make_one_cache(tmp_path):
    x, _ = _data()
    # Two writers (two processes in practice; the same teacher weights).
    assert (
        ShardedTeacherCache.write(_distiller(), x, str(tmp_path), SHARD, shards=[2, 3])
        is None
    )
    cache = ShardedTeacherCache.write(
        _distiller(), x, str(tmp_path), SHARD, shards=[0, 1]
    )
    assert cache is not None and cache.num_shards == 4
    with pytest.raises(ValueError, match=r"shards \[4\] are out of range"):
        ShardedTeacherCache.write(_distiller(), x, str(tmp_path), SHARD, shards=[4])


@pytest.mark.parametrize(
    "damage, message",
    [
        ("flip", r"Shard 1: teacher--kd--logits.npy \(teacher/kd/logits\) differs"),
        ("truncate", r"Shard 1: .* has \d+ bytes, not \d+ \(truncated\?\)"),
        ("delete", r"Shard 1: .* is missing"),
    ],
)
def test_a_damaged_shard_is_refused_by_name(tmp_path, damage, message):
    distiller = _distiller()
    x, y = _data()
    cache = ShardedTeacherCache.write(distiller, x, str(tmp_path), SHARD)
    path = tmp_path / "shard-00001" / "teacher--kd--logits.npy"
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-3] ^= 0x01
        path.write_bytes(bytes(raw))
    elif damage == "truncate":
        path.write_bytes(bytes(raw[:-8]))
    else:
        path.unlink()
    data = cache.dataset(x, y, batch_size=BATCH, shuffle=False, distiller=distiller)
    data[0]  # shard 0 is intact
    with pytest.raises(ValueError, match=message):
        data[2]


def test_what_differs_from_the_writer_is_refused(tmp_path):
    distiller = _distiller()
    x, y = _data()
    cache = ShardedTeacherCache.write(distiller, x, str(tmp_path), SHARD)
    with pytest.raises(ValueError, match="differs from this one in .*fingerprint"):
        ShardedTeacherCache.write(_distiller(teacher_seed=5), x, str(tmp_path), SHARD)
    with pytest.raises(ValueError, match="teacher's weights differ"):
        cache.dataset(x, y, distiller=_distiller(teacher_seed=5))
    with pytest.raises(ValueError, match="holds 100 samples but the data has 99"):
        cache.dataset({k: v[:99] for k, v in x.items()}, y[:99], distiller=distiller)
    changed = {**x, "a": x["a"].copy()}
    changed["a"][56] += 1.0  # row 24 of shard 1: in its second batch
    data = cache.dataset(
        changed, y, batch_size=BATCH, shuffle=False, distiller=distiller
    )
    data[1]
    # The whole shard is checked before its first batch.
    message = r"1 of 16 samples of shard 1 of the data \(its rows 16 to 31\) differ"
    with pytest.raises(ValueError, match=message + r".*position\(s\) \[8\]"):
        data[2]
    with pytest.raises(ValueError, match="sample_weight needs y"):
        cache.dataset(x, sample_weight=np.ones(N), distiller=distiller)
    with pytest.raises(FileNotFoundError, match="not a sharded teacher cache"):
        ShardedTeacherCache.open(str(tmp_path / "nothing"))


MEMORY_SCRIPT = textwrap.dedent(
    """
    import os, resource, sys
    import keras, numpy as np
    from keras_gramkd import Distiller, KDTerm
    from keras_gramkd.cache import ShardedTeacherCache

    n, classes, folder = int(sys.argv[2]), 1000, sys.argv[1]
    rng = np.random.default_rng(0)
    x = {"a": rng.normal(size=(n, 8)).astype("float32")}
    y = rng.integers(0, classes, n).astype("int32")

    def net(width):
        a = keras.Input((8,), name="a")
        hidden = keras.layers.Dense(width)(a)
        return keras.Model({"a": a}, keras.layers.Dense(classes)(hidden))

    distiller = Distiller(net(16), net(4), terms=[KDTerm()])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    distiller.compile("adam", loss)
    cache = ShardedTeacherCache.write(distiller, x, folder, 2048, batch_size=512)
    data = cache.dataset(x, y, batch_size=256, distiller=distiller)
    distiller.fit(data, epochs=1, steps_per_epoch=4, verbose=0)  # compile, warm up
    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
    before = peak()
    distiller.fit(data, epochs=1, verbose=0)  # every row, every shard
    targets = sum(
        os.path.getsize(os.path.join(folder, d, f))
        for d in os.listdir(folder) if d.startswith("shard-")
        for f in os.listdir(os.path.join(folder, d))
    ) / 2**20
    print(f"{targets:.1f} {peak() - before:.1f}")
    """
)


def _stream(folder, samples):
    """(MiB stored, MiB of peak memory growth) of one streamed epoch."""
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, folder, str(samples)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return tuple(map(float, done.stdout.split()[-2:]))


@pytest.mark.slow
def test_a_cache_four_times_a_memory_cap_trains_within_it(tmp_path):
    """One epoch streams a 376 MiB cache (the teacher's 1000 logits for 98,304
    samples) while peak memory grows by less than an 80 MiB cap. Every batch
    is full, so that no second compile (of a smaller last batch) counts.
    Measured growth: TensorFlow and PyTorch 6 MiB; JAX 20 to 66 MiB from run
    to run, as much with 47 MiB of targets as with 376."""
    cap = 80.0
    stored, growth = _stream(str(tmp_path / "cache"), 98304)
    assert stored > 4 * cap
    assert growth < cap, f"peak memory grew by {growth} MiB streaming {stored} MiB"
