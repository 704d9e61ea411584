"""ModalityStack: stacking, pooling, ordering, errors, serialisation."""

import keras
import numpy as np
import pytest
from helpers import to_np

from keras_gramkd.layers import ModalityDropout, ModalityStack


def test_stacks_list_in_order_and_pools_middle_axes():
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(2, 8)).astype("float32")
    seq = rng.normal(size=(2, 5, 8)).astype("float32")
    img = rng.normal(size=(2, 3, 4, 8)).astype("float32")
    got = to_np(ModalityStack()([vec, seq, img]))
    assert got.shape == (2, 3, 8)
    np.testing.assert_allclose(got[:, 0], vec, rtol=1e-6)
    np.testing.assert_allclose(got[:, 1], seq.mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:, 2], img.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_dict_order_follows_names_else_sorted_keys():
    x = {"z": np.zeros((1, 2), "float32"), "a": np.ones((1, 2), "float32")}
    np.testing.assert_array_equal(to_np(ModalityStack()(x))[0, :, 0], [1.0, 0.0])
    ordered = ModalityStack(names=["z", "a"])(x)
    np.testing.assert_array_equal(to_np(ordered)[0, :, 0], [0.0, 1.0])


def test_different_widths_raise_with_projection_hint():
    with pytest.raises(ValueError, match=r"widths differ \(\[4, 6\]\).*projection"):
        ModalityStack()([np.ones((1, 4), "float32"), np.ones((1, 6), "float32")])
    with pytest.raises(ValueError, match="widths differ"):
        ModalityStack()([keras.Input((4,)), keras.Input((6,))])


def test_missing_named_modality_and_bad_rank():
    with pytest.raises(ValueError, match=r"no input for modalities \['b'\]"):
        ModalityStack(names=["a", "b"])({"a": np.ones((1, 2), "float32")})
    with pytest.raises(ValueError, match=r"\(batch, d\) or \(batch, \.\.\., d\)"):
        ModalityStack()([np.ones((3,), "float32")])


def test_functional_shape_and_config_round_trip():
    a, b = keras.Input((5, 7)), keras.Input((7,))
    out = ModalityStack(names=None, name="stack")([a, b])
    assert tuple(out.shape) == (None, 2, 7)
    layer = ModalityStack(names=["x", "y"], name="s")
    clone = ModalityStack.from_config(layer.get_config())
    assert clone.names == ["x", "y"] and clone.name == "s"


def test_modality_dropout_zeroes_whole_modalities_at_training_only():
    layer = ModalityDropout(0.5, seed=1)
    xs = [np.ones((64, 3), "float32"), np.ones((64, 5), "float32")]
    assert all(np.all(keras.ops.convert_to_numpy(o) == 1) for o in layer(xs))
    outs = [keras.ops.convert_to_numpy(o) for o in layer(xs, training=True)]
    for o in outs:
        row_sums = o.sum(axis=1)
        assert set(np.unique(row_sums)) <= {0.0, float(o.shape[1])}
        assert 0 < np.count_nonzero(row_sums == 0) < 64


def test_modality_dropout_config_and_rate_errors():
    layer = ModalityDropout(0.25, seed=3, return_mask=True, name="md")
    clone = ModalityDropout.from_config(layer.get_config())
    assert (clone.rate, clone.seed, clone.return_mask, clone.name) == (
        0.25,
        3,
        True,
        "md",
    )
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\)"):
            ModalityDropout(bad)


def test_modality_dropout_mask_matches_the_zeroed_modalities():
    layer = ModalityDropout(0.5, seed=2, return_mask=True)
    xs = [np.ones((64, 3, 2), "float32"), np.ones((64, 5), "float32")]
    outs, mask = layer(xs, training=True)
    mask = keras.ops.convert_to_numpy(mask)
    assert mask.shape == (64, 2) and 0 < mask.sum() < mask.size
    for i, out in enumerate(outs):
        out = keras.ops.convert_to_numpy(out).reshape(64, -1)
        np.testing.assert_array_equal(out.max(axis=1), mask[:, i])
        np.testing.assert_array_equal(out.min(axis=1), mask[:, i])
    _, inference_mask = layer(xs)
    assert np.all(keras.ops.convert_to_numpy(inference_mask) == 1)
    inputs = [keras.Input((3, 2)), keras.Input((5,))]
    symbolic_outs, symbolic_mask = layer(inputs)
    assert [tuple(o.shape) for o in symbolic_outs] == [(None, 3, 2), (None, 5)]
    assert tuple(symbolic_mask.shape) == (None, 2)
