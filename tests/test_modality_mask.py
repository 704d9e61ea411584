"""Missing modalities: the batch's modality_mask and ModalityDropout's mask."""

import keras
import numpy as np
import pytest
from helpers import (
    WIDTHS,
    make_data,
    make_net,
    modality_map,
    net_outputs,
    np_gram,
    sparse_ce,
    to_np,
)

from keras_gramkd import Distiller, ModalityDropout, ModalityGram


def build(student=None, **kwargs):
    distiller = Distiller(
        make_net("t", 16),
        student or make_net("s", 4),
        modality_map("t"),
        modality_map("s"),
        **kwargs,
    )
    distiller.compile(optimizer="adam", loss=sparse_ce())
    return distiller


def np_masked_gram_loss(t_feats, s_feats, mask, normalize="l2"):
    pairs = mask[:, :, None] * mask[:, None, :]
    diff = (np_gram(t_feats, normalize, mask) - np_gram(s_feats, normalize, mask)) ** 2
    return (diff * pairs).sum() / max(pairs.sum(), 1.0)


def evaluate(distiller, x, y):
    return distiller.evaluate(x, y, batch_size=len(y), return_dict=True, verbose=0)


@pytest.mark.parametrize("normalize", ["l2", "centered", "none"])
def test_gram_averages_present_pairs_and_kd_task_are_unaffected(normalize):
    x, y = make_data(n=16)
    mask = np.random.default_rng(1).integers(0, 2, size=(16, 3)).astype("float32")
    mask[0] = 0.0  # a sample with every modality missing
    distiller = build(gram_loss=ModalityGram(normalize))
    plain = evaluate(distiller, x, y)
    masked = evaluate(distiller, {**x, "modality_mask": mask}, y)
    _, t_feats = net_outputs(distiller.teacher, "t", x)
    _, s_feats = net_outputs(distiller.student, "s", x)
    expected = np_masked_gram_loss(t_feats, s_feats, mask, normalize)
    assert masked["gram_loss"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert masked["gram_loss"] != pytest.approx(plain["gram_loss"], rel=1e-3)
    for key in ("task_loss", "kd_loss"):
        assert masked[key] == pytest.approx(plain[key], rel=1e-6)


def test_samples_without_modalities_add_nothing_and_no_nan():
    x, y = make_data(n=16)
    distiller = build()
    mask = np.ones((16, 3), "float32")
    mask[:8] = 0.0
    half = evaluate(distiller, {**x, "modality_mask": mask}, y)
    second = {k: v[8:] for k, v in x.items()}
    assert half["gram_loss"] == pytest.approx(
        evaluate(distiller, second, y[8:])["gram_loss"], rel=1e-5
    )
    empty = {**x, "modality_mask": np.zeros((16, 3), "float32")}
    assert evaluate(distiller, empty, y)["gram_loss"] == 0.0
    history = distiller.fit(empty, y, batch_size=8, verbose=0).history
    assert np.isfinite(history["loss"][0])
    assert all(np.all(np.isfinite(to_np(w))) for w in distiller.student.weights)


def test_mask_with_the_wrong_number_of_modalities_names_the_order():
    x, y = make_data(n=8)
    with pytest.raises(ValueError, match=r"'modality_mask'.*\(batch, 3\).*'a', 'b'"):
        build().fit({**x, "modality_mask": np.ones((8, 2), "float32")}, y, verbose=0)


def dropout_student(rate=0.5, return_mask=True):
    inputs = {m: keras.Input((WIDTHS[m],), name=m) for m in "abc"}
    views = ModalityDropout(rate, seed=3, return_mask=return_mask, name="drop")(
        [inputs[m] for m in "abc"]
    )
    if return_mask:
        views, _ = views
    embeds = [
        keras.layers.Dense(4, activation="tanh", name=f"s_{m}")(v)
        for m, v in zip("abc", views, strict=True)
    ]
    logits = keras.layers.Dense(3)(keras.layers.Concatenate()(embeds))
    return keras.Model(inputs, logits)


@pytest.mark.slow  # fast tier: under 3 min per backend
def test_modality_dropout_mask_reaches_the_gram_loss():
    x, y = make_data(n=32)
    distiller = build(dropout_student(), student_mask_layer="drop")
    student, drop = distiller.student, distiller.student.get_layer("drop")
    # The embeddings and the mask of the Distiller's own call, drawn again
    # from the same state of the layer's seed generator.
    drop_mask = keras.tree.flatten(drop.output)[-1]  # (views..., mask)
    probe = keras.Model(
        student.inputs,
        [*(student.get_layer(f"s_{m}").output for m in "abc"), drop_mask],
    )
    state = to_np(drop.seed_generator.state)
    logits = distiller(x, training=True)
    distiller.compute_loss(x, y, logits, training=True)  # no second student call
    drop.seed_generator.state.assign(state)
    *embeds, mask = probe(x, training=True)
    features = np.stack([to_np(e) for e in embeds], axis=1)
    mask = to_np(mask)
    assert 0 < mask.sum() < mask.size  # some modalities were dropped
    _, t_feats = net_outputs(distiller.teacher, "t", x)
    expected = np_masked_gram_loss(t_feats, features, mask)
    got = float(to_np(distiller.get_metrics_result()["gram_loss"]))
    assert got == pytest.approx(expected, rel=1e-4)
    # At inference the mask is all ones: the plain Gram loss.
    plain = evaluate(distiller, x, y)["gram_loss"]
    _, s_feats = net_outputs(distiller.student, "s", x)
    full = np.ones((32, 3), "float32")
    assert plain == pytest.approx(np_masked_gram_loss(t_feats, s_feats, full), 1e-4)
    history = distiller.fit(x, y, batch_size=8, epochs=2, verbose=0).history
    assert np.all(np.isfinite(history["gram_loss"]))


def test_student_mask_layer_errors():
    with pytest.raises(ValueError, match="without return_mask=True"):
        build(dropout_student(return_mask=False), student_mask_layer="drop")
    with pytest.raises(ValueError, match=r"must output a \(batch, 3\) modality mask"):
        build(student_mask_layer="s_a")
    with pytest.raises(ValueError, match="no layer named 'dropp'"):
        build(dropout_student(), student_mask_layer="dropp")


def test_student_mask_layer_round_trips_through_config():
    distiller = build(dropout_student(), student_mask_layer="drop")
    config = distiller.get_config()
    assert config["student_mask_layer"] == "drop"
    restored = Distiller.from_config(config)
    assert restored.student_mask_layer == "drop"
    assert restored.modality_names == ["a", "b", "c"]
