"""The bad-input catalogue of docs/guide/bad-input.md: one test per row.

Rows covered elsewhere: a missing input key
(test_distiller::test_missing_input_key_fails_at_first_batch), a teacher with a
different class count (test_distiller::test_different_class_counts) and zero-norm
embeddings (test_distiller::test_zero_norm_embeddings_train_without_nan,
test_ops::test_zero_vector_gives_zero_row_not_nan).
"""

import keras
import numpy as np
import pytest
from helpers import (
    make_data,
    make_net,
    modality_map,
    net_outputs,
    np_gram,
    sparse_ce,
    to_np,
)

from keras_gramkd import Distiller, ModalityGram


def build(teacher=None, student=None, modalities="abc", **kwargs):
    distiller = Distiller(
        teacher or make_net("t", 16),
        student or make_net("s", 4, modalities=modalities),
        modality_map("t", modalities),
        modality_map("s", modalities),
        **kwargs,
    )
    distiller.compile(optimizer="adam", loss=sparse_ce())
    return distiller


def weights_finite(model):
    return all(np.all(np.isfinite(to_np(w))) for w in model.weights)


def with_nan_and_inf(x):
    x = {k: v.copy() for k, v in x.items()}
    x["a"][3, 1] = np.nan
    x["c"][5, 0] = np.inf
    return x


def test_nan_or_inf_inputs_stop_fit_after_the_step_with_intact_weights():
    x, y = make_data(n=16)
    distiller = build()
    with pytest.raises(ValueError, match=r"2 training sample\(s\).*NaN or inf"):
        distiller.fit(with_nan_and_inf(x), y, batch_size=16, verbose=0)
    assert weights_finite(distiller.student)


def test_nan_or_inf_inputs_are_skipped_and_counted_when_asked():
    x, y = make_data(n=16)
    distiller = build(on_bad_sample="skip")
    bad = with_nan_and_inf(x)
    history = distiller.fit(bad, y, batch_size=8, epochs=2, verbose=0).history
    assert history["skipped_samples"] == [2.0, 2.0]
    assert np.all(np.isfinite(history["loss"]))
    assert weights_finite(distiller.student)
    logs = distiller.evaluate(bad, y, batch_size=16, return_dict=True, verbose=0)
    assert logs["skipped_samples"] == 2.0
    assert all(np.isfinite(v) for v in logs.values())


def test_non_numeric_input_names_the_key():
    x, y = make_data(n=8)
    with pytest.raises(ValueError, match=r"Input 'b' has dtype <U1.*as numbers"):
        build().fit({**x, "b": np.full((8, 6), "x")}, y, verbose=0)


def test_integer_inputs_are_cast_and_train():
    x, y = make_data(n=8)
    x["a"] = np.round(x["a"]).astype("int32")
    history = build().fit(x, y, verbose=0).history
    assert np.isfinite(history["loss"][0])


def test_wrong_feature_width_names_the_key_and_shapes():
    x, y = make_data(n=8)
    x["a"] = np.ones((8, 7), "float32")
    with pytest.raises(ValueError, match=r"Input 'a' of the student has shape.*7"):
        build().fit(x, y, verbose=0)


@pytest.mark.parametrize("label", [3, -1])
def test_labels_out_of_range_fail_on_every_backend(label):
    x, y = make_data(n=16)
    y[[2, 9]] = label
    with pytest.raises(ValueError, match=r"2 training sample\(s\).*\[0, classes\)"):
        build().fit(x, y, batch_size=16, verbose=0)
    skipping = build(on_bad_sample="skip")
    history = skipping.fit(x, y, batch_size=16, verbose=0).history
    assert history["skipped_samples"] == [2.0]
    assert np.isfinite(history["task_loss"][0])


def test_empty_arrays_and_empty_dataset():
    x, y = make_data(n=8)
    with pytest.raises(ValueError, match="Input 'a' has no samples"):
        build().fit({k: v[:0] for k, v in x.items()}, y[:0], verbose=0)
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((x, y))
    known = data.take(0).batch(4)  # cardinality 0
    unknown = data.filter(lambda features, label: False).batch(4)
    for empty in (known, unknown):
        with pytest.raises(ValueError, match="yielded no batch: the data set is"):
            build().fit(empty, verbose=0)


def test_one_modality_warns_that_the_gram_is_trivial():
    with pytest.warns(UserWarning, match="Only one modality.*1×1"):
        build(modalities="a")


def test_two_modalities_under_the_centered_gram_warn_it_is_constant():
    with pytest.warns(UserWarning, match=r"always \[\[1, -1\], \[-1, 1\]\]"):
        build(modalities="ab", gram_loss=ModalityGram("centered"))


def stacked_net(prefix, width, m=64, d_in=5):
    tokens = keras.Input((m, d_in), name="tokens")
    embeds = keras.layers.Dense(width, activation="tanh", name=f"{prefix}_embed")(
        tokens
    )
    logits = keras.layers.Dense(3)(keras.layers.Flatten()(embeds))
    return keras.Model(tokens, logits)


def test_64_modalities_match_the_numpy_gram_loss():
    rng = np.random.default_rng(0)
    x = {"tokens": rng.normal(size=(16, 64, 5)).astype("float32")}
    y = rng.integers(0, 3, 16).astype("int32")
    distiller = Distiller(
        stacked_net("t", 16), stacked_net("s", 4), "t_embed", "s_embed"
    )
    distiller.compile(optimizer="adam", loss=sparse_ce())
    logs = distiller.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)

    def embeds(model, layer):
        view = keras.Model(model.input, model.get_layer(layer).output)
        return to_np(view(x["tokens"]))

    t, s = embeds(distiller.teacher, "t_embed"), embeds(distiller.student, "s_embed")
    expected = np.mean((np_gram(t, "l2") - np_gram(s, "l2")) ** 2)
    assert logs["gram_loss"] == pytest.approx(expected, rel=1e-4)
    history = distiller.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(history["gram_loss"][0])


def test_batch_of_one_trains_and_matches_numpy():
    x, y = make_data(n=5)
    distiller = build()
    history = distiller.fit(x, y, batch_size=1, epochs=1, verbose=0).history
    assert np.all(np.isfinite(history["loss"]))
    one = {k: v[:1] for k, v in x.items()}
    logs = distiller.evaluate(one, y[:1], batch_size=1, return_dict=True, verbose=0)
    _, t_feats = net_outputs(distiller.teacher, "t", one)
    _, s_feats = net_outputs(distiller.student, "s", one)
    expected = np.mean((np_gram(t_feats, "l2") - np_gram(s_feats, "l2")) ** 2)
    assert logs["gram_loss"] == pytest.approx(expected, rel=1e-4)
