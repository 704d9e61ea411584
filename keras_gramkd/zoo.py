"""The reference multi-modal teacher and students, and the recipe that trains them.

Used by `gramkd demo`, `gramkd tune`, the benchmarks and the examples. One
input per view (a dict of (batch, d_v) arrays), logits out, and layer names
that the distillation terms address:

========================  ===========================  ===========================
what                      teacher                      student
========================  ===========================  ===========================
view ``v``'s embedding    ``t_{v}``                    ``s_{v}``
stacked view tokens       ``t_tokens`` (batch, M, 64)  ``s_tokens`` (batch, M, 8)
tokens after fusion       ``t_fused`` (batch, M, 64)   ``s_fused`` (attention only)
fused vector              ``t_pool`` (batch, 64)       ``s_pool`` (batch, 8 or 8·M)
========================  ===========================  ===========================

`FEATURES` gives these addresses by name. The teacher fuses its view tokens
with a Transformer block (self-attention across modalities, then an MLP); a
student fuses them by concatenation (``fusion="concat"``, the default) or by
one attention layer (``fusion="attention"``).

Example:

>>> import numpy as np
>>> from keras_gramkd import zoo
>>> teacher = zoo.build_teacher({"a": 5, "b": 3}, n_classes=4)
>>> student = zoo.build_student({"a": 5, "b": 3}, n_classes=4, fusion="attention")
>>> tuple(student.get_layer("s_fused").output.shape)
(None, 2, 8)
>>> teacher.count_params() > 20 * student.count_params()
True
"""

import keras

from keras_gramkd.layers import ModalityDropout, ModalityStack

N_CLASSES = 10
BATCH_SIZE = 128
TEACHER_LEARNING_RATE = 1e-3
STUDENT_LEARNING_RATE = 1e-2  # the tiny student under noise is slow at 1e-3
TEACHER_WIDTH, TEACHER_EMBED, TEACHER_HEADS = 256, 64, 4
STUDENT_WIDTH, STUDENT_EMBED, STUDENT_HEADS = 16, 8, 2
STUDENT_MASK_LAYER = "s_modality_dropout"
FUSIONS = ("concat", "attention")

FEATURES = {
    "teacher": {"tokens": "t_tokens", "fused": "t_fused", "pooled": "t_pool"},
    "student": {"tokens": "s_tokens", "fused": "s_fused", "pooled": "s_pool"},
}


def view_addresses(prefix, views):
    """The per-view embedding addresses, e.g. ``{"fou": "t_fou", ...}``."""
    return {v: f"{prefix}_{v}" for v in views}


def _training_noise(x, stddev, name):
    """Adds fresh N(0, stddev²) noise at training time; identity at inference.

    Built from Keras layers only (`GaussianNoise` accepts stddev <= 1, so the
    input is scaled down, noised with stddev 1 and scaled back), so a saved
    student loads with nothing but keras imported.
    """
    L = keras.layers
    x = L.Rescaling(1.0 / stddev, name=f"{name}_scale_down")(x)
    x = L.GaussianNoise(1.0, name=name)(x)
    return L.Rescaling(stddev, name=f"{name}_scale_up")(x)


def _stack_tokens(embeds, name):
    """(batch, d) embeddings -> (batch, M, d), from Keras layers only (so a
    saved student loads without keras_gramkd)."""
    L = keras.layers
    rows = [
        L.Reshape((1, e.shape[-1]), name=f"{name}_{i}")(e) for i, e in enumerate(embeds)
    ]
    return L.Concatenate(axis=1, name=name)(rows) if len(rows) > 1 else rows[0]


def _inputs(input_dims):
    return {v: keras.Input((d,), name=v) for v, d in input_dims.items()}


def _attention_fusion(tokens, prefix, heads, mlp=True):
    """Self-attention across the modality tokens (+ MLP), post-norm residuals."""
    L = keras.layers
    embed = tokens.shape[-1]
    attention = L.MultiHeadAttention(heads, embed // heads, name=f"{prefix}_attention")(
        tokens, tokens
    )
    x = L.Add(name=f"{prefix}_residual1")([tokens, attention])
    if not mlp:
        return L.LayerNormalization(name=f"{prefix}_fused")(x)
    x = L.LayerNormalization(name=f"{prefix}_norm1")(x)
    h = L.Dense(2 * embed, activation="relu", name=f"{prefix}_mlp1")(x)
    h = L.Dense(embed, name=f"{prefix}_mlp2")(h)
    return L.LayerNormalization(name=f"{prefix}_fused")(
        L.Add(name=f"{prefix}_residual2")([x, h])
    )


def build_teacher(input_dims, n_classes=N_CLASSES):
    """Teacher: per-view encoders into 64-d tokens, a Transformer block, a head.

    About 300k parameters with the six digit views. The embedding of view
    ``v`` is layer ``t_{v}``; see the module for the other addresses.
    """
    L = keras.layers
    inputs = _inputs(input_dims)
    tokens = []
    for v, x in inputs.items():
        h = L.Dense(TEACHER_WIDTH, activation="relu", name=f"t_{v}_hidden")(x)
        h = L.Dropout(0.2, name=f"t_{v}_dropout")(h)
        tokens.append(L.Dense(TEACHER_EMBED, name=f"t_{v}")(h))
    x = ModalityStack(name="t_tokens")(tokens)
    x = _attention_fusion(x, "t", TEACHER_HEADS)
    x = L.GlobalAveragePooling1D(name="t_pool")(x)
    logits = L.Dense(n_classes, name="t_logits")(x)
    return keras.Model(inputs, logits, name="teacher")


def build_student(
    input_dims,
    noise_std=0.0,
    modality_dropout=0.0,
    n_classes=N_CLASSES,
    fusion="concat",
):
    """Student: 16-wide per-view encoders into 8-d tokens, fused, a linear head.

    Args:
        input_dims: dict view name -> input width.
        noise_std: adds fresh N(0, noise_std²) noise to every view at training
            time (0: none).
        modality_dropout: zeroes whole views at training time with this
            probability (layer `STUDENT_MASK_LAYER`, whose mask keeps the
            dropped views out of the Gram loss).
        n_classes: number of logits.
        fusion: ``"concat"`` (tokens concatenated, ``s_pool`` is 8·M wide) or
            ``"attention"`` (one 2-head self-attention layer across the
            tokens, ``s_fused``, then mean-pooled).
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}; got {fusion!r}.")
    L = keras.layers
    inputs = _inputs(input_dims)
    views = list(inputs)
    xs = [inputs[v] for v in views]
    if noise_std:
        xs = [
            _training_noise(x, noise_std, name=f"s_{v}_noise")
            for v, x in zip(views, xs, strict=True)
        ]
    if modality_dropout:
        xs, _ = ModalityDropout(
            modality_dropout, return_mask=True, name=STUDENT_MASK_LAYER
        )(xs)
    embeds = []
    for v, x in zip(views, xs, strict=True):
        h = L.Dense(STUDENT_WIDTH, activation="relu", name=f"s_{v}_hidden")(x)
        embeds.append(L.Dense(STUDENT_EMBED, name=f"s_{v}")(h))
    tokens = _stack_tokens(embeds, "s_tokens")
    if fusion == "attention":
        x = _attention_fusion(tokens, "s", STUDENT_HEADS, mlp=False)
        x = L.GlobalAveragePooling1D(name="s_pool")(x)
    else:
        x = L.Flatten(name="s_pool")(tokens)
    logits = L.Dense(n_classes, name="s_logits")(x)
    return keras.Model(inputs, logits, name="student")


def compile_for_training(model, learning_rate):
    """The recipe's compile: Adam, sparse CE on logits, accuracy."""
    # XLA compilation on CPU costs more than it saves on these small models.
    jit = False if keras.backend.backend() == "tensorflow" else "auto"
    model.compile(
        keras.optimizers.Adam(learning_rate),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=jit,
    )
