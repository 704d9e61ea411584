"""TeacherCache: training from cached targets equals training with the live
teacher, the targets follow their samples, and stale caches fail clearly."""

import json
import os
import warnings

import keras
import numpy as np
import pytest
from helpers import (
    DictSequence,
    batch_losses,
    build_distiller,
    make_data,
    make_net,
    sparse_ce,
    to_np,
)

from keras_gramkd import ModalityGram
from keras_gramkd.cache import FLOAT16_LOSS_TOLERANCE, FORMAT_VERSION, TeacherCache

TERMS = ("gram_loss", "kd_loss", "loss", "task_loss")  # every loss, sorted
LOGITS, GRAM = "teacher/kd/logits", "teacher/gram/gram"
TARGETS = (LOGITS, GRAM)
REBUILD = r"Rebuild the cache with TeacherCache\.build"


def with_mask(x, seed=3):
    n = len(x["a"])
    mask = np.random.default_rng(seed).integers(0, 2, size=(n, 3)).astype("float32")
    return {**x, "modality_mask": mask}


def identical_distillers(count):
    """Distillers sharing one teacher, with identically initialised students."""
    teacher = make_net("t", 16)
    distillers = []
    for _ in range(count):
        keras.utils.set_random_seed(1)
        distillers.append(build_distiller(teacher=teacher, student=make_net("s", 4)))
    return distillers


def assert_targets_match_teacher(distiller, batch):
    """Each row's attached targets equal the live teacher's for that row."""
    inputs = {k: v for k, v in batch.items() if k not in TARGETS}
    live = distiller.teacher_targets(inputs)
    assert sorted(live) == sorted(k for k in batch if k in TARGETS)
    for key, value in live.items():
        np.testing.assert_allclose(batch[key], to_np(value), rtol=1e-5, atol=1e-6)


def evaluate(distiller, x, y=None):
    return distiller.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)


# --- equivalence with the live teacher ----------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "modality_mask"])
def test_fit_from_cache_gives_the_live_teachers_batch_losses(masked):
    x, y = make_data()
    x = with_mask(x) if masked else x
    live, cached, control = identical_distillers(3)
    data = TeacherCache.build(cached, x, batch_size=16).attach(x)
    expected = batch_losses(live, x, y)
    found = batch_losses(cached, data, y)
    assert found.shape == (6, len(TERMS))
    np.testing.assert_allclose(found, expected, rtol=0, atol=1e-5)
    if not masked:  # the control: targets shifted by one sample change the losses
        shifted = {**data, **{k: np.roll(data[k], 1, axis=0) for k in TARGETS}}
        differ = np.abs(batch_losses(control, shifted, y) - expected)
        assert differ[:, :2].min() > 1e-4  # gram_loss and kd_loss


@pytest.mark.slow  # fast tier: under 3 min per backend
def test_teacher_never_runs_when_training_from_the_cache():
    x, y = make_data(n=16)
    teacher = make_net("t", 16, counter=True)
    eager = {"loss": sparse_ce(), "run_eagerly": True}
    distiller = build_distiller(teacher=teacher, compile_args=eager)
    data = TeacherCache.build(distiller, x, batch_size=16).attach(x)
    counter = teacher.get_layer("t_counter_a")
    counter.calls = 0
    history = distiller.fit(data, y, batch_size=8, epochs=1, verbose=0).history
    assert counter.calls == 0
    assert np.isfinite(history["kd_loss"][0]) and np.isfinite(history["gram_loss"][0])


def test_targets_stay_with_their_samples_when_rows_are_permuted():
    x, _ = make_data(n=40)
    x = with_mask(x)
    distiller = build_distiller()
    data = TeacherCache.build(distiller, x, batch_size=16).attach(x)
    assert set(data) == {*x, *TARGETS}
    order = np.random.default_rng(0).permutation(40)
    assert_targets_match_teacher(distiller, {k: v[order] for k, v in data.items()})


# --- data sources and storage ---------------------------------------------------


@pytest.mark.parametrize(
    "batched",
    [pytest.param(False, marks=pytest.mark.slow), True],
    ids=["unbatched", "batched"],
)
def test_tf_data_source(batched):
    tf = pytest.importorskip("tensorflow")
    x, y = make_data(n=40)
    distiller = build_distiller()
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.batch(16) if batched else ds
    cache = TeacherCache.build(distiller, ds, batch_size=8)
    assert cache.batch_sizes == ([16, 16, 8] if batched else [8] * 5)
    for key, value in distiller.teacher_targets(x).items():
        np.testing.assert_allclose(cache.targets[key], to_np(value), atol=1e-6)

    attached = cache.attach(ds)
    shuffled = attached if batched else attached.shuffle(40, seed=0).batch(8)
    for batch, _ in shuffled.as_numpy_iterator():
        assert_targets_match_teacher(distiller, batch)
    if not batched:  # what the Distiller reads from the pipeline
        live = evaluate(distiller, ds.batch(16))
        cached = evaluate(distiller, attached.batch(16))
        for term in TERMS:
            assert cached[term] == pytest.approx(live[term], abs=1e-5)


def test_pydataset_source():
    x, y = make_data()
    distiller = build_distiller()
    sequence = DictSequence(x, y, 16)
    cache = TeacherCache.build(distiller, sequence)
    assert cache.batch_sizes == [16, 16, 16]
    attached = cache.attach(sequence)
    batch, labels = attached[1]
    np.testing.assert_array_equal(labels, y[16:32])
    assert_targets_match_teacher(distiller, batch)
    live, cached = evaluate(distiller, sequence), evaluate(distiller, attached)
    for term in TERMS:
        assert cached[term] == pytest.approx(live[term], abs=1e-5)


def test_float16_halves_the_targets_and_moves_the_losses_little():
    x, y = make_data()
    distiller = build_distiller()
    full = TeacherCache.build(distiller, x)
    half = TeacherCache.build(distiller, x, dtype="float16")
    assert {v.dtype for v in half.targets.values()} == {np.dtype("float16")}
    for key, value in full.targets.items():
        assert half.targets[key].nbytes * 2 == value.nbytes
    exact, rounded = (
        evaluate(distiller, full.attach(x), y),
        evaluate(distiller, half.attach(x), y),
    )
    for term in ("kd_loss", "gram_loss"):
        assert rounded[term] == pytest.approx(exact[term], abs=FLOAT16_LOSS_TOLERANCE)


def test_float16_refuses_targets_beyond_its_range():
    teacher = make_net("t", 16)
    layer = teacher.get_layer("t_logits")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel * 1e6, bias])
    x, _ = make_data(n=8)
    with pytest.raises(ValueError, match=r"beyond float16's range.*dtype='float32'"):
        TeacherCache.build(build_distiller(teacher=teacher), x, dtype="float16")


def test_float16_warns_of_targets_below_its_smallest_normal_number():
    """Logits ~1e-5 (and one column ~0.5): the small ones lose bits in float16."""
    teacher = make_net("t", 16)
    layer = teacher.get_layer("t_logits")
    kernel, _ = layer.get_weights()
    layer.set_weights([kernel * 1e-5, np.array([0.5, 0.0, 1e-4], "float32")])
    x, _ = make_data(n=16)
    distiller = build_distiller((1.0, 1.0, 0.0), teacher=teacher)
    exact = TeacherCache.build(distiller, x).targets[LOGITS].astype(np.float64)
    small = np.abs(exact[(exact != 0) & (np.abs(exact) < 2.0**-14)])
    stored = small.astype(np.float16).astype(np.float64)
    worst = np.max(np.abs(stored - small) / small)
    assert small.size >= 16 and worst > 1e-3  # float32 keeps them to 6e-8
    message = (
        rf"teacher/kd/logits holds {small.size} nonzero value\(s\) below "
        r"float16's smallest normal number \(6.1e-05\); stored in float16 they "
        rf"lose precision \(worst relative error {worst:.3g}; below about 6e-8 "
        r"they become 0\)\. Build the cache with dtype='float32' to keep them\."
    )
    with pytest.warns(UserWarning, match=message):
        half = TeacherCache.build(distiller, x, dtype="float16")
    np.testing.assert_array_equal(half.targets[LOGITS], exact.astype(np.float16))
    layer.set_weights([kernel * 1e-5, np.full(3, 0.5, "float32")])  # all normal
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        TeacherCache.build(
            build_distiller((1.0, 1.0, 0.0), teacher=teacher), x, dtype="float16"
        )


def test_save_and_load_round_trip(tmp_path):
    x, _ = make_data(n=40)
    x = with_mask(x)
    distiller = build_distiller()
    cache = TeacherCache.build(distiller, x, batch_size=16, dtype="float16")
    path = tmp_path / "targets.npz"
    cache.save(path)
    cache.save(path)  # overwrites, through a temporary file
    assert os.listdir(tmp_path) == ["targets.npz"]
    loaded = TeacherCache.load(path)
    assert (
        repr(loaded)
        == repr(cache)
        == (
            "TeacherCache(40 samples, float16: teacher/gram/gram (40, 3, 3), "
            "teacher/kd/logits (40, 3))"
        )
    )
    assert len(loaded) == 40 and loaded.nbytes == cache.nbytes
    for name in ("checksum_keys", "batch_sizes", "fingerprint", "term_settings"):
        assert getattr(loaded, name) == getattr(cache, name)
    np.testing.assert_array_equal(loaded.checksums, cache.checksums)
    with pytest.raises(ValueError, match=r"attach needs the Distiller"):
        loaded.attach(x)
    data, expected = loaded.attach(x, distiller), cache.attach(x)
    for key in TARGETS:
        np.testing.assert_array_equal(data[key], expected[key])


# --- stale caches ---------------------------------------------------------------


def test_stale_cache_for_a_different_data_size():
    tf = pytest.importorskip("tensorflow")
    x, y = make_data()
    distiller = build_distiller()
    cache = TeacherCache.build(distiller, DictSequence(x, y, 16))
    fewer = {k: v[:-1] for k, v in x.items()}
    with pytest.raises(
        ValueError, match=f"holds 48 samples but the data has 47.*{REBUILD}"
    ):
        cache.attach(fewer)
    with pytest.raises(
        ValueError, match=r"has 6 batches, but the cache was built from 3"
    ):
        cache.attach(DictSequence(x, y, 8))
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    with pytest.raises(
        ValueError, match="holds 48 samples but the tf.data.Dataset has 40"
    ):
        cache.attach(ds.take(40))
    short = TeacherCache.build(distiller, fewer)
    more = short.attach(ds.batch(16))  # a batched dataset's size shows when read
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="more than the 47 samples"
    ):
        list(more)


def test_teacher_changed_after_caching_is_caught_by_its_fingerprint():
    x, _ = make_data()
    distiller = build_distiller()
    cache = TeacherCache.build(distiller, x)
    cache.attach(x)
    layer = distiller.teacher.get_layer("t_a")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel, bias + 1e-3])
    with pytest.raises(ValueError, match=f"teacher's weights differ.*{REBUILD}"):
        cache.attach(x)
    with pytest.raises(ValueError, match="teacher's weights differ"):
        cache.attach(x, build_distiller())  # another teacher


def test_other_gram_settings_are_refused():
    x, _ = make_data()
    distiller = build_distiller()
    cache = TeacherCache.build(distiller, x)
    centered = build_distiller(
        teacher=distiller.teacher, gram_loss=ModalityGram("centered")
    )
    formed = f"targets of term 'gram' were formed with.*'l2'.*{REBUILD}"
    with pytest.raises(ValueError, match=formed):
        cache.attach(x, centered)
    logits_only = TeacherCache.build(
        build_distiller((1.0, 1.0, 0.0), distiller.teacher), x
    )
    assert sorted(logits_only.targets) == [LOGITS]
    with pytest.raises(ValueError, match=r"holds no targets for term\(s\) \['gram'\]"):
        logits_only.attach(x, distiller)
    kd_only = build_distiller((1.0, 1.0, 0.0), distiller.teacher)
    assert sorted(cache.attach(x, kd_only)) == [*sorted(x), LOGITS]


def test_different_data_of_the_same_size_is_caught_by_checksums():
    x, _ = make_data()
    masked = with_mask(x)
    distiller = build_distiller()
    cache = TeacherCache.build(distiller, masked)
    other, _ = make_data(seed=1)
    with pytest.raises(
        ValueError, match=f"48 of 48 samples of the data differ.*{REBUILD}"
    ):
        cache.attach(with_mask(other))
    with pytest.raises(
        ValueError, match=r"samples of the data differ .*another sample order"
    ):
        cache.attach({k: v[::-1] for k, v in masked.items()})
    with pytest.raises(ValueError, match="samples of the data differ"):
        cache.attach(with_mask(x, seed=4))  # another modality mask
    with pytest.raises(ValueError, match=r"lacks \['modality_mask'\]"):
        cache.attach(x)


def test_augmentation_in_the_pipeline_is_caught_when_read():
    tf = pytest.importorskip("tensorflow")
    x, y = make_data(n=32)
    distiller = build_distiller()
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    cache = TeacherCache.build(distiller, ds)

    def jitter(inputs, label):
        noise = tf.random.normal(tf.shape(inputs["a"]), stddev=0.1)
        return {**inputs, "a": inputs["a"] + noise}, label

    augmented = cache.attach(ds.map(jitter)).batch(8)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="differs from the data the teacher cache"
    ):
        distiller.fit(augmented, epochs=1, verbose=0)

    class NoisySequence(DictSequence):
        def __getitem__(self, i):
            inputs, labels = super().__getitem__(i)
            return {**inputs, "b": inputs["b"] + np.float32(0.1)}, labels

    sequence_cache = TeacherCache.build(distiller, DictSequence(x, y, 8))
    with pytest.raises(ValueError, match=r"samples of batch 0 of the PyDataset differ"):
        distiller.fit(sequence_cache.attach(NoisySequence(x, y, 8)), verbose=0)


def test_corrupt_or_foreign_files_fail_clearly(tmp_path):
    x, _ = make_data(n=16)
    path = tmp_path / "targets.npz"
    TeacherCache.build(build_distiller(), x).save(path)
    good = path.read_bytes()
    unreadable = r"is not a readable TeacherCache file.*corrupt, truncated"
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    for content in (good[: len(good) // 2], bytes(flipped), b"not a cache"):
        path.write_bytes(content)
        with pytest.raises(ValueError, match=unreadable):
            TeacherCache.load(path)
    np.savez(path, values=np.zeros(3))
    with pytest.raises(ValueError, match=unreadable):
        TeacherCache.load(path)

    path.write_bytes(good)
    with np.load(path) as data:
        arrays = dict(data)
    metadata = json.loads(arrays["metadata"].tobytes())
    metadata["version"] = FORMAT_VERSION + 1
    arrays["metadata"] = np.frombuffer(json.dumps(metadata).encode(), np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}"):
        TeacherCache.load(path)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"dtype": "bfloat16"}, "dtype must be one of"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"x": np.zeros((4, 4), "float32")}, "takes a dict of numpy arrays"),
    ],
)
def test_build_arguments_are_checked(kwargs, error):
    x, _ = make_data(n=8)
    with pytest.raises((ValueError, TypeError), match=error):
        TeacherCache.build(build_distiller(), **{"x": x, **kwargs})
