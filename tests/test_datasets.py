"""Tests for keras_gramkd.datasets: mfeat, the synthetic generator and AV-MNIST."""

import os
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest

from keras_gramkd.datasets import (
    MFEAT_VIEWS,
    load_av_mnist,
    load_mfeat,
    make_multimodal,
)
from keras_gramkd.datasets import mfeat as mfeat_module

MFEAT_WIDTHS = {"pix": 240, "fou": 76, "fac": 216, "kar": 64, "zer": 47, "mor": 6}


@pytest.fixture(scope="module")
def raw_mfeat():
    """The vendored arrays, read independently of the module under test."""
    ref = resources.files("keras_gramkd.datasets").joinpath("mfeat.npz")
    with ref.open("rb") as f, np.load(f) as data:
        return {key: data[key] for key in data.files}


# ----------------------------------------------------------------------------
# mfeat
# ----------------------------------------------------------------------------


def test_mfeat_vendored_file(raw_mfeat):
    assert set(raw_mfeat) == {*MFEAT_VIEWS, "label"}
    for name, width in MFEAT_WIDTHS.items():
        assert raw_mfeat[name].shape == (2000, width)
    np.testing.assert_array_equal(np.bincount(raw_mfeat["label"]), [200] * 10)
    assert mfeat_module.__doc__ is not None
    assert "CC BY 4.0" in mfeat_module.__doc__
    assert "Duin" in mfeat_module.__doc__


def test_mfeat_shapes_dtypes_and_order():
    (x_train, y_train), (x_test, y_test) = load_mfeat()
    assert MFEAT_VIEWS == ("pix", "fou", "fac", "kar", "zer", "mor")
    assert tuple(x_train) == MFEAT_VIEWS and tuple(x_test) == MFEAT_VIEWS
    for name, width in MFEAT_WIDTHS.items():
        assert x_train[name].shape == (1000, width)
        assert x_test[name].shape == (1000, width)
        assert x_train[name].dtype == np.float32
        assert np.all(np.isfinite(x_train[name])) and np.all(np.isfinite(x_test[name]))
    assert y_train.dtype == np.int32 and y_test.dtype == np.int32
    # Shuffled, not ordered by class as in the file.
    assert np.any(np.diff(y_train) < 0)

    (x_sub, _), _ = load_mfeat(views=["mor", "pix"])
    assert list(x_sub) == ["mor", "pix"]


@pytest.mark.parametrize("test_size", [0.25, 0.5, 0.9])
def test_mfeat_split_is_stratified(test_size):
    (_, y_train), (_, y_test) = load_mfeat(views=["mor"], test_size=test_size)
    n_test = round(200 * test_size)
    np.testing.assert_array_equal(np.bincount(y_test, minlength=10), [n_test] * 10)
    np.testing.assert_array_equal(
        np.bincount(y_train, minlength=10), [200 - n_test] * 10
    )


def test_mfeat_split_indices_partition_each_class(raw_mfeat):
    labels = raw_mfeat["label"]
    train, test = mfeat_module.stratified_split(labels, 0.3, np.random.default_rng(3))
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(
        np.sort(np.concatenate([train, test])), np.arange(2000)
    )
    np.testing.assert_array_equal(np.bincount(labels[test]), [60] * 10)


def test_mfeat_standardised_with_training_statistics_only(raw_mfeat):
    seed, test_size = 7, 0.4
    (x_train, y_train), (x_test, y_test) = load_mfeat(test_size=test_size, seed=seed)
    train_idx, test_idx = mfeat_module.stratified_split(
        raw_mfeat["label"], test_size, np.random.default_rng(seed)
    )
    np.testing.assert_array_equal(y_train, raw_mfeat["label"][train_idx])
    np.testing.assert_array_equal(y_test, raw_mfeat["label"][test_idx])
    for name in MFEAT_VIEWS:
        raw_train = raw_mfeat[name][train_idx].astype(np.float64)
        raw_test = raw_mfeat[name][test_idx].astype(np.float64)
        mean, std = raw_train.mean(0), raw_train.std(0)
        # Training columns: mean 0, std 1.
        np.testing.assert_allclose(x_train[name].mean(0), 0.0, atol=1e-4)
        np.testing.assert_allclose(x_train[name].std(0), 1.0, atol=1e-4)
        # Test columns were transformed with the TRAINING mean and std ...
        np.testing.assert_allclose(
            x_test[name], (raw_test - mean) / std, rtol=1e-4, atol=1e-4
        )
        # ... so they are not themselves exactly centred (test stats unused).
        assert np.abs(x_test[name].mean(0)).max() > 1e-2


def test_mfeat_constant_column_gives_finite_values():
    train = np.array([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]], np.float32)
    test = np.array([[2.0, 7.0]], np.float32)
    train_std, test_std = mfeat_module._standardize(train, test)
    assert np.all(np.isfinite(train_std)) and np.all(np.isfinite(test_std))
    np.testing.assert_allclose(train_std[:, 1], 0.0)
    np.testing.assert_allclose(test_std[0], [(2 - 3) / np.std([1, 3, 5]), 2.0])


def test_mfeat_seed_reproducible_and_different():
    (a, ya), _ = load_mfeat(views=["mor"], seed=1)
    (b, yb), _ = load_mfeat(views=["mor"], seed=1)
    (c, yc), _ = load_mfeat(views=["mor"], seed=2)
    np.testing.assert_array_equal(a["mor"], b["mor"])
    np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a["mor"], c["mor"])
    assert not np.array_equal(ya, yc)


def test_mfeat_pix_as_image_matches_flat_layout(raw_mfeat):
    (flat, _), (flat_test, _) = load_mfeat(views=["pix"], seed=4)
    (img, y), (img_test, _) = load_mfeat(views=["pix"], seed=4, pix_as_image=True)
    assert img["pix"].shape == (1000, 16, 15, 1)
    assert img_test["pix"].dtype == np.float32
    np.testing.assert_array_equal(img["pix"].reshape(1000, 240), flat["pix"])
    np.testing.assert_array_equal(img_test["pix"].reshape(1000, 240), flat_test["pix"])
    # Row-major 16x15 layout: pixel (r, c) is flat feature 15 * r + c.
    np.testing.assert_array_equal(img["pix"][:, 3, 7, 0], flat["pix"][:, 15 * 3 + 7])
    # A "1" is taller than it is wide: its ink spans more rows than columns.
    raw_one = raw_mfeat["pix"][raw_mfeat["label"] == 1].reshape(-1, 16, 15)
    ink = raw_one.mean(0) > 3
    assert np.any(ink, 1).sum() > np.any(ink, 0).sum()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"views": ["pix", "pixels"]}, r"Unknown view.*'pixels'.*valid views.*'fou'"),
        ({"views": []}, r"at least one view.*valid views"),
        ({"views": ["mor", "mor"]}, r"duplicates"),
        ({"test_size": 0.0}, r"`test_size` must be in \(0, 1\)"),
        ({"test_size": 1.0}, r"`test_size` must be in \(0, 1\)"),
        ({"test_size": -0.2}, r"`test_size` must be in \(0, 1\)"),
        ({"test_size": "half"}, r"`test_size` must be a number"),
    ],
)
def test_mfeat_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_mfeat(**kwargs)


# ----------------------------------------------------------------------------
# make_multimodal
# ----------------------------------------------------------------------------


def _within_class_style(info, y):
    """Latents minus their class mean: the (n, M, k) within-class component."""
    return info["latents"].astype(np.float64) - info["class_means"][y]


def _modality_correlation(style):
    """Empirical (M, M) correlation of modalities, pooled over samples and dims."""
    n, m, k = style.shape
    return np.corrcoef(style.transpose(1, 0, 2).reshape(m, n * k))


def test_synthetic_shapes_dtypes_balance_and_determinism():
    x, y, info = make_multimodal(
        n_samples=203, n_classes=7, n_modalities=3, widths=[5, 9, 2], seed=3
    )
    assert list(x) == ["m0", "m1", "m2"] == info["modality_names"]
    assert [v.shape for v in x.values()] == [(203, 5), (203, 9), (203, 2)]
    assert all(v.dtype == np.float32 for v in x.values())
    assert y.dtype == np.int32 and y.shape == (203,)
    counts = np.bincount(y, minlength=7)
    assert counts.max() - counts.min() <= 1
    assert info["latents"].shape == (203, 3, 8)
    assert [p.shape for p in info["projections"]] == [(8, 5), (8, 9), (8, 2)]

    x2, y2, _ = make_multimodal(
        n_samples=203, n_classes=7, n_modalities=3, widths=[5, 9, 2], seed=3
    )
    x3, _, _ = make_multimodal(
        n_samples=203, n_classes=7, n_modalities=3, widths=[5, 9, 2], seed=4
    )
    np.testing.assert_array_equal(y, y2)
    for name in x:
        np.testing.assert_array_equal(x[name], x2[name])
    assert not np.array_equal(x["m0"], x3["m0"])


def test_synthetic_observations_follow_documented_model():
    x, y, info = make_multimodal(n_samples=300, widths=12, noise=0.0, seed=1)
    for m, name in enumerate(info["modality_names"]):
        expected = info["latents"][:, m].astype(np.float64) @ info["projections"][m]
        np.testing.assert_allclose(x[name], expected / np.sqrt(8), rtol=1e-4, atol=1e-4)
    # Per-modality noise: the residual std equals the requested noise.
    x, _, info = make_multimodal(n_samples=2000, noise=[0.0, 0.5, 2.0], seed=2)
    for m, sigma in enumerate([0.0, 0.5, 2.0]):
        clean = info["latents"][:, m] @ info["projections"][m] / np.sqrt(8)
        assert abs(np.std(x[f"m{m}"] - clean) - sigma) < 0.05 * sigma + 1e-3


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_synthetic_scalar_correlation_matches_ground_truth(rho):
    _, y, info = make_multimodal(n_samples=4000, correlation=rho, seed=0)
    expected = np.full((3, 3), rho) + (1 - rho) * np.eye(3)
    np.testing.assert_allclose(info["correlation"], expected)
    style = _within_class_style(info, y)
    np.testing.assert_allclose(_modality_correlation(style), expected, atol=0.04)
    # Documented expected within-class Gram matrix: E[w_m . w_n] = k * C.
    gram = np.einsum("imk,ink->mn", style, style) / len(y)
    np.testing.assert_allclose(gram / 8, expected, atol=0.06)


def test_synthetic_matrix_correlation_matches_ground_truth():
    c = np.array([[1.0, 0.8, -0.3], [0.8, 1.0, 0.0], [-0.3, 0.0, 1.0]])
    _, y, info = make_multimodal(n_samples=4000, correlation=c, seed=5)
    np.testing.assert_array_equal(info["correlation"], c)
    np.testing.assert_allclose(
        _modality_correlation(_within_class_style(info, y)), c, atol=0.04
    )


def test_synthetic_higher_correlation_gives_more_similar_observed_modalities():
    """Measured on the observed features only, with latents recovered by pinv."""
    similarities = []
    for rho in (0.0, 0.5, 0.9):
        x, y, info = make_multimodal(
            n_samples=3000, widths=[16, 24, 12], correlation=rho, noise=0.3, seed=9
        )
        recovered = np.stack(
            [
                x[f"m{m}"] @ np.linalg.pinv(info["projections"][m] / np.sqrt(8))
                for m in range(3)
            ],
            axis=1,
        )
        for c in range(10):
            recovered[y == c] -= recovered[y == c].mean(0)
        corr = _modality_correlation(recovered)
        similarities.append(corr[np.triu_indices(3, 1)].mean())
    assert abs(similarities[0]) < 0.05
    assert similarities[1] > similarities[0] + 0.3
    assert similarities[2] > similarities[1] + 0.25


def _nearest_centroid_accuracy(x, y, n_classes):
    features = np.concatenate(list(x.values()), axis=1)
    half = len(y) // 2
    train, test = features[:half], features[half:]
    centroids = np.stack([train[y[:half] == c].mean(0) for c in range(n_classes)])
    pred = ((test[:, None] - centroids) ** 2).sum(-1).argmin(1)
    return (pred == y[half:]).mean()


def test_synthetic_classes_are_learnable_and_class_sep_controls_it():
    x, y, _ = make_multimodal(n_samples=2000, seed=0)
    assert _nearest_centroid_accuracy(x, y, 10) > 0.8  # chance is 0.1
    x, y, _ = make_multimodal(n_samples=2000, seed=0, class_sep=0.0)
    assert _nearest_centroid_accuracy(x, y, 10) < 0.2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"correlation": 1.5}, r"scalar `correlation` must be in \[0, 1\]"),
        ({"correlation": -0.1}, r"scalar `correlation` must be in \[0, 1\]"),
        ({"correlation": np.eye(2)}, r"shape \(3, 3\).*got shape \(2, 2\)"),
        ({"correlation": [[1, 0.9, 0], [0.9, 1, 0.9], [0, 0.9, 1]]}, r"semi-definite"),
        ({"correlation": [[1, 0.5, 0], [0.2, 1, 0], [0, 0, 1]]}, r"symmetric"),
        ({"correlation": 2 * np.eye(3)}, r"ones on its diagonal"),
        ({"noise": [0.1, 0.2]}, r"`noise`.*length n_modalities=3"),
        ({"noise": -1.0}, r"`noise` values must be a finite number >= 0"),
        ({"widths": [4, 0, 4]}, r"`widths` must be an integer >= 1"),
        ({"widths": 2.5}, r"`widths` must be an integer"),
        ({"n_samples": 5}, r"`n_samples` must be an integer >= 10"),
        ({"n_classes": 1}, r"`n_classes` must be an integer >= 2"),
        ({"n_modalities": 0}, r"`n_modalities` must be an integer >= 1"),
        ({"class_sep": -1.0}, r"`class_sep` must be a finite number >= 0"),
    ],
)
def test_synthetic_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_multimodal(**kwargs)


# ----------------------------------------------------------------------------
# AV-MNIST (offline, with tfds.testing.mock_data)
# ----------------------------------------------------------------------------

_STEP = 128  # default frame_step
_N_TRAIN_IMAGES = 50


def _audio_length(digit, is_test_recording):
    # Ends mid-frame, so the number of non-silent frames encodes digit and split:
    # frames with 128 * t < length are non-silent, i.e. 2 * digit + 4 (+ 22).
    return _STEP * (2 * digit + 3 + (0 if is_test_recording else 22)) + 64


def _decode_audio(spec):
    """(digit, is_test_recording) from a spectrogram made of `_audio_length` clips."""
    silent = np.log(1e-6) + 1.0
    n_loud = int((spec[..., 0].max(axis=1) > silent).sum())
    is_test = n_loud < 26
    return (n_loud - 4) // 2 if is_test else (n_loud - 26) // 2, is_test


def _mock_as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    import tensorflow as tf

    del decoders, read_config, kwargs
    rng = np.random.default_rng(0)
    if self.name == "mnist":
        offset = 15 if "test" in str(split) else 5
        labels = rng.permutation(np.arange(_N_TRAIN_IMAGES) % 10)
        images = [np.full((28, 28, 1), 25 * d + offset, np.uint8) for d in labels]
        return tf.data.Dataset.from_tensor_slices(
            {"image": np.stack(images), "label": labels.astype(np.int64)}
        )
    assert self.name == "spoken_digit"
    examples = []
    for digit in range(10):
        for speaker in ("jackson", "theo_x"):
            for index in (0, 3, 5, 6, 48):
                length = _audio_length(digit, index < 5)
                examples.append(
                    {
                        "audio": rng.integers(-9000, 9000, length, dtype=np.int64),
                        "audio/filename": f"{digit}_{speaker}_{index}.wav",
                        "label": np.int64(digit),
                    }
                )
    order = rng.permutation(len(examples))

    def gen():
        for i in order:
            yield examples[i]

    return tf.data.Dataset.from_generator(
        gen,
        output_signature={
            "audio": tf.TensorSpec((None,), tf.int64),
            "audio/filename": tf.TensorSpec((), tf.string),
            "label": tf.TensorSpec((), tf.int64),
        },
    )


@pytest.fixture
def mock_tfds(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(as_dataset_fn=_mock_as_dataset):
        yield str(tmp_path)


@pytest.mark.parametrize("split", ["train", "test"])
def test_av_mnist_pairs_match_labels_shapes_and_split(mock_tfds, split):
    import tensorflow as tf

    ds = load_av_mnist(split, data_dir=mock_tfds, seed=0)
    spec = ds.element_spec
    assert spec[0]["image"].shape == (28, 28, 1)
    assert spec[0]["image"].dtype == tf.float32
    assert spec[0]["audio"].shape == (61, 40, 1)
    assert spec[0]["audio"].dtype == tf.float32
    assert spec[1].dtype == tf.int32

    items = list(ds.as_numpy_iterator())
    assert len(items) == _N_TRAIN_IMAGES
    image_offset = 15 if split == "test" else 5
    for x, label in items:
        assert x["image"].shape == (28, 28, 1) and x["audio"].shape == (61, 40, 1)
        assert np.all(np.isfinite(x["image"])) and np.all(np.isfinite(x["audio"]))
        assert x["image"].min() >= 0.0 and x["image"].max() <= 1.0
        pixel = int(round(x["image"][0, 0, 0] * 255))
        assert pixel % 25 == image_offset  # the mnist split asked for
        image_label = pixel // 25
        audio_label, is_test_recording = _decode_audio(x["audio"])
        assert image_label == audio_label == label
        # FSDD split: recordings 0-4 are test audio, 5+ train audio.
        assert is_test_recording == (split == "test")


def test_av_mnist_pairing_is_deterministic_given_seed(mock_tfds):
    def audio(seed):
        ds = load_av_mnist("train", data_dir=mock_tfds, seed=seed)
        return np.stack([x["audio"] for x, _ in ds.as_numpy_iterator()])

    first = audio(0)
    np.testing.assert_array_equal(first, audio(0))
    assert not np.array_equal(first, audio(1))


def test_av_mnist_custom_spectrogram_shape(mock_tfds):
    ds = load_av_mnist(
        "test", data_dir=mock_tfds, n_mels=16, frame_length=512, frame_step=256
    )
    x, _ = next(iter(ds))
    assert tuple(x["audio"].shape) == (1 + (8000 - 512) // 256, 16, 1)


def test_av_mnist_unparseable_audio_file_name_fails_clearly(tmp_path):
    tf = pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")

    def renamed(self, split, **kwargs):
        ds = _mock_as_dataset(self, split, **kwargs)
        if self.name == "spoken_digit":
            ds = ds.map(lambda ex: {**ex, "audio/filename": tf.constant("clip.wav")})
        return ds

    with tfds.testing.mock_data(as_dataset_fn=renamed):
        ds = load_av_mnist("train", data_dir=str(tmp_path))
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"clip\.wav"):
            next(iter(ds))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "validation"}, r"Unknown `split` 'validation'.*'train', 'test'"),
        ({"n_mels": 0}, r"`n_mels` must be a positive integer"),
        ({"frame_length": 9000}, r"`frame_length` \(9000\) must be <= `audio_length`"),
        ({"seed": 1.5}, r"`seed` must be an integer"),
    ],
)
def test_av_mnist_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_av_mnist(**kwargs)


def test_av_mnist_missing_tfds_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r'pip install "keras-gramkd\[data\]"'):
        load_av_mnist("train")


# ----------------------------------------------------------------------------
# Import hygiene
# ----------------------------------------------------------------------------


@pytest.mark.slow  # a fresh Python process
def test_import_does_not_pull_frameworks_or_optional_deps():
    """`import keras_gramkd.datasets` / `.plots` add no TF, TFDS, JAX, torch or mpl."""
    code = (
        "import sys, keras\n"
        "before = set(sys.modules)\n"
        "import keras_gramkd.datasets, keras_gramkd.plots\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(new & {'tensorflow', 'tensorflow_datasets', 'jax', 'torch',"
        " 'matplotlib'}))\n"
    )
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"
