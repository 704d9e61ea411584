"""Shared fixtures: small multi-modal teacher/student builders and data."""

import keras
import numpy as np
import pytest

WIDTHS = {"a": 4, "b": 6, "c": 5}


def pytest_report_header():
    return f"keras backend: {keras.backend.backend()}, keras {keras.__version__}"


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def _is_symbolic(x):
    """KerasTensors and JAX tracers come from shape inference, not from steps."""
    if isinstance(x, keras.KerasTensor):
        return True
    if keras.backend.backend() == "jax":
        import jax

        return isinstance(x, jax.core.Tracer)
    return False


class CallCounter(keras.layers.Layer):
    """Identity layer that counts the concrete calls it gets (use run_eagerly)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def call(self, x):
        if not _is_symbolic(x):
            self.calls += 1
        return x


def make_net(
    prefix,
    width,
    modalities=("a", "b", "c"),
    n_classes=3,
    counter=False,
    norm_and_dropout=False,
    output_activation=None,
):
    """A functional multi-modal net: one Dense encoder per modality, a head.

    Encoder outputs are named f"{prefix}_{modality}"; inputs are a dict keyed
    by modality; the output is logits (unless output_activation is set).
    """
    inputs = {m: keras.Input((WIDTHS[m],), name=m) for m in modalities}
    embeds = []
    for m in modalities:
        h = inputs[m]
        if counter:
            h = CallCounter(name=f"{prefix}_counter_{m}")(h)
        if norm_and_dropout:
            h = keras.layers.BatchNormalization(name=f"{prefix}_bn_{m}")(h)
        embeds.append(
            keras.layers.Dense(width, activation="tanh", name=f"{prefix}_{m}")(h)
        )
    h = keras.layers.Concatenate()(embeds) if len(embeds) > 1 else embeds[0]
    if norm_and_dropout:
        h = keras.layers.Dropout(0.5)(h)
    logits = keras.layers.Dense(
        n_classes, activation=output_activation, name=f"{prefix}_logits"
    )(h)
    return keras.Model(inputs, logits, name=f"{prefix}_net")


def modality_map(prefix, modalities=("a", "b", "c")):
    return {m: f"{prefix}_{m}" for m in modalities}


def make_data(n=48, n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = {m: rng.normal(size=(n, w)).astype("float32") for m, w in WIDTHS.items()}
    y = rng.integers(0, n_classes, size=n).astype("int32")
    return x, y


def sparse_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def net_outputs(model, prefix, x, modalities="abc"):
    """A make_net model's (logits, stacked (batch, M, d) embeddings) as numpy."""
    layers = [f"{prefix}_{m}" for m in modalities]
    view = keras.Model(
        model.input, [model.output] + [model.get_layer(n).output for n in layers]
    )
    out = [keras.ops.convert_to_numpy(o) for o in view(x, training=False)]
    return out[0], np.stack(out[1:], axis=1)
