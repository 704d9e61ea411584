"""Shared helpers of the benchmarks: cases, variants, counting, timing, output.

Import this module only after `KERAS_BACKEND` is set: it imports keras.
"""

import importlib
import json
import math
import os
import platform
import resource
import statistics
import time

import keras
import numpy as np
from keras import ops

from keras_gramkd import Distiller, ModalityGram, ModalityStack, zoo
from keras_gramkd.demo.settings import DEFAULT_SETTING, NOISE_STD, load_setting

N_CLASSES = 10
TEMPERATURE = 4.0
SYNTHETIC_INPUT_DIM = 32
# key: (short name, description)
VARIANTS = {
    "a": ("student alone", "the student compiled and fitted on its own"),
    "b": ("keras KD", "keras.distillation.Distiller + LogitsDistillation"),
    "c": ("keras KD + feature", "(b) + FeatureDistillation on {feature_layer}"),
    "d": ("KD + Gram", "keras_gramkd.Distiller, KD + Gram"),
    "e": ("KD + Gram, cached", "(d) from the teacher cache (keras_gramkd.cache)"),
    "kd_only": ("KD only", "keras_gramkd.Distiller with gram_weight=0"),
    "d_unchecked": ("KD + Gram, unchecked", "(d) with on_bad_sample='unchecked'"),
    "e_unchecked": ("cached, unchecked", "(e) with on_bad_sample='unchecked'"),
    "stack_only": (
        "KD + features, no Gram",
        "(d) with a zero loss of the stacked features: no Gram arithmetic",
    ),
    "gram_raw": (
        "KD + raw Gram",
        "(d) with ModalityGram(normalize='none'): no l2 normalisation",
    ),
}


# ----------------------------------------------------------------------------
# Counting forward passes


_ACTIVE_PROBES = []


class ForwardCounter(keras.layers.Layer):
    """Identity on a network's logits that counts its forward passes.

    Two counts: `executed`, a non-trainable variable incremented by every
    forward pass the compiled step runs (a state update like BatchNorm's moving
    statistics, so a duplicate forward shows up here even where the compiler
    prunes the arithmetic of its unused outputs); and the Python calls made
    while a `StepProbe` traces or runs a train step.
    """

    def __init__(self, role, **kwargs):
        super().__init__(**kwargs)
        self.role = role
        self.executed = self.add_weight(
            shape=(), dtype="int32", initializer="zeros", trainable=False
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def call(self, logits):
        if _ACTIVE_PROBES:
            _ACTIVE_PROBES[-1].calls[self.role] += 1
        self.executed.assign_add(ops.ones((), dtype="int32"))
        return logits


class StepProbe:
    """Wraps `model.train_step` to count what happens inside one step.

    Under `tf.function` and `jax.jit` the Python body runs when the step is
    traced, so `calls / steps` is the forward calls per traced step; under
    eager torch it runs every step. `ops` is the size of one step: operations
    in the traced TensorFlow graph, or aten operations dispatched by the first
    torch step (forward, backward and optimizer); None under JAX, whose XLA
    compilation fuses operations anyway.
    """

    def __init__(self, model):
        self.steps = 0
        self.calls = {"student": 0, "teacher": 0}
        self.ops = None
        train_step = model.train_step
        count_ops = _OP_COUNTERS.get(keras.backend.backend())

        def probed_train_step(*args, **kwargs):
            self.steps += 1
            _ACTIVE_PROBES.append(self)
            try:
                if count_ops is None or not count_ops.wanted(self):
                    return train_step(*args, **kwargs)
                with count_ops(self):
                    return train_step(*args, **kwargs)
            finally:
                _ACTIVE_PROBES.pop()

        model.train_step = probed_train_step

    def per_step(self, role):
        return self.calls[role] / self.steps if self.steps else 0.0


class _GraphOps:
    """Counts the operations a traced TensorFlow step adds to its graph."""

    @staticmethod
    def wanted(probe):
        import tensorflow as tf

        return tf.inside_function()

    def __init__(self, probe):
        import tensorflow as tf

        self.probe = probe
        self.graph = tf.compat.v1.get_default_graph()

    def __enter__(self):
        self.start = len(self.graph.get_operations())

    def __exit__(self, *exc):
        self.probe.ops = len(self.graph.get_operations()) - self.start


class _DispatchedOps:
    """Counts the aten operations one eager torch step dispatches."""

    @staticmethod
    def wanted(probe):
        return probe.ops is None

    def __init__(self, probe):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Count(TorchDispatchMode):
            def __torch_dispatch__(mode, func, types, args=(), kwargs=None):
                probe.ops += 1
                return func(*args, **(kwargs or {}))

        self.probe, self.mode = probe, Count()

    def __enter__(self):
        self.probe.ops = 0
        self.mode.__enter__()

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


_OP_COUNTERS = {"tensorflow": _GraphOps, "torch": _DispatchedOps}


def counted(model, role):
    """`model` with a `ForwardCounter` on its logits (same layers and weights)."""
    counter = ForwardCounter(role, name=f"{role}_forward_counter")
    return keras.Model(model.input, counter(model.output), name=role)


def counter_of(model):
    return model.get_layer(f"{model.name}_forward_counter")


# ----------------------------------------------------------------------------
# Networks and cases


def encoder_net(prefix, input_dims, width, embed, attention):
    """Per-modality Dense(width, relu) -> Dense(embed) encoders, then a head.

    The embedding of modality ``m`` is layer ``{prefix}_{m}``. With `attention`
    the embeddings are fused by 4-head self-attention and averaged (like the
    demo's teacher); otherwise they are concatenated (like the demo's student).
    """
    layers = keras.layers
    inputs = {m: keras.Input((dim,), name=m) for m, dim in input_dims.items()}
    embeds = [
        layers.Dense(embed, name=f"{prefix}_{m}")(
            layers.Dense(width, activation="relu", name=f"{prefix}_{m}_hidden")(x)
        )
        for m, x in inputs.items()
    ]
    if attention:
        tokens = ModalityStack()(embeds)
        heads = 4 if embed >= 4 else 1
        fused = layers.MultiHeadAttention(heads, max(embed // heads, 1))(tokens, tokens)
        h = layers.GlobalAveragePooling1D()(layers.Add()([tokens, fused]))
    else:
        h = layers.Concatenate()(embeds)
    logits = layers.Dense(N_CLASSES, name=f"{prefix}_logits")(h)
    return keras.Model(inputs, logits)


def renamed_clone(model, prefix):
    """A fresh copy of `model` (new weights) whose layers start with `prefix`."""

    def clone_layer(layer):
        config = layer.get_config()
        _, _, rest = layer.name.partition("t_")
        config["name"] = f"{prefix}_{rest or layer.name}"
        config["trainable"] = True  # a distilled teacher's layers are frozen
        return layer.__class__.from_config(config)

    return keras.models.clone_model(model, clone_function=clone_layer)


class Case:
    """A teacher, a student builder, batches and the layer names they share.

    Args:
        name, description: how the case is shown.
        teacher: the (uncounted) teacher.
        build_student: returns a fresh (uncounted) student.
        x, y: training data, a whole number of batches.
        batch_size: the batch size.
        modalities: modality names; layers ``t_{m}`` and ``s_{m}`` hold the
            embeddings of the teacher and the student.
    """

    def __init__(
        self, name, description, teacher, build_student, x, y, batch_size, modalities
    ):
        self.name = name
        self.description = description
        self.teacher = counted(teacher, "teacher")
        self._build_student = build_student
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.modalities = list(modalities)
        self.feature_layer = f"s_{self.modalities[0]}"
        self.steps_per_epoch = len(y) // batch_size

    def student(self):
        keras.utils.set_random_seed(1)
        return counted(self._build_student(), "student")

    def maps(self):
        return (
            {m: f"t_{m}" for m in self.modalities},
            {m: f"s_{m}" for m in self.modalities},
        )

    def info(self, student):
        t_mods, s_mods = self.maps()
        base = self.teacher
        return {
            "description": self.description,
            "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "modalities": len(self.modalities),
            "teacher_params": int(base.count_params()),
            "student_params": int(student.count_params()),
            "teacher_embed_dim": int(base.get_layer(t_mods[self.modalities[0]]).units),
            "student_embed_dim": int(
                student.get_layer(s_mods[self.modalities[0]]).units
            ),
            "feature_layer": self.feature_layer,
        }


def _resample(x, y, n, seed=0):
    """`n` samples drawn from (x, y): a whole number of batches per epoch."""
    idx = np.random.default_rng(seed).integers(0, len(y), size=n)
    return {k: v[idx] for k, v in x.items()}, y[idx]


def demo_case(steps, teacher_sized=False, batch_size=None, views=None):
    """The demo's teacher and student (or a student as large as the teacher).

    `views` picks some of the six views (default all), as `gramkd demo --views`.
    """
    batch_size = batch_size or zoo.BATCH_SIZE
    data = load_setting(DEFAULT_SETTING, views)
    x, y = _resample(*data.student_train, steps * batch_size)
    dims = {v: a.shape[1] for v, a in x.items()}
    keras.utils.set_random_seed(0)
    teacher = zoo.build_teacher(dims)
    if teacher_sized:
        name = "teacher-sized"
        description = (
            f"the demo's teacher and a fresh copy of it as the student "
            f"({len(dims)} views)"
        )

        def build_student():
            return renamed_clone(teacher, "s")

    else:
        name = "demo"
        description = (
            f"the demo's teacher and student (gramkd demo, noisy setting, "
            f"{len(dims)} views)"
        )

        def build_student():
            return zoo.build_student(dims, noise_std=NOISE_STD)

    return Case(name, description, teacher, build_student, x, y, batch_size, dims)


def synthetic_case(modalities, embed, batch_size, steps, attention=True):
    """Random data; an attention teacher and a narrow student, both `embed` wide."""
    rng = np.random.default_rng(0)
    names = [f"m{i}" for i in range(modalities)]
    n = steps * batch_size
    x = {
        m: rng.standard_normal((n, SYNTHETIC_INPUT_DIM)).astype("float32")
        for m in names
    }
    y = rng.integers(0, N_CLASSES, size=n).astype("int32")
    dims = dict.fromkeys(names, SYNTHETIC_INPUT_DIM)
    keras.utils.set_random_seed(0)
    teacher = encoder_net("t", dims, width=4 * 64, embed=embed, attention=attention)
    fusion = "attention" if attention else "concatenation"
    description = (
        f"synthetic: M={modalities}, d={embed}, batch {batch_size}; teacher "
        f"256-wide encoders + {fusion}, student 64-wide encoders"
    )
    return Case(
        "synthetic",
        description,
        teacher,
        lambda: encoder_net("s", dims, width=64, embed=embed, attention=False),
        x,
        y,
        batch_size,
        names,
    )


# ----------------------------------------------------------------------------
# Variants


def _sparse_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _feature_loss(teacher_width, student_width):
    """MSE, after a fixed random projection of the teacher when widths differ."""
    if teacher_width == student_width:
        return "mse"
    rng = np.random.default_rng(0)
    projection = rng.standard_normal((teacher_width, student_width)).astype("float32")
    projection /= np.sqrt(teacher_width)

    def projected_mse(teacher_features, student_features):
        projected = ops.matmul(teacher_features, projection)
        return ops.mean(ops.square(projected - student_features), axis=-1)

    return projected_mse


def _stack_only_loss(teacher_features, student_features, **kwargs):
    """A zero that depends on both stacked feature tensors: no Gram arithmetic."""
    return 0.0 * (ops.mean(student_features) + ops.mean(teacher_features))


def build_variant(case, name, jit_compile="auto"):
    """A `Run` of variant `name`, compiled; its x is None when unavailable."""
    student = case.student()
    t_mods, s_mods = case.maps()
    note = ""
    x = case.x
    if name == "a":
        model = student
    elif name in ("b", "c"):
        losses = [
            keras.distillation.LogitsDistillation(
                temperature=TEMPERATURE, loss=keras.losses.KLDivergence()
            )
        ]
        if name == "c":
            t_layer = t_mods[case.modalities[0]]
            widths = [
                m.get_layer(layer).output.shape[-1]
                for m, layer in ((case.teacher, t_layer), (student, case.feature_layer))
            ]
            losses.append(
                keras.distillation.FeatureDistillation(
                    loss=_feature_loss(*widths),
                    teacher_layer_name=t_layer,
                    student_layer_name=case.feature_layer,
                )
            )
        model = keras.distillation.Distiller(
            case.teacher, student, distillation_losses=losses, student_loss_weight=0.5
        )
    else:
        gram_loss = {
            "stack_only": _stack_only_loss,
            "gram_raw": ModalityGram(normalize="none"),
        }.get(name)
        model = Distiller(
            case.teacher,
            student,
            teacher_modalities=t_mods,
            student_modalities=s_mods,
            gram_weight=0.0 if name == "kd_only" else 1.0,
            temperature=TEMPERATURE,
            gram_loss=gram_loss,
            on_bad_sample="unchecked" if name.endswith("_unchecked") else "raise",
        )
        if name in ("e", "e_unchecked"):
            x, note = _cached_inputs(model, case)
    model.compile(keras.optimizers.Adam(1e-3), _sparse_ce(), jit_compile=jit_compile)
    counters = {"student": counter_of(student), "teacher": counter_of(case.teacher)}
    return Run(name, model, x, case.y, case.batch_size, counters, note)


def _cached_inputs(distiller, case):
    """The teacher-cache inputs of variant (e), or (None, why not)."""
    try:
        from keras_gramkd.cache import TeacherCache
    except ImportError as error:
        return None, f"not available: keras_gramkd.cache ({error})"
    # The cache fingerprints the teacher's weights, its counter included: build
    # and attach with the counter at 0, the value each fit starts from.
    counter = counter_of(case.teacher).executed
    counter.assign(0)
    start = time.perf_counter()
    cache = TeacherCache.build(distiller, case.x, batch_size=case.batch_size)
    seconds = time.perf_counter() - start
    counter.assign(0)
    return cache.attach(case.x), f"cache built in {seconds:.2f} s (once)"


# ----------------------------------------------------------------------------
# Timing


class _EpochTimer(keras.callbacks.Callback):
    """Wall and CPU time of each epoch; waits for the last loss (JAX is async).

    The CPU time (all threads of this process) is less sensitive than the wall
    time to other processes competing for the cores.
    """

    def __init__(self):
        super().__init__()
        self.times = []

        self.cpu_times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter(), time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        float(logs["loss"])
        self.times.append(time.perf_counter() - self._start[0])
        self.cpu_times.append(time.process_time() - self._start[1])


class Run:
    """One variant ready to fit: a compiled model, its data, its counters."""

    def __init__(self, name, model, x, y, batch_size, counters, note=""):
        """`x` may be a `keras.utils.PyDataset` or a `tf.data.Dataset` of the
        batches (`y` and `batch_size` then only count the steps), fitted with
        ``shuffle=False``: it orders its batches itself."""
        self.name, self.note = name, note
        self.model, self.x, self.y = model, x, y
        self.batch_size = batch_size
        self.steps_per_epoch = len(y) // batch_size
        self.probe = StepProbe(model)
        self.counters = counters
        self.executed = dict.fromkeys(("student", "teacher"), 0)
        self.steps = 0
        self.epoch_times, self.cpu_times = [], []
        self.repeat_medians, self.repeat_cpu_medians = [], []

    def fit(self, epochs, timed):
        for counter in self.counters.values():
            counter.executed.assign(0)
        timer = _EpochTimer()
        if isinstance(self.x, dict):  # arrays
            data = {"x": self.x, "y": self.y, "batch_size": self.batch_size}
        else:  # a dataset that orders its batches itself
            data = {"x": self.x, "shuffle": False}
        self.model.fit(**data, epochs=epochs, verbose=0, callbacks=[timer])
        for role, counter in self.counters.items():
            self.executed[role] += int(ops.convert_to_numpy(counter.executed.value))
        self.steps += epochs * self.steps_per_epoch
        if timed:
            self.epoch_times += timer.times
            self.cpu_times += timer.cpu_times

    def end_repeat(self, start):
        """Closes a repeat: the median of the epochs timed since `start`."""
        self.repeat_medians.append(statistics.median(self.epoch_times[start:]))
        self.repeat_cpu_medians.append(statistics.median(self.cpu_times[start:]))

    def result(self):
        """Timings and counts; with repeats, the median of the repeats' medians."""
        walls = self.repeat_medians or [statistics.median(self.epoch_times)]
        cpus = self.repeat_cpu_medians or [statistics.median(self.cpu_times)]
        median = statistics.median(walls)
        return {
            "epoch_times_s": self.epoch_times,
            "epoch_cpu_times_s": self.cpu_times,
            "repeat_median_epoch_s": walls,
            "repeat_median_epoch_cpu_s": cpus,
            "repeat_spread": spread(walls),
            "median_epoch_s": median,
            "median_epoch_cpu_s": statistics.median(cpus),
            "median_step_ms": 1e3 * median / self.steps_per_epoch,
            "steps_per_s": self.steps_per_epoch / median,
            "ops_per_step": self.probe.ops,
            "student_forwards_traced": _count(self.probe.per_step("student")),
            "teacher_forwards_traced": _count(self.probe.per_step("teacher")),
            "student_forwards_executed": _count(self.executed["student"] / self.steps),
            "teacher_forwards_executed": _count(self.executed["teacher"] / self.steps),
            "trainable_variables": len(self.model.trainable_variables),
            "jit_compile": self.model.jit_compile,
        }


def _count(value):
    """An integer count per step, or the float when it is not whole."""
    return int(round(value)) if math.isclose(value, round(value)) else value


def measure(runs, warmup, rounds, repeats=1):
    """Fits every run `warmup` epochs, then `repeats` times `rounds` timed
    epochs, interleaved.

    Each round fits each run for one epoch, in an order rotated every round so
    that no variant always follows the same neighbour; machine load drifting
    over the run then spreads over all variants. Each repeat is a whole
    measurement of its own (its median per run, `Run.repeat_medians`): how far
    the repeats disagree is the spread reported beside every ratio.
    """
    for run in runs:
        run.fit(warmup, timed=False)
    for _ in range(repeats):
        starts = [len(run.epoch_times) for run in runs]
        for i in range(rounds):
            for run in runs[i % len(runs) :] + runs[: i % len(runs)]:
                run.fit(1, timed=True)
        for run, start in zip(runs, starts, strict=True):
            run.end_repeat(start)


def spread(values):
    """(max - min) / median of repeated measurements: 0.05 is 5 %."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    return (max(values) - min(values)) / statistics.median(values)


def ratio_over_repeats(num, den, key="repeat_median_epoch_s"):
    """The median over repeats of num/den (each repeat's own ratio), and the
    spread of those ratios; None where either run is missing."""
    if num is None or den is None:
        return None, None
    ratios = [a / b for a, b in zip(num[key], den[key], strict=True)]
    return statistics.median(ratios), spread(ratios)


def gram_term_ms(batch, modalities, d_teacher, d_student, jit):
    """Milliseconds of the Gram loss alone: its value and the student's gradient.

    The default `ModalityGram()` of random (batch, M, d) teacher and student
    features, compiled as the train step is (`jit`: XLA under TensorFlow and
    JAX; TensorFlow otherwise runs a `tf.function` graph, torch eagerly),
    less the time of the same call with a trivial loss (`mean(student)`): what
    remains is the Gram term's own operations, its per-operation overheads
    included.
    """
    rng = np.random.default_rng(0)
    teacher, student = (
        rng.standard_normal((batch, modalities, d)).astype("float32")
        for d in (d_teacher, d_student)
    )
    gram = value_and_grad_ms(ModalityGram(), teacher, student, jit)
    trivial = value_and_grad_ms(lambda t, s: ops.mean(s), teacher, student, jit)
    return gram - trivial


def value_and_grad_ms(loss, teacher, student, jit, block_s=0.05, blocks=7):
    """Median milliseconds of one `loss(teacher, student)` value-and-gradient.

    Each of the `blocks` timed blocks repeats the call for about `block_s`.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=bool(jit))
        def step(t, s):
            with tf.GradientTape() as tape:
                tape.watch(s)
                value = loss(t, s)
            return value, tape.gradient(value, s)

        teacher, student = tf.constant(teacher), tf.constant(student)

        def call():
            step(teacher, student)[1].numpy()

    elif backend == "jax":
        import jax

        grad = jax.value_and_grad(lambda s, t: loss(t, s))
        step = jax.jit(grad) if jit else grad

        def call():
            jax.block_until_ready(step(student, teacher))

    else:
        import torch

        teacher = torch.from_numpy(teacher)
        student = torch.from_numpy(student).requires_grad_()

        def call():
            loss(teacher, student).backward()
            student.grad = None

    call()
    start = time.perf_counter()
    call()
    repeats = max(3, int(block_s / (time.perf_counter() - start)))
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        times.append((time.perf_counter() - start) / repeats)
    return 1e3 * statistics.median(times)


def gram_flops(batch, modalities, d_teacher, d_student):
    """Floating-point operations of the Gram term per step (forward + backward).

    Two Gram matrices (2·B·M²·d each, teacher and student) and the student's
    backward through A·Aᵀ (twice its forward); the O(B·M·d) normalisation and
    the O(B·M²) loss are left out.
    """
    return 2 * batch * modalities**2 * (d_teacher + 3 * d_student)


def peak_rss_mib():
    """Peak resident set size of this process so far (ru_maxrss), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------
# Output


def machine_info():
    backend = keras.backend.backend()
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [
                line.split(":", 1)[1].strip() for line in f if "model name" in line
            ]
        cpu = names[0] if names else cpu
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_average_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "backend": backend,
        "keras": keras.__version__,
        "backend_version": importlib.import_module(backend).__version__,
        "numpy": np.__version__,
    }


def write_json(path, data):
    data["machine"]["load_average_end"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def print_table(title, headers, rows, left=2):
    """Prints a rich table; the first `left` columns are left-aligned."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    table = Table(title=title, title_justify="left")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < left else "right")
    for row in rows:
        table.add_row(*[str(cell) for cell in row])
    console.print(table)


def default_json(script):
    backend = keras.backend.backend()
    return os.path.join("runs", "benchmarks", f"{script}-{backend}.json")
