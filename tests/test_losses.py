"""LogitKD and ModalityGram: references, keras.distillation agreement, config."""

import keras
import numpy as np
import pytest
from helpers import np_gram, np_logit_kd, to_np

from keras_gramkd.losses import LogitKD, ModalityGram


def logits(seed, scale=3.0, shape=(32, 10)):
    return np.random.default_rng(seed).normal(scale=scale, size=shape).astype("float32")


@pytest.mark.parametrize("temperature", [1.0, 3.0, 4.0, 10.0])
def test_logit_kd_agrees_with_keras_logits_distillation(temperature):
    t, s = logits(0), logits(1)
    reference = keras.distillation.LogitsDistillation(
        temperature=temperature, loss=keras.losses.KLDivergence()
    ).compute_loss(t, s)
    ours = LogitKD(temperature)(t, s)
    assert float(to_np(ours)) == pytest.approx(float(to_np(reference)), rel=1e-4)
    assert float(to_np(ours)) == pytest.approx(
        np_logit_kd(t, s, temperature).mean(), rel=1e-4
    )


def test_keras_default_kl_string_is_a_different_quantity():
    """keras' default loss="kl_divergence" skips the softmax and the T² factor."""
    t, s, temperature = logits(2), logits(3), 4.0
    trap = float(
        to_np(
            keras.distillation.LogitsDistillation(temperature=temperature).compute_loss(
                t, s
            )
        )
    )
    ours = float(to_np(LogitKD(temperature)(t, s)))
    # What the string version computes: KL on raw scaled logits, no T².
    raw = float(to_np(keras.ops.mean(keras.losses.kl_divergence(t / 4.0, s / 4.0))))
    assert trap == pytest.approx(raw, rel=1e-5)
    assert abs(trap - ours) > 0.1 * abs(ours)


def test_logit_kd_sample_weight_and_reduction():
    t, s = logits(4, shape=(4, 5)), logits(5, shape=(4, 5))
    per_sample = np_logit_kd(t, s, 2.0)
    sw = np.array([1.0, 0.0, 2.0, 1.0], "float32")
    got = float(to_np(LogitKD(2.0)(t, s, sample_weight=sw)))
    assert got == pytest.approx((per_sample * sw).sum() / 4, rel=1e-5)
    none = to_np(LogitKD(2.0, reduction="none")(t, s))
    np.testing.assert_allclose(none, per_sample, rtol=1e-5)


def test_logit_kd_returns_float32_for_float16_inputs():
    t = keras.ops.cast(logits(6), "float16")
    s = keras.ops.cast(logits(7), "float16")
    value = LogitKD(4.0)(t, s)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    assert np.isfinite(float(to_np(value)))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "4", True])
def test_logit_kd_rejects_bad_temperature(bad):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        LogitKD(bad)


@pytest.mark.parametrize(
    "loss",
    [
        LogitKD(2.5, name="kd"),
        ModalityGram("centered"),
        ModalityGram("dim", entries="off_diagonal", target="batch_mean"),
    ],
)
def test_losses_serialise(loss):
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()
    t = np.random.default_rng(0).normal(size=(3, 4, 5)).astype("float32")
    s = np.random.default_rng(1).normal(size=(3, 4, 5)).astype("float32")
    if isinstance(loss, LogitKD):
        t, s = t[:, 0], s[:, 0]
    assert float(to_np(restored(t, s))) == pytest.approx(float(to_np(loss(t, s))))


def test_modality_gram_matches_numpy_and_allows_different_widths():
    rng = np.random.default_rng(8)
    t = rng.normal(size=(5, 3, 32)).astype("float32")
    s = rng.normal(size=(5, 3, 4)).astype("float32")
    for normalize in ("l2", "none", "dim", "centered"):
        expected = np.mean((np_gram(t, normalize) - np_gram(s, normalize)) ** 2)
        got = float(to_np(ModalityGram(normalize)(t, s)))
        assert got == pytest.approx(expected, rel=1e-5)


def test_modality_gram_mask_means_over_present_pairs():
    rng = np.random.default_rng(9)
    t = rng.normal(size=(3, 3, 6)).astype("float32")
    s = rng.normal(size=(3, 3, 2)).astype("float32")
    mask = np.array([[1, 1, 0], [0, 0, 0], [1, 1, 1]], "float32")
    sq = (np_gram(t, "l2", mask) - np_gram(s, "l2", mask)) ** 2
    pairs = mask[:, :, None] * mask[:, None, :]
    got = float(to_np(ModalityGram()(t, s, mask=mask)))
    assert got == pytest.approx(sq.sum() / pairs.sum(), rel=1e-5)
    assert got != pytest.approx(sq.mean(), rel=1e-3)  # not diluted by missing pairs


def test_modality_gram_rejects_unknown_normalisation():
    with pytest.raises(ValueError, match="Unknown Gram normalisation 'cos'"):
        ModalityGram("cos")
