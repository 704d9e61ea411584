"""Helpers the tests share: small multi-modal networks and data, numpy
references, and ways to run things (gradients, fits, fresh processes)."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_gramkd import Distiller

WIDTHS = {"a": 4, "b": 6, "c": 5}


# Every public module of the library; `keras_gramkd.demo` is the application's.
PUBLIC_MODULES = (
    "keras_gramkd",
    "keras_gramkd.cache",
    "keras_gramkd.datasets",
    "keras_gramkd.demo",
    "keras_gramkd.export",
    "keras_gramkd.features",
    "keras_gramkd.layers",
    "keras_gramkd.losses",
    "keras_gramkd.ops",
    "keras_gramkd.plots",
    "keras_gramkd.relational",
    "keras_gramkd.relational_ops",
    "keras_gramkd.saving",
    "keras_gramkd.study",
    "keras_gramkd.terms",
    "keras_gramkd.tuning",
    "keras_gramkd.zoo",
)


def _is_symbolic(x):
    """KerasTensors and JAX tracers come from shape inference, not from steps."""
    if isinstance(x, keras.KerasTensor):
        return True
    if keras.backend.backend() == "jax":
        import jax

        return isinstance(x, jax.core.Tracer)
    if keras.backend.backend() == "torch":  # shape inference runs on "meta"
        return x.device.type == "meta"
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


def make_nested_net(prefix, width, counter=False, n_classes=3):
    """A multi-modal net whose encoders are sub-models, with a fusion block.

    - `a_enc`: functional, Dense `embed` (batch, width) then tanh;
    - `b_enc`: Sequential, a Conv1D `conv` over `b` as a 6-step sequence,
      (batch, 4, width) tokens, then mean-pooled;
    - `c_enc`: functional holding the functional `inner` (Dense `embed`):
      a path two models deep;
    - `tokens`: the three embeddings as (batch, 3, width), then a
      MultiHeadAttention `fusion` over them (batch, 3, width), then logits.
    With `counter`, a CallCounter named `count` sits first in `a_enc` and in
    `b_enc`.
    """
    layers = keras.layers
    a_in = keras.Input((4,))
    h = CallCounter(name="count")(a_in) if counter else a_in
    h = layers.Activation("tanh", name="act")(layers.Dense(width, name="embed")(h))
    a_enc = keras.Model(a_in, h, name="a_enc")
    b_layers = [CallCounter(name="count")] if counter else []
    b_enc = keras.Sequential(
        [
            keras.Input((6,)),
            *b_layers,
            layers.Reshape((6, 1)),
            layers.Conv1D(width, 3, activation="tanh", name="conv"),
            layers.GlobalAveragePooling1D(name="pool"),
        ],
        name="b_enc",
    )
    inner_in = keras.Input((5,))
    inner = keras.Model(
        inner_in, layers.Dense(width, name="embed")(inner_in), name="inner"
    )
    c_in = keras.Input((5,))
    c_enc = keras.Model(
        c_in, layers.Activation("tanh", name="act")(inner(c_in)), name="c_enc"
    )
    inputs = {m: keras.Input((WIDTHS[m],), name=m) for m in "abc"}
    embeds = [a_enc(inputs["a"]), b_enc(inputs["b"]), c_enc(inputs["c"])]
    tokens = layers.Reshape((3, width), name="tokens")(layers.Concatenate()(embeds))
    fused = layers.MultiHeadAttention(2, width, name="fusion")(tokens, tokens)
    logits = layers.Dense(n_classes, name="logits")(layers.Flatten()(fused))
    return keras.Model(inputs, logits, name=f"{prefix}_nested")


NESTED_PATHS = {"a": "a_enc/embed", "b": "b_enc/conv", "c": "c_enc/inner/embed"}


def nested_features(model, x, pool="mean"):
    """The nested net's per-modality embeddings and fused tokens, computed
    layer by layer (independently of the Distiller's extractor), as numpy."""
    to_np = keras.ops.convert_to_numpy
    a = model.get_layer("a_enc").get_layer("embed")(x["a"])
    h = x["b"]
    for layer in model.get_layer("b_enc").layers:
        h = layer(h)
        if layer.name == "conv":
            break
    h = to_np(h)
    b = {"mean": h.mean(1), "max": h.max(1), "first": h[:, 0]}[pool]
    c = model.get_layer("c_enc").get_layer("inner").get_layer("embed")(x["c"])
    fused_view = keras.Model(model.input, model.get_layer("fusion").output)
    return np.stack([to_np(a), b, to_np(c)], axis=1), to_np(fused_view(x))


def np_gram(a, normalize, mask=None):
    """Independent reference: explicit loops over samples, float64."""
    a = np.asarray(a, np.float64)
    batch, m, d = a.shape
    mask = np.ones((batch, m)) if mask is None else np.asarray(mask, np.float64)
    out = np.zeros((batch, m, m))
    for b in range(batch):
        present = mask[b] > 0
        rows = a[b] * mask[b][:, None]
        if normalize == "centered" and present.any():
            rows = rows - rows[present].mean(axis=0)
            rows = rows * mask[b][:, None]
        if normalize in ("l2", "centered"):
            norms = np.linalg.norm(rows, axis=1, keepdims=True)
            rows = np.where(norms > 1e-6, rows / np.maximum(norms, 1e-6), 0.0)
        g = rows @ rows.T
        if normalize == "dim":
            g = g / d
        out[b] = g * np.outer(mask[b], mask[b])
    return out


def to_np(x):
    return keras.ops.convert_to_numpy(x)


def np_logit_kd(t, s, temperature):
    t = np.asarray(t, np.float64) / temperature
    s = np.asarray(s, np.float64) / temperature
    log_p = t - t.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    log_q = s - s.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    return temperature**2 * (np.exp(log_p) * (log_p - log_q)).sum(-1)


def value_and_grad(fn, x):
    """`fn(x)` and its gradient with respect to x, as numpy, on any backend."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        value, grad = jax.value_and_grad(fn)(x)
    elif backend == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = fn(x)
        grad = tape.gradient(value, x)
    elif backend == "torch":
        import torch

        x = keras.ops.convert_to_tensor(x).requires_grad_()
        value = fn(x)
        (grad,) = torch.autograd.grad(value, x)
    else:
        pytest.skip(f"no gradient helper for the {backend} backend")
    return float(to_np(value)), to_np(grad)


class BatchLosses(keras.callbacks.Callback):
    """Records every loss Keras logs after each training batch, by name."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def on_train_batch_end(self, batch, logs=None):
        losses = sorted((k, float(v)) for k, v in logs.items() if k.endswith("loss"))
        self.rows.append([v for _, v in losses])


def batch_losses(distiller, x, y):
    record = BatchLosses()
    keras.utils.set_random_seed(7)  # the same shuffles for both fits
    distiller.fit(
        x, y, batch_size=16, epochs=2, shuffle=True, verbose=0, callbacks=[record]
    )
    return np.array(record.rows)


def build_distiller(
    weights=(1.0, 1.0, 1.0), teacher=None, student=None, compile_args=None, **kwargs
):
    """A compiled short-form Distiller of `make_net` networks; `weights` are
    (task, kd, gram)."""
    task, kd, gram = weights
    distiller = Distiller(
        teacher=teacher or make_net("t", 16),
        student=student or make_net("s", 4),
        teacher_modalities=kwargs.pop("teacher_modalities", modality_map("t")),
        student_modalities=kwargs.pop("student_modalities", modality_map("s")),
        task_weight=task,
        kd_weight=kd,
        gram_weight=gram,
        **kwargs,
    )
    if compile_args is None:
        compile_args = {"loss": sparse_ce(), "metrics": ["accuracy"]}
    distiller.compile(optimizer="adam", **compile_args)
    return distiller


class DictSequence(keras.utils.PyDataset):
    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return len(self.y) // self.batch_size

    def __getitem__(self, i):
        sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return {k: v[sl] for k, v in self.x.items()}, self.y[sl]


def run_python(code, backend=None, timeout=300):
    env = dict(os.environ, KERAS_BACKEND=backend or keras.backend.backend())
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=True,
    ).stdout
