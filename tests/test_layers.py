"""ModalityStack: stacking, pooling, ordering, errors, serialisation."""

import keras
import numpy as np
import pytest
from test_ops import to_np

from keras_gramkd.layers import ModalityStack


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
