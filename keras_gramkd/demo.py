"""`gramkd demo`: what each distillation loss buys on real multi-modal digits.

The study behind the `gramkd demo` command. On the embedded UCI multiple-features
digits (six views of the same 2,000 handwritten digits, a fixed stratified
1000/1000 split) it trains one multi-modal teacher, then the same small student
architecture over several seeds in four ways with the same optimizer, number
of steps, data order and initial weights per seed:

- ``labels``: labels only (this library's `Distiller` with kd and gram weight 0);
- ``kd``: labels + logit KD (Hinton);
- ``gram``: labels + logit KD + modality Gram (this library's method);
- ``keras_kd``: `keras.distillation.Distiller` with
  `LogitsDistillation(temperature=T, loss=keras.losses.KLDivergence())`, the
  reference Keras ships (its default ``loss="kl_divergence"`` string applies no
  softmax, so it is not the Hinton loss). Its total loss is
  ``w·task + (1 - w)·KD`` with ``w = 1 / (1 + kd_weight)``: the ``kd`` run's
  loss divided by ``1 + kd_weight``.

and three controls for the Gram term (same weight and normalisation): a
batch-mean target (no per-sample relations: a scale regulariser), diagonal
entries only (modality norms only; not run with the ``"l2"`` and
``"centered"`` Grams, whose diagonal is always 1) and off-diagonal entries
only.

Settings (``--setting``):

- ``clean``: teacher and student see the clean views;
- ``noisy``: the student sees every view with Gaussian noise (std
  `NOISE_STD` in standardised units), drawn fresh at every training step by a
  noise layer in the student and drawn once with a fixed seed for the test split, so
  that test accuracy is reproducible; the teacher sees clean views;
- ``few-labels``: the student has `FEW_LABELS_PER_CLASS` labelled training
  samples per class; the teacher was trained on the whole training split.

An "epoch" is a fixed number of batches (one pass over the full training
split), whatever the size of the student's training set, so every setting gets
the same number of optimizer steps.

How the networks and the default setting were chosen: the teacher has one
256-wide encoder per view into a 64-d shared space and a Transformer block
(4-head self-attention over the modality tokens, then an MLP), about 300k
parameters; the student has 16-wide encoders per view into an 8-d space,
concatenated into a linear classifier, about 12k parameters (25x fewer: tiny
encoders into a narrow space leave the student a gap to close). Teacher Adam
1e-3, students Adam 1e-2 (at 1e-3 the noisy student was still climbing after
30 epochs: 72.6 % labels-only), batch 128, 30 epochs. Measured (TensorFlow,
2 CPU cores, 2 seeds), test accuracy of the teacher vs the labels-only
student: clean 98.7 vs 97.8 % (gap 0.9 points), noisy 98.7 vs 87.3 % (gap
11.4), few-labels 98.7 vs 90.8 % (gap 8.0). ``noisy`` has the largest gap
and is the default.

The default Gram term is the library's cosine Gram (``"l2"``) at weight 3: in
a sweep on the noisy setting (2 seeds) it cut the train Gram loss from 0.18 to
0.07 (weight 1: to 0.10), so the student's Gram does move to the teacher's;
no variant (l2 x1, x3; centered x3; dim x0.1 and its batch-mean and diagonal
controls; raw x1e-3) changed accuracy over KD by more than the seed noise
(paired differences -0.5 to +0.4 points).
"""

import datetime
import json
import math
import os
import sys
import tempfile
import time

import keras
import numpy as np

from keras_gramkd import ops as kd_ops
from keras_gramkd.console import make_console, new_table
from keras_gramkd.datasets import MFEAT_VIEWS, load_mfeat
from keras_gramkd.distiller import Distiller
from keras_gramkd.layers import ModalityDropout, ModalityStack
from keras_gramkd.losses import ModalityGram
from keras_gramkd.robustness import evaluate_robustness
from keras_gramkd.study import SeededBatches

SETTINGS = ("clean", "noisy", "few-labels")
DEFAULT_SETTING = "noisy"
GRAM_NORMALIZE_CHOICES = ("l2", "centered", "dim", "none")
NOISE_STD = 3.0
FEW_LABELS_PER_CLASS = 10
SPLIT_SEED = 0
TEST_NOISE_SEED = 1234
TEACHER_SEED = 0
BATCH_SIZE = 128
TEACHER_LEARNING_RATE = 1e-3
STUDENT_LEARNING_RATE = 1e-2  # the tiny student under noise is slow at 1e-3
N_CLASSES = 10

TEACHER_WIDTH, TEACHER_EMBED, TEACHER_HEADS = 256, 64, 4
STUDENT_WIDTH, STUDENT_EMBED = 16, 8

DEFAULTS = {
    "epochs": 30,
    "teacher_epochs": 30,
    "seeds": 3,
    "gram_weight": 3.0,
    "kd_weight": 1.0,
    "temperature": 4.0,
    "gram_normalize": "l2",
}
QUICK = {"epochs": 2, "teacher_epochs": 3, "seeds": 1}

METHODS = {
    "labels": "labels only",
    "kd": "labels+KD",
    "gram": "labels+KD+Gram",
    "keras_kd": "keras KD (KL)",
}
CONTROLS = {
    "gram_batch_mean": "ctl: batch-mean G",
    "gram_diagonal": "ctl: diagonal G",
    "gram_off_diagonal": "ctl: off-diag G",
}
_CONTROL_LOSS = {
    "gram": {},
    "gram_batch_mean": {"target": "batch_mean"},
    "gram_diagonal": {"entries": "diagonal"},
    "gram_off_diagonal": {"entries": "off_diagonal"},
}


# ----------------------------------------------------------------------------
# Layers and models


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


def _inputs(input_dims):
    return {v: keras.Input((d,), name=v) for v, d in input_dims.items()}


def build_teacher(input_dims, n_classes=N_CLASSES):
    """Teacher: per-view encoders into 64-d tokens, a Transformer block, a head.

    The embedding of view ``v`` is the output of layer ``t_{v}``.
    """
    L = keras.layers
    inputs = _inputs(input_dims)
    tokens = []
    for v, x in inputs.items():
        h = L.Dense(TEACHER_WIDTH, activation="relu", name=f"t_{v}_hidden")(x)
        h = L.Dropout(0.2, name=f"t_{v}_dropout")(h)
        tokens.append(L.Dense(TEACHER_EMBED, name=f"t_{v}")(h))
    x = ModalityStack(name="t_tokens")(tokens)
    attention = L.MultiHeadAttention(
        TEACHER_HEADS, TEACHER_EMBED // TEACHER_HEADS, name="t_attention"
    )(x, x)
    x = L.LayerNormalization(name="t_norm1")(L.Add()([x, attention]))
    h = L.Dense(2 * TEACHER_EMBED, activation="relu", name="t_mlp1")(x)
    h = L.Dense(TEACHER_EMBED, name="t_mlp2")(h)
    x = L.LayerNormalization(name="t_norm2")(L.Add()([x, h]))
    x = L.GlobalAveragePooling1D(name="t_pool")(x)
    logits = L.Dense(n_classes, name="t_logits")(x)
    return keras.Model(inputs, logits, name="teacher")


STUDENT_MASK_LAYER = "s_modality_dropout"


def build_student(input_dims, noise_std=0.0, modality_dropout=0.0, n_classes=10):
    """Student: 16-wide per-view encoders into 8-d, concatenated, a linear head.

    The embedding of view ``v`` is the output of layer ``s_{v}``. `noise_std`
    adds fresh Gaussian noise to every view at training time; `modality_dropout`
    zeroes whole views (layer `STUDENT_MASK_LAYER`, whose mask keeps the dropped
    views out of the Gram loss).
    """
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
    x = L.Concatenate(name="s_concat")(embeds) if len(embeds) > 1 else embeds[0]
    logits = L.Dense(n_classes, name="s_logits")(x)
    return keras.Model(inputs, logits, name="student")


def _feature_model(model, prefix, views):
    """A model giving (logits, stacked (batch, M, d) view embeddings)."""
    feats = [model.get_layer(f"{prefix}_{v}").output for v in views]
    stacked = ModalityStack(name=f"{prefix}_features")(feats)
    return keras.Model(model.input, [model.output, stacked])


# ----------------------------------------------------------------------------
# Data


def _check_views(views):
    if views is None:
        return tuple(MFEAT_VIEWS)
    if isinstance(views, str):
        views = [v for v in views.split(",") if v]
    views = tuple(views)
    unknown = [v for v in views if v not in MFEAT_VIEWS]
    if not views or unknown or len(set(views)) != len(views):
        raise ValueError(
            f"Bad --views {list(views)}: give distinct view names from "
            f"{list(MFEAT_VIEWS)} (unknown: {unknown})."
        )
    return views


def _check_setting(setting):
    if setting not in SETTINGS:
        raise ValueError(f"Unknown setting {setting!r}; choose one of {SETTINGS}.")
    return setting


def _subsample(x, y, per_class, rng):
    idx = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]
    )
    idx = rng.permutation(idx)
    return {k: v[idx] for k, v in x.items()}, y[idx]


def add_fixed_noise(x, seed):
    """The noisy setting's inputs: x plus N(0, NOISE_STD²) drawn once from `seed`.

    Fixed noise makes evaluation on noisy inputs reproducible (training draws
    fresh noise each step inside the student instead).
    """
    rng = np.random.default_rng(seed)
    return {
        k: (v + NOISE_STD * rng.standard_normal(v.shape)).astype("float32")
        for k, v in x.items()
    }


def load_study_data(views=None, setting=DEFAULT_SETTING, train_per_class=None):
    """The study's data: a fixed stratified 1000/1000 split of the digits.

    Args:
        views: view names (default all six).
        setting: one of `SETTINGS`; decides the student's data.
        train_per_class: optional cap on training samples per class (for fast
            tests); the test split is always complete.

    Returns:
        dict with ``teacher_train``, ``student_train``, ``teacher_test``,
        ``student_test`` (each an ``(x, y)`` pair, x a dict view -> array).
    """
    views, setting = _check_views(views), _check_setting(setting)
    (x_tr, y_tr), (x_te, y_te) = load_mfeat(views=views, test_size=0.5, seed=SPLIT_SEED)
    rng = np.random.default_rng(SPLIT_SEED)
    if train_per_class is not None:
        x_tr, y_tr = _subsample(x_tr, y_tr, int(train_per_class), rng)
    student_train, student_test = (x_tr, y_tr), (x_te, y_te)
    if setting == "few-labels":
        student_train = _subsample(x_tr, y_tr, FEW_LABELS_PER_CLASS, rng)
    elif setting == "noisy":
        student_test = (add_fixed_noise(x_te, TEST_NOISE_SEED), y_te)
    return {
        "teacher_train": (x_tr, y_tr),
        "student_train": student_train,
        "teacher_test": (x_te, y_te),
        "student_test": student_test,
    }


# ----------------------------------------------------------------------------
# Training and evaluation


def _optimizer(learning_rate):
    return keras.optimizers.Adam(learning_rate)


def _compile(model, learning_rate):
    # XLA compilation on CPU costs more than it saves on these small models.
    jit = False if keras.backend.backend() == "tensorflow" else "auto"
    model.compile(
        _optimizer(learning_rate),
        _sparse_ce(),
        metrics=[_accuracy_metric()],
        jit_compile=jit,
    )


def _sparse_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _accuracy_metric():
    return keras.metrics.SparseCategoricalAccuracy(name="accuracy")


def accuracy(model, x, y):
    """Test accuracy of a logits model on (x, y)."""
    logits = model.predict(x, batch_size=1000, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


class _RichEpochs(keras.callbacks.Callback):
    """Advances a rich progress task per epoch and shows the logged losses."""

    KEYS = ("task_loss", "kd_loss", "gram_loss", "student_loss", "distillation_loss")

    def __init__(self, progress, task):
        super().__init__()
        self.progress, self.task = progress, task

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        shown = [f"{k} {logs[k]:.3f}" for k in self.KEYS if k in logs]
        for k in ("loss", "val_accuracy"):
            if k in logs:
                shown.append(f"{k} {logs[k]:.3f}")
        self.progress.update(self.task, advance=1, metrics="  ".join(shown))


def _fit(model, data, val, epochs, seed, num_batches, progress, name):
    task = progress.add_task(name, total=epochs, metrics="")
    batches = SeededBatches(*data, BATCH_SIZE, num_batches, seed)
    start = time.perf_counter()
    history = model.fit(
        batches,
        epochs=epochs,
        shuffle=False,
        validation_data=val,
        validation_batch_size=1000,
        callbacks=[_RichEpochs(progress, task)],
        verbose=0,
    )
    elapsed = time.perf_counter() - start
    progress.remove_task(task)
    return history.history, elapsed


def _rename_keras_history(history):
    names = {"student_loss": "task_loss", "distillation_loss": "kd_loss"}
    out = {}
    for key, values in history.items():
        base = key[4:] if key.startswith("val_") else key
        prefix = "val_" if key.startswith("val_") else ""
        out[prefix + names.get(base, base)] = [float(v) for v in values]
    return out


def _grams(features, normalize):
    return keras.ops.convert_to_numpy(kd_ops.gram_matrix(features, normalize))


def _evaluate_student(student, data, teacher_grams, views, normalize):
    """Accuracy, per-view-missing accuracies and Gram gap of one student."""
    x, y = data["student_test"]
    _, feats = _feature_model(student, "s", views).predict(
        x, batch_size=1000, verbose=0
    )
    grams = _grams(feats, normalize)
    robust = evaluate_robustness(
        student, x, y, modalities=views, pairs=False, batch_size=1000
    )
    return {
        "accuracy": robust.accuracy,
        "missing": robust.dropped,
        "missing_mean": robust.mean_dropped,
        "gram_gap": float(np.mean(np.abs(teacher_grams - grams))),
    }


def _skipped_controls(normalize):
    """Controls that cannot differ from KD under this normalisation, and why."""
    if normalize in ("l2", "centered"):
        return {
            "gram_diagonal": (
                f"the diagonal of a {normalize!r} Gram matrix is 1 for every "
                "sample, so a diagonal-only loss is 0 and the run would equal "
                "labels+KD; use --gram-normalize dim or none for a norms-only "
                "control"
            )
        }
    return {}


def _std(values):
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _model_size(model):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        return os.path.getsize(path)


def _conclusion(setting, cfg, paired, summary, controls):
    """Plain-words reading of the paired Gram - KD differences."""
    d, n = paired["gram"]["diff"], len(paired["gram"]["diff"])
    mean, std = paired["gram"]["mean"], paired["gram"]["std"]
    wins = sum(x > 0 for x in d)
    what = (
        f"On the {setting} setting, adding the modality Gram term "
        f"(normalize={cfg['gram_normalize']!r}, weight {cfg['gram_weight']:g}) to "
        f"logit KD changed student test accuracy by {100 * mean:+.2f} ± "
        f"{100 * std:.2f} points (paired over {n} seed(s); better on {wins} of {n})."
    )
    if n < 2:
        verdict = "One seed is too few to tell whether the Gram term helped."
    else:
        sem = std / math.sqrt(n)
        if mean - 2 * sem > 0:
            verdict = "The Gram term helped on this data."
        elif mean + 2 * sem < 0:
            verdict = "The Gram term hurt on this data."
        else:
            verdict = (
                "The difference is within seed noise: the Gram term did not "
                "measurably help on this data."
            )
    gram, kd = summary["gram"], summary["kd"]
    parts = [
        what,
        verdict,
        (
            "The term moved the student's Gram toward the teacher's"
            if gram["gram_gap_mean"] < kd["gram_gap_mean"]
            else "The term did not bring the student's Gram closer to the teacher's"
        )
        + f": the mean |G_teacher − G_student| on "
        f"test data went from {kd['gram_gap_mean']:.3f} (KD) to "
        f"{gram['gram_gap_mean']:.3f}; with one view zeroed at test time the "
        f"Gram student scored {100 * gram['missing_mean_mean']:.2f} % against "
        f"{100 * kd['missing_mean_mean']:.2f} % for KD.",
    ]
    if "gram_batch_mean" in paired:
        bm = paired["gram_batch_mean"]
        parts.append(
            f"The batch-mean control (the teacher's average Gram, no per-sample "
            f"relations) changed accuracy by {100 * bm['mean']:+.2f} ± "
            f"{100 * bm['std']:.2f} points over KD on {len(bm['diff'])} seed(s)"
            + (
                "; the per-sample Gram did no better than this control, so "
                "there is no evidence of relational transfer paying off."
                if bm["mean"] >= mean
                else f"; the per-sample Gram beat it by {100 * (mean - bm['mean']):.2f}"
                " points."
            )
        )
    if controls and controls < n:
        parts.append(f"Controls ran on {controls} of {n} seeds.")
    return " ".join(parts)


def _null_progress():
    from rich.progress import Progress

    return Progress(disable=True)


def _progress(console):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=console,
    )


def _resolve_config(
    views,
    setting,
    epochs,
    teacher_epochs,
    seeds,
    gram_weight,
    kd_weight,
    temperature,
    gram_normalize,
    modality_dropout,
    controls,
    control_seeds,
    quick,
    train_per_class,
):
    """Checks the options (ValueError with the fix) and fills in defaults."""
    views, setting = _check_views(views), _check_setting(setting)
    base = {**DEFAULTS, **(QUICK if quick else {})}
    given = {
        "epochs": epochs,
        "teacher_epochs": teacher_epochs,
        "seeds": seeds,
        "gram_weight": gram_weight,
        "kd_weight": kd_weight,
        "temperature": temperature,
        "gram_normalize": gram_normalize,
    }
    cfg = {k: (base[k] if v is None else v) for k, v in given.items()}
    for key in ("epochs", "teacher_epochs", "seeds"):
        if int(cfg[key]) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1; got {cfg[key]}.")
        cfg[key] = int(cfg[key])
    for key in ("gram_weight", "kd_weight", "temperature"):
        value = float(cfg[key])
        if (
            not math.isfinite(value)
            or value < 0
            or (key == "temperature" and value == 0)
        ):
            raise ValueError(
                f"--{key.replace('_', '-')} must be a finite number "
                f"{'> 0' if key == 'temperature' else '>= 0'}; got {cfg[key]}."
            )
        cfg[key] = value
    if cfg["gram_normalize"] not in GRAM_NORMALIZE_CHOICES:
        raise ValueError(
            f"Unknown --gram-normalize {cfg['gram_normalize']!r}; choose one of "
            f"{GRAM_NORMALIZE_CHOICES}."
        )
    if not 0.0 <= float(modality_dropout) < 1.0:
        raise ValueError(
            f"--modality-dropout must be in [0, 1); got {modality_dropout}."
        )
    if control_seeds is None:  # a quick run skips the controls unless asked
        control_seeds = 0 if quick else cfg["seeds"]
    n_control = int(control_seeds)
    if n_control < 0:
        raise ValueError(f"--control-seeds must be >= 0; got {control_seeds}.")
    n_control = min(n_control, cfg["seeds"]) if controls else 0
    cfg.update(
        views=list(views),
        setting=setting,
        modality_dropout=float(modality_dropout),
        control_seeds=n_control,
        quick=bool(quick),
        batch_size=BATCH_SIZE,
        teacher_learning_rate=TEACHER_LEARNING_RATE,
        student_learning_rate=STUDENT_LEARNING_RATE,
        train_per_class=train_per_class,
    )
    return cfg


def run_study(
    views=None,
    setting=DEFAULT_SETTING,
    epochs=None,
    teacher_epochs=None,
    seeds=None,
    gram_weight=None,
    kd_weight=None,
    temperature=None,
    gram_normalize=None,
    modality_dropout=0.0,
    controls=True,
    control_seeds=None,
    quick=False,
    out=None,
    train_per_class=None,
    verbose=True,
    console=None,
    export=False,
):
    """Runs the study and writes its files; returns the results dict.

    Args:
        views: view names (default all six of `MFEAT_VIEWS`).
        setting: one of `SETTINGS` (default `DEFAULT_SETTING`).
        epochs, teacher_epochs: student and teacher epochs (one epoch = one pass
            over the full training split).
        seeds: number of student seeds (0, 1, ...).
        gram_weight, kd_weight, temperature, gram_normalize: the loss settings.
        modality_dropout: probability of zeroing each student view per sample
            at training time.
        controls: whether to run the three Gram controls.
        control_seeds: how many seeds the controls run on (default all; none
            in a quick run).
        quick: a smoke run: one seed, 2 epochs, no validation curves, no
            controls unless `control_seeds` is given.
        out: output directory (default ``runs/demo-<timestamp>/``).
        train_per_class: optional cap on training samples per class.
        verbose: print progress and the table.
        console: optional `rich.console.Console`.
        export: also export the best student to TFLite and ONNX (float32,
            float16, dynamic, int8) under ``out/export/``, verify each file in
            its runtime, and add the export table to the results (needs the
            `export` extra).

    Returns:
        The dict written to ``results.json``.
    """

    cfg = _resolve_config(
        views=views,
        setting=setting,
        epochs=epochs,
        teacher_epochs=teacher_epochs,
        seeds=seeds,
        gram_weight=gram_weight,
        kd_weight=kd_weight,
        temperature=temperature,
        gram_normalize=gram_normalize,
        modality_dropout=modality_dropout,
        controls=controls,
        control_seeds=control_seeds,
        quick=quick,
        train_per_class=train_per_class,
    )
    views, setting, n_control = (
        tuple(cfg["views"]),
        cfg["setting"],
        cfg["control_seeds"],
    )
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = os.path.join("runs", f"demo-{stamp}")
    os.makedirs(out, exist_ok=True)
    console = console or make_console(quiet=not verbose)
    wall_start = time.perf_counter()

    data = load_study_data(views, setting, train_per_class)
    input_dims = {v: data["teacher_train"][0][v].shape[1] for v in views}
    num_batches = math.ceil(len(data["teacher_train"][1]) / BATCH_SIZE)
    noise = NOISE_STD if setting == "noisy" else 0.0
    t_mods = {v: f"t_{v}" for v in views}
    s_mods = {v: f"s_{v}" for v in views}
    normalize = cfg["gram_normalize"]

    runs = [(m, s) for s in range(cfg["seeds"]) for m in METHODS]
    skipped = _skipped_controls(normalize) if n_control else {}
    runs += [(c, s) for s in range(n_control) for c in CONTROLS if c not in skipped]
    progress = _progress(console) if verbose else _null_progress()
    results = {name: [] for name in {**METHODS, **CONTROLS}}
    histories, students = {}, {}
    with progress:
        phase = progress.add_task("study", total=len(runs) + 2, metrics="")

        # Teacher.
        keras.utils.set_random_seed(TEACHER_SEED)
        teacher = build_teacher(input_dims)
        _compile(teacher, TEACHER_LEARNING_RATE)
        _, teacher_time = _fit(
            teacher,
            data["teacher_train"],
            None if quick else data["teacher_test"],
            cfg["teacher_epochs"],
            TEACHER_SEED,
            num_batches,
            progress,
            "teacher",
        )
        teacher.trainable = False
        t_extractor = _feature_model(teacher, "t", views)
        x_t, y_t = data["teacher_test"]
        _, t_feats = t_extractor.predict(x_t, batch_size=1000, verbose=0)
        teacher_grams = _grams(t_feats, normalize)
        t_robust = evaluate_robustness(
            teacher, x_t, y_t, modalities=views, pairs=False, batch_size=1000
        )
        teacher_result = {
            "accuracy": t_robust.accuracy,
            "missing_modality": t_robust.dropped,
            "missing_mean": t_robust.mean_dropped,
            "params": int(teacher.count_params()),
            "size_bytes": _model_size(teacher),
            "train_time_s": teacher_time,
        }
        progress.update(
            phase,
            advance=1,
            metrics=f"teacher accuracy {teacher_result['accuracy']:.3f}",
        )

        # Students.
        for name, seed in runs:
            keras.utils.set_random_seed(seed)
            student = build_student(input_dims, noise, modality_dropout)
            if name == "keras_kd":
                model = keras.distillation.Distiller(
                    teacher=teacher,
                    student=student,
                    distillation_losses=keras.distillation.LogitsDistillation(
                        temperature=cfg["temperature"],
                        loss=keras.losses.KLDivergence(),
                    ),
                    student_loss_weight=1.0 / (1.0 + cfg["kd_weight"]),
                )
            else:
                gram = name in _CONTROL_LOSS
                model = Distiller(
                    teacher,
                    student,
                    teacher_modalities=t_mods,
                    student_modalities=s_mods,
                    kd_weight=0.0 if name == "labels" else cfg["kd_weight"],
                    gram_weight=cfg["gram_weight"] if gram else 0.0,
                    temperature=cfg["temperature"],
                    gram_loss=ModalityGram(normalize, **_CONTROL_LOSS.get(name, {})),
                    student_mask_layer=STUDENT_MASK_LAYER if modality_dropout else None,
                )
            _compile(model, STUDENT_LEARNING_RATE)
            history, elapsed = _fit(
                model,
                data["student_train"],
                # Validation curves for seed 0 only; none in a quick run.
                data["student_test"] if seed == 0 and not quick else None,
                cfg["epochs"],
                seed,
                num_batches,
                progress,
                f"{name} seed {seed}",
            )
            if name == "keras_kd":
                history = _rename_keras_history(history)
            ev = _evaluate_student(student, data, teacher_grams, views, normalize)
            ev.update(seed=seed, train_time_s=elapsed)
            results[name].append(ev)
            if seed == 0:
                histories[name] = history
            if name in METHODS:
                students[(name, seed)] = student
            progress.update(
                phase,
                advance=1,
                metrics=f"{name} seed {seed}: accuracy {ev['accuracy']:.3f}",
            )

        # Summary, files.
        student_params = int(students[("labels", 0)].count_params())
        student_size = _model_size(students[("labels", 0)])
        summary = _summarise(results, teacher_result, views)
        for entry in summary.values():
            entry.update(params=student_params, size_bytes=student_size)
        paired = {
            name: _paired(results[name], results["kd"])
            for name in ("gram", "labels", "keras_kd", *CONTROLS)
            if results[name]
        }
        best_method = max(METHODS, key=lambda m: summary[m]["accuracy_mean"])
        best_run = max(results[best_method], key=lambda r: r["accuracy"])
        best = students[(best_method, best_run["seed"])]
        best.save(os.path.join(out, "student.keras"))
        # The heat maps show the student trained with the Gram term (best seed).
        gram_run = max(results["gram"], key=lambda r: r["accuracy"])
        _plot_grams(
            out,
            t_feats,
            y_t,
            students[("gram", gram_run["seed"])],
            data,
            views,
            normalize,
            "gram",
            gram_run,
        )
        _plot_curves(out, histories)
        progress.update(phase, advance=1, metrics="files written")

    results_dict = {
        "config": cfg,
        "backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "data": {
            "dataset": "UCI multiple features (mfeat), embedded",
            "views": list(views),
            "split_seed": SPLIT_SEED,
            "n_train_teacher": int(len(data["teacher_train"][1])),
            "n_train_student": int(len(data["student_train"][1])),
            "n_test": int(len(y_t)),
            "noise_std": noise,
            "test_noise_seed": TEST_NOISE_SEED if noise else None,
            "few_labels_per_class": FEW_LABELS_PER_CLASS
            if setting == "few-labels"
            else None,
        },
        "teacher": teacher_result,
        "student_architecture": {"params": student_params, "size_bytes": student_size},
        "methods": summary,
        "paired_vs_kd": paired,
        "skipped_controls": skipped,
        "best_student": {
            "method": best_method,
            "seed": best_run["seed"],
            "accuracy": best_run["accuracy"],
            "file": "student.keras",
            "note": "the method with the best mean test accuracy, its best seed",
        },
        "wall_time_s": time.perf_counter() - wall_start,
    }
    results_dict["conclusion"] = _conclusion(setting, cfg, paired, summary, n_control)
    markdown = _markdown(results_dict)
    if export:
        from keras_gramkd.export import export_student

        # int8 calibration must see inputs like the deployed student's: noisy
        # ones in the noisy setting (clean ones give too narrow ranges).
        calibration = data["student_train"][0]
        if noise:
            calibration = add_fixed_noise(calibration, TEST_NOISE_SEED + 2)
        report = export_student(
            best,
            os.path.join(out, "export"),
            formats=("tflite", "onnx"),
            quantize=(None, "float16", "dynamic", "int8"),
            representative_data=calibration,
            sample_data=data["student_test"][0],
            check=False,
        )
        results_dict["export"] = report.to_dict()
        markdown += "\n## Export of the best student\n\n" + report.to_markdown() + "\n"
        if verbose:
            console.print(str(report))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results_dict, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown)
    if verbose:
        _print_tables(console, results_dict, out)
    return results_dict


def _summarise(results, teacher, views):
    labels_mean = float(np.mean([r["accuracy"] for r in results["labels"]]))
    gap = teacher["accuracy"] - labels_mean
    summary = {}
    for name, runs in results.items():
        if not runs:
            continue
        acc = [r["accuracy"] for r in runs]
        mean = float(np.mean(acc))
        summary[name] = {
            "label": {**METHODS, **CONTROLS}[name],
            "control": name in CONTROLS,
            "seeds": [r["seed"] for r in runs],
            "accuracy": acc,
            "accuracy_mean": mean,
            "accuracy_std": _std(acc),
            "gap_closed": (mean - labels_mean) / gap if gap > 0 else None,
            "missing_modality": {v: [r["missing"][v] for r in runs] for v in views},
            "missing_mean": [r["missing_mean"] for r in runs],
            "missing_mean_mean": float(np.mean([r["missing_mean"] for r in runs])),
            "gram_gap": [r["gram_gap"] for r in runs],
            "gram_gap_mean": float(np.mean([r["gram_gap"] for r in runs])),
            "train_time_s": [r["train_time_s"] for r in runs],
            "train_time_mean_s": float(np.mean([r["train_time_s"] for r in runs])),
        }
    return summary


def _paired(runs, reference):
    ref = {r["seed"]: r["accuracy"] for r in reference}
    seeds = [r["seed"] for r in runs if r["seed"] in ref]
    diff = [r["accuracy"] - ref[r["seed"]] for r in runs if r["seed"] in ref]
    return {
        "reference": "kd",
        "seeds": seeds,
        "diff": diff,
        "mean": float(np.mean(diff)),
        "std": _std(diff),
    }


def _plot_grams(out, t_feats, y, student, data, views, normalize, method, run):
    from keras_gramkd.plots import plot_gram_matrices

    _, s_feats = _feature_model(student, "s", views).predict(
        data["student_test"][0], batch_size=1000, verbose=0
    )
    t, s = _grams(t_feats, normalize), _grams(s_feats, normalize)
    per_class = {
        f"digit {c}": (t[y == c].mean(0), s[y == c].mean(0)) for c in np.unique(y)
    }
    fig = plot_gram_matrices(
        t.mean(0),
        s.mean(0),
        list(views),
        class_grams=per_class,
        title=(
            f"Modality Gram ({normalize}), test set: teacher vs student "
            f"({METHODS[method]}, seed {run['seed']})"
        ),
    )
    fig.savefig(os.path.join(out, "gram.png"), format="png", dpi=60)


def _plot_curves(out, histories):
    from keras_gramkd.plots import plot_training_curves

    keys = ["loss", "task_loss", "kd_loss", "gram_loss", "accuracy"]
    found = {k for h in histories.values() for k in h}
    plot_training_curves(
        {METHODS.get(n, CONTROLS.get(n)): h for n, h in histories.items()},
        path=os.path.join(out, "curves.png"),
        keys=[k for k in keys if k in found or f"val_{k}" in found],
    )


def _rows(results):
    """Table rows (strings) shared by the terminal and markdown tables."""
    teacher = results["teacher"]
    rows = [
        [
            "teacher",
            f"{100 * teacher['accuracy']:.2f}",
            "",
            f"{100 * teacher['missing_mean']:.2f}",
            "0",
            "",
            f"{teacher['params']:,}",
            f"{teacher['size_bytes'] / 1024:.0f}",
            f"{teacher['train_time_s']:.1f}",
        ]
    ]
    for name, m in results["methods"].items():
        paired = results["paired_vs_kd"].get(name)
        rows.append(
            [
                m["label"],
                f"{100 * m['accuracy_mean']:.2f}±{100 * m['accuracy_std']:.2f}",
                ""
                if m["gap_closed"] is None
                else f"{round(100 * m['gap_closed']) + 0}%",
                f"{100 * m['missing_mean_mean']:.2f}",
                f"{m['gram_gap_mean']:.3f}",
                "—"
                if paired is None
                else f"{100 * paired['mean']:+.2f}±{100 * paired['std']:.2f}",
                f"{m['params']:,}",
                f"{m['size_bytes'] / 1024:.0f}",
                f"{m['train_time_mean_s']:.1f}",
            ]
        )
    return rows


HEADERS = [
    "model",
    "acc %",
    "gap closed",
    "1 view 0 %",
    "|ΔG|",
    "Δ vs KD",
    "params",
    "KiB",
    "train s",
]


def _missing_rows(results):
    views = results["data"]["views"]
    rows = [
        ["teacher"]
        + [f"{100 * results['teacher']['missing_modality'][v]:.1f}" for v in views]
    ]
    for m in results["methods"].values():
        rows.append(
            [m["label"]]
            + [f"{100 * np.mean(m['missing_modality'][v]):.1f}" for v in views]
        )
    return ["model"] + [f"no {v}" for v in views], rows


def _title(results):
    c, d = results["config"], results["data"]
    return (
        f"gramkd demo: setting {c['setting']}, {len(c['views'])} views, "
        f"{d['n_train_student']} student / {d['n_train_teacher']} teacher train, "
        f"{d['n_test']} test, {c['seeds']} seed(s), {c['epochs']} epochs, "
        f"gram {c['gram_normalize']} x{c['gram_weight']:g}, kd x{c['kd_weight']:g}, "
        f"T={c['temperature']:g}, backend {results['backend']}"
    )


def _markdown(results):
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    def table(headers, rows):
        lines = [line(headers), "|" + "---|" * len(headers)]
        return "\n".join(lines + [line(r) for r in rows])

    c = results["config"]
    m_headers, m_rows = _missing_rows(results)
    per_seed = results["paired_vs_kd"]["gram"]
    seeds = ", ".join(
        f"seed {s}: {100 * d:+.2f}"
        for s, d in zip(per_seed["seeds"], per_seed["diff"], strict=True)
    )
    notes = (
        "Columns: test accuracy (mean±std over seeds); share of the teacher–"
        "student gap closed, (acc − labels-only acc) / (teacher acc − "
        "labels-only acc); accuracy with one view zeroed at test time (mean "
        "over views); |ΔG|, the mean absolute difference between the teacher's "
        f"and the student's per-sample {c['gram_normalize']!r} Gram matrices "
        "on the test split; paired accuracy difference to labels+KD (points, "
        "mean±std over seeds); parameters; size of the saved .keras file; "
        "training time per run (tracing included). "
        + (
            f"Controls ran on {c['control_seeds']} of {c['seeds']} seed(s)."
            if c["control_seeds"]
            else "Controls were not run (quick run or --control-seeds 0)."
        )
        + "".join(
            f" Control {name} not run: {why}."
            for name, why in results["skipped_controls"].items()
        )
    )
    return "\n\n".join(
        [
            f"# {_title(results)}",
            table(HEADERS, _rows(results)),
            "Accuracy (%) with one view zeroed at test time (mean over seeds):",
            table(m_headers, m_rows),
            f"Paired Gram − KD per seed (points): {seeds}.",
            notes,
            f"**Conclusion.** {results['conclusion']}",
            f"Wall time {results['wall_time_s']:.0f} s.\n",
        ]
    )


def _print_tables(console, results, out):
    table = new_table(console, title=_title(results), title_justify="left")
    for h in HEADERS:
        table.add_column(h, justify="left" if h == "model" else "right")
    for row in _rows(results):
        table.add_row(*row)
    console.print(table)
    m_headers, m_rows = _missing_rows(results)
    missing = new_table(console, title="accuracy % with one view zeroed at test time")
    for h in m_headers:
        missing.add_column(h, justify="left" if h == "model" else "right")
    for row in m_rows:
        missing.add_row(*row)
    console.print(missing)
    per_seed = results["paired_vs_kd"]["gram"]
    console.print(
        "Paired Gram − KD per seed (points): "
        + ", ".join(
            f"seed {s}: {100 * d:+.2f}"
            for s, d in zip(per_seed["seeds"], per_seed["diff"], strict=True)
        )
    )
    console.print(f"[bold]Conclusion.[/bold] {results['conclusion']}")
    for name, why in results["skipped_controls"].items():
        console.print(f"Control {name} not run: {why}.")
    console.print(
        f"Wrote results.json, results.md, gram.png, curves.png, student.keras "
        f"to {out} ({results['wall_time_s']:.0f} s)."
    )


# ----------------------------------------------------------------------------
# Command line


def add_demo_arguments(parser):
    """Adds the `gramkd demo` options to an `argparse.ArgumentParser`."""
    parser.add_argument(
        "--views",
        nargs="+",
        default=None,
        help=f"views to use, from {', '.join(MFEAT_VIEWS)} (default all; "
        "space- or comma-separated)",
    )
    parser.add_argument(
        "--setting",
        choices=SETTINGS,
        default=DEFAULT_SETTING,
        help=f"what the student sees (default {DEFAULT_SETTING}: the largest "
        "measured teacher-student gap)",
    )
    d = DEFAULTS
    for flag, kind, what in (
        ("--epochs", int, "student epochs"),
        ("--teacher-epochs", int, "teacher epochs"),
        ("--seeds", int, "student seeds"),
        ("--gram-weight", float, "weight of the modality Gram term"),
        ("--kd-weight", float, "weight of the logit KD term"),
        ("--temperature", float, "KD temperature"),
    ):
        default = d[flag[2:].replace("-", "_")]
        parser.add_argument(
            flag, type=kind, default=None, help=f"{what} (default {default:g})"
        )
    parser.add_argument(
        "--gram-normalize",
        choices=GRAM_NORMALIZE_CHOICES,
        default=None,
        help=f"Gram matrix normalisation (default {d['gram_normalize']})",
    )
    parser.add_argument(
        "--modality-dropout",
        type=float,
        default=0.0,
        metavar="P",
        help="zero each student view with probability P at training time",
    )
    parser.add_argument(
        "--control-seeds",
        type=int,
        default=None,
        help="seeds for the Gram controls (default all, none with --quick; 0 "
        "skips them)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (< 60 s): 1 seed, 2 epochs, no controls",
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default runs/demo-<timestamp>/)"
    )
    parser.add_argument(
        "--export",
        action="store_true",
        help="export the best student to TFLite and ONNX (float32, float16, "
        "dynamic, int8), verify each file and add the table to the results "
        '(needs pip install "keras-gramkd[export]")',
    )
    return parser


def run_demo(args):
    """Runs `gramkd demo` from parsed arguments; returns the exit code."""
    views = None
    if args.views:
        views = [v for item in args.views for v in item.split(",") if v]
    options = dict(
        views=views,
        setting=args.setting,
        epochs=args.epochs,
        teacher_epochs=args.teacher_epochs,
        seeds=args.seeds,
        gram_weight=args.gram_weight,
        kd_weight=args.kd_weight,
        temperature=args.temperature,
        gram_normalize=args.gram_normalize,
        modality_dropout=args.modality_dropout,
        controls=args.control_seeds != 0,
        control_seeds=args.control_seeds,
        quick=args.quick,
    )
    try:
        _resolve_config(**options, train_per_class=None)
    except ValueError as error:
        print(f"gramkd demo: error: {error}", file=sys.stderr)
        return 2
    results = run_study(**options, out=args.out, export=args.export)
    if args.export and not results["export"]["ok"]:
        print(
            "gramkd demo: error: an exported file missed its tolerance; see the "
            "export table in results.md.",
            file=sys.stderr,
        )
        return 1
    return 0
