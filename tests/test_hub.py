"""A keras-hub backbone as one modality's encoder, its features reached by path.

Needs the `hub` extra (keras-hub); the backbone is built from its config with
random weights, so nothing is downloaded.
"""

import keras
import numpy as np
import pytest
from helpers import np_gram, to_np

from keras_gramkd import Distiller, Feature

pytestmark = pytest.mark.slow  # a keras-hub backbone

keras_hub = pytest.importorskip(
    "keras_hub", reason="keras-hub is not installed (pip install 'keras-gramkd[hub]')"
)

SPEC = {"pix": Feature("pix_encoder/vit_encoder", pool="first"), "a": "a_embed"}


def hub_net(name, width):
    """A ViT backbone on a 16×16 image (its CLS token) and a Dense modality."""
    image = keras.Input((16, 16, 1), name="pix")
    a = keras.Input((4,), name="a")
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(16, 16, 1),
        patch_size=4,
        num_layers=1,
        num_heads=2,
        hidden_dim=width,
        mlp_dim=2 * width,
        name="pix_encoder",
    )
    tokens = backbone(image)
    embed = keras.layers.Dense(width, name="a_embed")(a)
    h = keras.layers.Concatenate()([tokens[:, 0], embed])
    return keras.Model({"pix": image, "a": a}, keras.layers.Dense(3)(h), name=name)


def test_a_keras_hub_backbone_is_distilled_through_its_path():
    rng = np.random.default_rng(0)
    x = {
        "pix": rng.normal(size=(16, 16, 16, 1)).astype("float32"),
        "a": rng.normal(size=(16, 4)).astype("float32"),
    }
    y = rng.integers(0, 3, 16).astype("int32")
    teacher, student = hub_net("teacher", 8), hub_net("student", 4)
    distiller = Distiller(teacher, student, SPEC, SPEC)
    distiller.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    logs = distiller.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)

    def features(model):
        cls = to_np(model.get_layer("pix_encoder")(x["pix"]))[:, 0]
        return np.stack([cls, to_np(model.get_layer("a_embed")(x["a"]))], axis=1)

    gram = np.mean(
        (np_gram(features(teacher), "l2") - np_gram(features(student), "l2")) ** 2
    )
    assert logs["gram_loss"] == pytest.approx(gram, rel=1e-4)
    before = [to_np(w).copy() for w in student.weights]
    history = distiller.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(history["gram_loss"][0])
    after = [to_np(w) for w in student.weights]
    changed = [not np.array_equal(b, a) for b, a in zip(before, after, strict=True)]
    assert all(changed)  # every student weight trains, the backbone's included
