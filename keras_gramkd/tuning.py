"""KerasTuner search over the Distiller's loss weights, temperature and learning rate.

`DistillerHyperModel` is a `keras_tuner.HyperModel`: give it a trained teacher and a
function that builds a student, and any KerasTuner tuner (`RandomSearch`,
`BayesianOptimization`, `Hyperband`) searches

    task_weight     fixed at 1
    kd_weight       uniform in [0, 4]
    use_gram        True / False: False sets gram_weight = 0, so the search tells
                    whether the Gram term pays at all on your data
    gram_weight     log-uniform in [1e-2, 1e2] (only when use_gram is True)
    temperature     one of 1, 2, 4, 8
    learning_rate   log-uniform in [1e-4, 1e-2] (Adam)

plus whatever hyperparameters `build_student(hp)` declares. `search_space` fixes a
value or changes a range.

**The objective is a student metric** (``val_accuracy`` by default), never
``val_loss``: the Distiller's loss is ``task_weight·task + kd_weight·kd +
gram_weight·gram``, so its scale is set by the very weights being tuned (a trial with
gram_weight=0.01 has a smaller loss than one with 100 whatever the student learnt),
and comparing it across trials ranks weights, not students.

**The teacher is shared**: built and trained once by you, used frozen by every trial,
never retrained, copied or written to disk by the tuner. KerasTuner checkpoints the
model at each best epoch with ``model.save_weights``; the models this hypermodel builds
are `StudentCheckpointDistiller`s, whose ``save_weights``/``load_weights`` cover the
student only, so each ``trial_*/checkpoint.weights.h5`` is a student checkpoint (load
it with ``student.load_weights``). ``tuner.get_best_models(1)[0]`` rebuilds the
Distiller around the shared teacher and loads that checkpoint: its ``.student`` is the
best trained student.

`keras_tuner` is imported on first use of `DistillerHyperModel` (install it with
``pip install "keras-gramkd[tune]"``), so importing this module is cheap.
"""

import datetime
import inspect
import json
import math
import numbers
import os
import sys

import keras
import numpy as np

from keras_gramkd.console import make_console, new_table
from keras_gramkd.distiller import Distiller

TUNE_EXTRA_HINT = (
    'KerasTuner is not installed; install it with: pip install "keras-gramkd[tune]"'
)

# name -> default: a number (fixed), a (low, high) range, or a list of choices.
DEFAULT_SEARCH_SPACE = {
    "task_weight": 1.0,
    "kd_weight": (0.0, 4.0),
    "use_gram": [True, False],
    "gram_weight": (1e-2, 1e2),
    "temperature": [1.0, 2.0, 4.0, 8.0],
    "learning_rate": (1e-4, 1e-2),
}
_LOG_SCALE = ("gram_weight", "learning_rate")
_POSITIVE = ("temperature", "learning_rate")  # > 0; the weights are >= 0
TUNERS = ("random", "bayesian", "hyperband")
FORBIDDEN_OBJECTIVES = ("loss", "val_loss")


def _import_keras_tuner():
    try:
        import keras_tuner
    except ImportError as error:
        raise ImportError(TUNE_EXTRA_HINT) from error
    if keras.backend.backend() == "tensorflow":
        # KerasTuner 1.4 imports tensorboard in every trial on this backend, and
        # TensorFlow >= 2.20 no longer installs it.
        try:
            import tensorboard  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "KerasTuner needs tensorboard on the TensorFlow backend; install it "
                'with: pip install tensorboard (or pip install "keras-gramkd[tune]")'
            ) from error
    return keras_tuner


# ----------------------------------------------------------------------------
# Search space


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_value(name, value):
    if name == "use_gram":
        if not isinstance(value, bool):
            raise ValueError(
                f"search_space['use_gram'] values must be bools; got {value!r}."
            )
        return value
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(
            f"search_space[{name!r}] values must be finite numbers; got {value!r}."
        )
    if value < 0 or (name in _POSITIVE and value == 0):
        bound = "> 0" if name in _POSITIVE else ">= 0"
        raise ValueError(
            f"search_space[{name!r}] values must be {bound}; got {value!r}."
        )
    return float(value)


def _parse_entry(name, spec):
    """An entry as ("fixed", v), ("choice", values) or ("range", lo, hi, sampling)."""
    if isinstance(spec, list):
        if not spec:
            raise ValueError(f"search_space[{name!r}] is an empty list of choices.")
        values = list(dict.fromkeys(_check_value(name, v) for v in spec))
        return ("fixed", values[0]) if len(values) == 1 else ("choice", values)
    if isinstance(spec, tuple):
        if name == "use_gram":
            raise ValueError("search_space['use_gram'] is a bool or a list of bools.")
        sampling = "log" if name in _LOG_SCALE else "linear"
        if len(spec) == 3:
            *spec, sampling = spec
        if len(spec) != 2 or sampling not in ("linear", "log"):
            raise ValueError(
                f"search_space[{name!r}]: a range is (low, high) or (low, high, "
                f"'linear'|'log'); got {spec!r}."
            )
        low, high = (_check_value(name, v) for v in spec)
        if not low < high:
            raise ValueError(f"search_space[{name!r}]: need low < high; got {spec!r}.")
        if sampling == "log" and low <= 0:
            raise ValueError(
                f"search_space[{name!r}]: a log range needs low > 0; got {spec!r}. "
                "Use (low, high, 'linear'), or search use_gram for gram_weight = 0."
            )
        return ("range", low, high, sampling)
    return ("fixed", _check_value(name, spec))


def resolve_search_space(search_space=None):
    """The full search space: `DEFAULT_SEARCH_SPACE` updated by `search_space`.

    Each value is a number or bool (fixed), a ``(low, high)`` or ``(low, high,
    "linear" | "log")`` range, or a list of choices. Fixing ``gram_weight`` fixes
    ``use_gram`` (True if the weight is > 0, False if it is 0).

    Returns:
        dict name -> ("fixed", value) | ("choice", values) | ("range", low, high,
        sampling).

    Example:

    >>> space = resolve_search_space({"kd_weight": 1.0, "temperature": [2, 4]})
    >>> space["kd_weight"], space["temperature"]
    (('fixed', 1.0), ('choice', [2.0, 4.0]))
    >>> resolve_search_space({"gram_weight": 0})["use_gram"]
    ('fixed', False)
    """
    search_space = dict(search_space or {})
    unknown = sorted(set(search_space) - set(DEFAULT_SEARCH_SPACE))
    if unknown:
        raise ValueError(
            f"Unknown search_space name(s) {unknown}; valid names are "
            f"{list(DEFAULT_SEARCH_SPACE)}."
        )
    space = {
        name: _parse_entry(name, search_space.get(name, default))
        for name, default in DEFAULT_SEARCH_SPACE.items()
    }
    gram = space["gram_weight"]
    if gram[0] == "fixed":
        implied = gram[1] > 0
        if "use_gram" in search_space and space["use_gram"] != ("fixed", implied):
            raise ValueError(
                f"search_space fixes gram_weight={gram[1]:g} but use_gram="
                f"{search_space['use_gram']!r}; give one of them."
            )
        space["use_gram"] = ("fixed", implied)
    return space


def _declare(hp, name, entry):
    if entry[0] == "fixed":
        return hp.Fixed(name, entry[1])
    if entry[0] == "choice":
        if name == "use_gram":
            return hp.Boolean(name, default=entry[1][0])
        return hp.Choice(name, entry[1], ordered=True)
    _, low, high, sampling = entry
    return hp.Float(name, low, high, sampling=sampling)


# ----------------------------------------------------------------------------
# The models a search builds


@keras.saving.register_keras_serializable(package="keras_gramkd")
class StudentCheckpointDistiller(Distiller):
    """A `Distiller` whose `save_weights` / `load_weights` cover the student only.

    KerasTuner checkpoints each trial with ``model.save_weights`` and restores it
    with ``model.load_weights``; with this class those files hold the student's
    weights and nothing of the (shared, frozen) teacher. A file it writes is the
    same as ``distiller.student.save_weights(path)``. Everything else is
    `Distiller`; save the whole model with ``model.save(...)``.

    Example:

    >>> import keras, numpy as np, os, tempfile
    >>> def net(prefix, width):
    ...     a = keras.Input((4,), name="a")
    ...     logits = keras.layers.Dense(3)(keras.layers.Dense(width)(a))
    ...     return keras.Model({"a": a}, logits)
    >>> distiller = StudentCheckpointDistiller(net("t", 16), net("s", 4), gram_weight=0)
    >>> path = os.path.join(tempfile.mkdtemp(), "student.weights.h5")
    >>> distiller.save_weights(path)
    >>> student = net("s2", 4)
    >>> student.load_weights(path)
    >>> bool(np.allclose(student.weights[0], distiller.student.weights[0]))
    True
    """

    def save_weights(self, filepath, *args, **kwargs):
        return self.student.save_weights(filepath, *args, **kwargs)

    def load_weights(self, filepath, *args, **kwargs):
        return self.student.load_weights(filepath, *args, **kwargs)


def _fresh(metric):
    if isinstance(metric, str):
        return metric
    return metric.__class__.from_config(metric.get_config())


def _objective_name(objective):
    return objective if isinstance(objective, str) else getattr(objective, "name", None)


def _check_objective(objective):
    if _objective_name(objective) in FORBIDDEN_OBJECTIVES:
        raise ValueError(
            f"objective={_objective_name(objective)!r} cannot rank Distiller trials: "
            "the loss is task_weight·task + kd_weight·kd + gram_weight·gram, so its "
            "scale is set by the weights being tuned. Use a student metric such as "
            "'val_accuracy' (or 'val_task_loss' with direction 'min')."
        )
    return objective


class _DistillerHyperModelImpl:
    """The body of `DistillerHyperModel`, kept free of any keras_tuner import."""

    def __init__(
        self,
        teacher,
        build_student,
        teacher_modalities=None,
        student_modalities=None,
        search_space=None,
        loss=None,
        metrics=("accuracy",),
        objective="val_accuracy",
        gram_loss=None,
        jit_compile="auto",
        name=None,
        tunable=True,
    ):
        super().__init__(name=name, tunable=tunable)
        if not isinstance(teacher, keras.Model):
            raise TypeError(
                f"teacher must be a keras.Model; got {type(teacher).__name__}."
            )
        if not callable(build_student):
            raise TypeError(
                "build_student must be a callable hp -> keras.Model (the student); "
                f"got {build_student!r}."
            )
        self.teacher = teacher
        self.build_student = build_student
        self.teacher_modalities = teacher_modalities
        self.student_modalities = student_modalities
        self.search_space = resolve_search_space(search_space)
        self.loss = loss
        self.metrics = list(metrics or [])
        self.objective = _check_objective(objective)
        self.gram_loss = gram_loss
        self.jit_compile = jit_compile
        if self.search_space["use_gram"] != ("fixed", False) and (
            teacher_modalities is None or student_modalities is None
        ):
            raise ValueError(
                "The search space allows gram_weight > 0, which needs "
                "teacher_modalities and student_modalities; pass them, or use "
                "search_space={'gram_weight': 0}."
            )

    def distiller_config(self, hp):
        """The Distiller settings that the hyperparameters `hp` stand for.

        Declares the loss hyperparameters on a copy of `hp` (so it works on a
        trial's ``trial.hyperparameters`` and on a fresh ``HyperParameters()``,
        which gives the defaults). ``gram_weight`` is 0 when ``use_gram`` is off.

        Returns:
            dict with task_weight, kd_weight, gram_weight, temperature, learning_rate.
        """
        return self._declare_loss_hyperparameters(hp.copy())

    def declare_hyperparameters(self, hp):
        self._declare_loss_hyperparameters(hp)

    def _declare_loss_hyperparameters(self, hp):
        space = self.search_space
        config = {
            name: _declare(hp, name, space[name])
            for name in ("task_weight", "kd_weight", "temperature", "learning_rate")
        }
        use_gram = _declare(hp, "use_gram", space["use_gram"])
        with hp.conditional_scope("use_gram", [True]):
            gram_weight = _declare(hp, "gram_weight", space["gram_weight"])
        config["gram_weight"] = float(gram_weight) if use_gram else 0.0
        return {
            name: float(config[name])
            for name in (
                "task_weight",
                "kd_weight",
                "gram_weight",
                "temperature",
                "learning_rate",
            )
        }

    def build(self, hp):
        """A compiled `StudentCheckpointDistiller` around the shared teacher."""
        config = self._declare_loss_hyperparameters(hp)
        student = self.build_student(hp)
        if not isinstance(student, keras.Model):
            kt = _import_keras_tuner()
            raise kt.errors.FatalTypeError(
                f"build_student(hp) must return a keras.Model; got {type(student)}."
            )
        learning_rate = config.pop("learning_rate")
        distiller = StudentCheckpointDistiller(
            teacher=self.teacher,
            student=student,
            teacher_modalities=self.teacher_modalities,
            student_modalities=self.student_modalities,
            gram_loss=self.gram_loss,
            **config,
        )
        loss = self.loss
        if loss is None:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        distiller.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=loss,
            metrics=[_fresh(m) for m in self.metrics],
            jit_compile=self.jit_compile,
        )
        return distiller

    def fit(self, hp, model, *args, **kwargs):
        """`model.fit`, refusing a loss objective and a search without validation."""
        kt = _import_keras_tuner()
        for callback in kwargs.get("callbacks") or []:
            objective = getattr(callback, "objective", None)
            if objective is not None:
                try:
                    _check_objective(objective)
                except ValueError as error:
                    raise kt.errors.FatalValueError(str(error)) from None
        name = _objective_name(self.objective) or ""
        has_validation = kwargs.get("validation_data") is not None or kwargs.get(
            "validation_split"
        )
        if name.startswith("val_") and not has_validation:
            raise kt.errors.FatalValueError(
                f"The objective {name!r} needs validation data: pass "
                "validation_data=(x_val, y_val) (or validation_split) to search()."
            )
        return model.fit(*args, **kwargs)


_LAZY_CLASSES = {}


def _distiller_hypermodel_class():
    if "DistillerHyperModel" not in _LAZY_CLASSES:
        kt = _import_keras_tuner()
        _LAZY_CLASSES["DistillerHyperModel"] = type(
            "DistillerHyperModel",
            (_DistillerHyperModelImpl, kt.HyperModel),
            {"__module__": __name__, "__doc__": _HYPERMODEL_DOC},
        )
    return _LAZY_CLASSES["DistillerHyperModel"]


_HYPERMODEL_DOC = """A `keras_tuner.HyperModel` of Distillers sharing a frozen teacher.

    Each trial builds a student with `build_student(hp)` and a compiled
    `StudentCheckpointDistiller` around the same `teacher` object (never retrained,
    copied or checkpointed). See the module docstring for the default space.

    Args:
        teacher: trained `keras.Model` (class logits), shared by all trials.
        build_student: callable ``hp -> keras.Model``; may declare its own
            hyperparameters (for example the student's width).
        teacher_modalities, student_modalities: as in `Distiller`; needed unless
            the space fixes ``gram_weight`` to 0.
        search_space: dict overriding `DEFAULT_SEARCH_SPACE` entries: a number
            fixes a value, ``(low, high)`` or ``(low, high, "log"|"linear")`` sets
            a range, a list gives choices. Unknown names raise ValueError.
        loss: task loss; default ``SparseCategoricalCrossentropy(from_logits=True)``.
        metrics: compiled metrics; ``"accuracy"`` gives the default objective.
        objective: the student metric the tuner should rank by (pass the same to
            the tuner, or use `make_tuner`); ``"loss"``/``"val_loss"`` are refused
            because the weights being tuned set the loss's scale.
        gram_loss: the Gram loss, as in `Distiller`.
        jit_compile: passed to `compile` (False is faster for tiny CPU models).

    Example:

    >>> import keras, keras_tuner as kt, numpy as np, tempfile
    >>> def net(prefix, width):
    ...     a, b = keras.Input((4,), name="a"), keras.Input((6,), name="b")
    ...     ea = keras.layers.Dense(width, name=f"{prefix}_a")(a)
    ...     eb = keras.layers.Dense(width, name=f"{prefix}_b")(b)
    ...     logits = keras.layers.Dense(3)(keras.layers.Concatenate()([ea, eb]))
    ...     return keras.Model({"a": a, "b": b}, logits, name=f"{prefix}_net")
    >>> hypermodel = DistillerHyperModel(
    ...     teacher=net("t", 16),
    ...     build_student=lambda hp: net("s", hp.Choice("width", [2, 4])),
    ...     teacher_modalities={"a": "t_a", "b": "t_b"},
    ...     student_modalities={"a": "s_a", "b": "s_b"},
    ...     search_space={"temperature": [2, 4]},
    ... )
    >>> tuner = kt.RandomSearch(hypermodel, objective="val_accuracy",
    ...     max_trials=2, directory=tempfile.mkdtemp(), seed=0)
    >>> x = {"a": np.ones((16, 4), "float32"), "b": np.ones((16, 6), "float32")}
    >>> y = np.zeros(16, "int32")
    >>> tuner.search(x, y, validation_data=(x, y), epochs=1, verbose=0)
    >>> best = tuner.get_best_models(1)[0]
    >>> best.teacher is hypermodel.teacher, best.student.name
    (True, 's_net')
    """


def __getattr__(name):
    if name == "DistillerHyperModel":
        return _distiller_hypermodel_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_tuner(hypermodel, tuner="random", max_trials=10, max_epochs=None, **kwargs):
    """A KerasTuner tuner ranking trials by ``hypermodel.objective``.

    Args:
        hypermodel: a `DistillerHyperModel`.
        tuner: "random", "bayesian" or "hyperband".
        max_trials: trials for random and Bayesian search (Hyperband derives its
            trial count from `max_epochs` and ``factor``). Bayesian search starts
            with ``num_initial_points`` random trials (default a third of
            `max_trials`, at least 2); it needs ``keras-tuner[bayesian]``.
        max_epochs: Hyperband's largest per-trial epoch budget (required for it).
        **kwargs: tuner arguments: directory, project_name, overwrite, seed, ...

    Example:

    >>> tuner = make_tuner(hypermodel, "random", max_trials=3,
    ...     directory="tuning", overwrite=False)  # doctest: +SKIP
    """
    kt = _import_keras_tuner()
    if tuner not in TUNERS:
        raise ValueError(f"Unknown tuner {tuner!r}; choose one of {TUNERS}.")
    objective = hypermodel.objective
    if tuner == "hyperband":
        if max_epochs is None:
            raise ValueError("Hyperband needs max_epochs (the largest epoch budget).")
        return kt.Hyperband(
            hypermodel, objective=objective, max_epochs=max_epochs, **kwargs
        )
    if tuner == "bayesian":
        # KerasTuner's default (3 random points per hyperparameter) would make a
        # small search entirely random.
        kwargs.setdefault("num_initial_points", max(2, max_trials // 3))
        oracle_class = kt.oracles.BayesianOptimizationOracle
    else:
        oracle_class = kt.oracles.RandomSearchOracle
    # The oracle's arguments go to the oracle, the rest to the tuner, as
    # kt.RandomSearch and kt.BayesianOptimization split them.
    names = inspect.signature(oracle_class).parameters
    oracle_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    oracle = _gram_balanced(oracle_class)(
        objective=objective, max_trials=max_trials, **oracle_kwargs
    )
    return kt.Tuner(oracle=oracle, hypermodel=hypermodel, **kwargs)


def _gram_balanced(oracle_class):
    """`oracle_class`, with trials that alternate the Gram term on and off.

    When the search space searches `use_gram`, each new trial takes the value
    tried less often so far (on first), so any two trials compare the Gram
    term on and off: random draws alone gave `gram=0` to both trials of a
    2-trial search. A trial switched on draws its `gram_weight` at random.
    Everything else is the oracle's own choice.
    """

    class GramBalancedOracle(oracle_class):
        def populate_space(self, trial_id):
            result = super().populate_space(trial_id)
            values = result.get("values")
            space = {hp.name: hp for hp in self.hyperparameters.space}
            searched = type(space.get("use_gram")).__name__ == "Boolean"
            if values is None or not searched:
                return result
            tried = [
                t.hyperparameters.values.get("use_gram") for t in self.trials.values()
            ]
            want = tried.count(True) <= tried.count(False)
            if values["use_gram"] != want:
                values["use_gram"] = want
                if want:
                    seed = self.seed + len(self.trials)
                    values["gram_weight"] = space["gram_weight"].random_sample(seed)
                else:
                    values.pop("gram_weight", None)
            return result

    GramBalancedOracle.__name__ = f"GramBalanced{oracle_class.__name__}"
    return GramBalancedOracle


def completed_trials(tuner):
    """The tuner's completed trials, best first (by the tuner's objective)."""
    trials = tuner.oracle.get_best_trials(num_trials=len(tuner.oracle.trials))
    return [t for t in trials if t.score is not None]


def best_with_and_without_gram(tuner, hypermodel):
    """(best trial with gram_weight > 0, best with gram_weight == 0); None if none."""
    with_gram = without_gram = None
    for trial in completed_trials(tuner):
        gram = hypermodel.distiller_config(trial.hyperparameters)["gram_weight"]
        if gram > 0 and with_gram is None:
            with_gram = trial
        if gram == 0 and without_gram is None:
            without_gram = trial
    return with_gram, without_gram


# ----------------------------------------------------------------------------
# `gramkd tune`


def add_tune_arguments(parser):
    """Adds the `gramkd tune` options to an `argparse.ArgumentParser`."""
    parser.add_argument(
        "--trials", type=int, default=8, help="trials (random, bayesian)"
    )
    parser.add_argument(
        "--epochs", type=int, default=10, help="epochs per trial (Hyperband: the most)"
    )
    parser.add_argument(
        "--tuner",
        choices=TUNERS,
        default="random",
        help="search algorithm (bayesian needs scikit-learn; default random)",
    )
    parser.add_argument(
        "--directory",
        default=None,
        help="tuner directory; an existing one resumes its search "
        "(default runs/tune-<timestamp>)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="start over in an existing directory"
    )
    parser.add_argument(
        "--views",
        nargs="+",
        default=None,
        help="digit views to use (default all six; space- or comma-separated)",
    )
    parser.add_argument(
        "--setting",
        choices=("clean", "noisy"),
        default="noisy",
        help="what the student sees, as in `gramkd demo` (default noisy)",
    )
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _stratified_split(y, fraction, seed):
    """Indices (kept, held out) with `fraction` of each class held out."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        held.append(idx[: max(1, round(fraction * len(idx)))])
    mask = np.zeros(len(y), bool)
    mask[np.concatenate(held)] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _take(x, y, idx):
    return {k: v[idx] for k, v in x.items()}, y[idx]


def _tune_data(views, setting, seed):
    """Teacher data, student train / validation (20 % held out) and test splits."""
    from keras_gramkd import demo

    data = demo.load_study_data(views=views, setting=setting)
    x, y = data["student_train"]
    train_idx, val_idx = _stratified_split(y, 0.2, seed)
    x_val, y_val = _take(x, y, val_idx)
    if setting == "noisy":  # fixed noise, like the study's noisy test split
        x_val = demo.add_fixed_noise(x_val, demo.TEST_NOISE_SEED + 1)
    return {
        "teacher_train": data["teacher_train"],
        "train": _take(x, y, train_idx),
        "val": (x_val, y_val),
        "test": data["student_test"],
    }


def _teacher(path, views, data, epochs, overwrite, console):
    from keras_gramkd import demo

    if os.path.exists(path) and not overwrite:
        console.print(f"Teacher: reusing {path}")
        return keras.saving.load_model(path, compile=False)
    x, y = data
    teacher = demo.build_teacher({v: x[v].shape[1] for v in views})
    teacher.compile(
        keras.optimizers.Adam(demo.TEACHER_LEARNING_RATE),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=_jit(),
    )
    with console.status(f"Training the teacher ({epochs} epochs)..."):
        teacher.fit(x, y, epochs=epochs, batch_size=demo.BATCH_SIZE, verbose=0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    teacher.save(path)
    return teacher


def _jit():
    # XLA compilation on CPU costs more than it saves on these small models.
    return False if keras.backend.backend() == "tensorflow" else "auto"


def _accuracy(model, data):
    x, y = data
    logits = model.predict(x, batch_size=1000, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def _fmt(value):
    return f"{value:.3g}" if value else "0"


def _config_cells(config):
    return [
        _fmt(config["kd_weight"]),
        _fmt(config["gram_weight"]),
        f"{config['temperature']:g}",
        f"{config['learning_rate']:.2g}",
    ]


def _trials_table(console, trials, hypermodel, objective, epochs):
    table = new_table(console, title=f"Trials, best first (objective: {objective})")
    for header in ("rank", "trial", "kd", "gram", "T", "lr", "epochs", objective):
        table.add_column(header, justify="right")
    for rank, trial in enumerate(trials, 1):
        values = trial.hyperparameters.values
        config = hypermodel.distiller_config(trial.hyperparameters)
        # Hyperband gives each trial its own budget; other tuners train all
        # trials for `epochs`.
        trained = values.get("tuner/epochs", epochs)
        best_step = "" if trial.best_step is None else f" (ep {trial.best_step + 1})"
        table.add_row(
            str(rank),
            trial.trial_id,
            *_config_cells(config),
            str(trained),
            f"{trial.score:.4f}{best_step}",
        )
    return table


def run_tune(args):
    """Runs `gramkd tune` from parsed arguments; returns the exit code."""
    from keras_gramkd import demo

    console = make_console()
    try:
        kt = _import_keras_tuner()
    except ImportError as error:
        print(f"gramkd tune: error: {error}", file=sys.stderr)
        return 1
    try:
        views = demo._check_views(
            [v for item in args.views for v in item.split(",") if v]
            if args.views
            else None
        )
        for name in ("trials", "epochs", "teacher_epochs"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1.")
    except ValueError as error:
        print(f"gramkd tune: error: {error}", file=sys.stderr)
        return 2
    directory = args.directory or os.path.join(
        "runs", "tune-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    )
    keras.utils.set_random_seed(args.seed)
    data = _tune_data(views, args.setting, args.seed)
    teacher = _teacher(
        os.path.join(directory, "teacher.keras"),
        views,
        data["teacher_train"],
        args.teacher_epochs,
        args.overwrite,
        console,
    )
    teacher_test = (demo.load_study_data(views=views, setting="clean"))["teacher_test"]
    console.print(
        f"Teacher test accuracy (clean views): {_accuracy(teacher, teacher_test):.4f}"
    )

    dims = {v: data["train"][0][v].shape[1] for v in views}
    noise = demo.NOISE_STD if args.setting == "noisy" else 0.0
    modalities = {
        "teacher_modalities": {v: f"t_{v}" for v in views},
        "student_modalities": {v: f"s_{v}" for v in views},
    }
    hypermodel = _distiller_hypermodel_class()(
        teacher,
        lambda hp: demo.build_student(dims, noise_std=noise),
        jit_compile=_jit(),
        **modalities,
    )
    tuner = make_tuner(
        hypermodel,
        args.tuner,
        max_trials=args.trials,
        max_epochs=args.epochs,
        directory=directory,
        project_name="search",
        overwrite=args.overwrite,
        seed=args.seed,
    )
    fit_kwargs = dict(
        validation_data=data["val"],
        epochs=args.epochs,
        batch_size=demo.BATCH_SIZE,
        verbose=0,
    )
    with console.status(f"Searching ({args.tuner}) in {directory} ..."):
        tuner.search(*data["train"], **fit_kwargs)

    trials = completed_trials(tuner)
    if not trials:
        console.print("No trial completed.")
        return 1
    objective = _objective_name(hypermodel.objective)
    console.print(_trials_table(console, trials, hypermodel, objective, args.epochs))

    # Demo defaults, trained the same way, for reference.
    defaults = {
        "task_weight": 1.0,
        "kd_weight": demo.DEFAULTS["kd_weight"],
        "gram_weight": demo.DEFAULTS["gram_weight"],
        "temperature": demo.DEFAULTS["temperature"],
        "learning_rate": demo.STUDENT_LEARNING_RATE,
    }
    baseline_model = _distiller_hypermodel_class()(
        teacher,
        lambda hp: demo.build_student(dims, noise_std=noise),
        search_space=defaults,
        jit_compile=_jit(),
        **modalities,
    ).build(kt.HyperParameters())
    history = baseline_model.fit(*data["train"], **fit_kwargs)
    baseline_val = max(history.history[objective])

    rows = [("best", trials[0])]
    rows += zip(
        ("best, Gram on", "best, Gram off"),
        best_with_and_without_gram(tuner, hypermodel),
        strict=True,
    )
    table = new_table(console, title="Best configurations vs the demo defaults")
    for header in ("", "trial", "kd", "gram", "T", "lr", objective, "test accuracy"):
        table.add_column(header, justify="right")
    summary = {"directory": directory, "tuner": args.tuner, "setting": args.setting}
    for label, trial in rows:
        if trial is None:
            table.add_row(label, "none tried", *[""] * 6)
            continue
        config = hypermodel.distiller_config(trial.hyperparameters)
        test = _accuracy(tuner.load_model(trial).student, data["test"])
        table.add_row(
            label,
            trial.trial_id,
            *_config_cells(config),
            f"{trial.score:.4f}",
            f"{test:.4f}",
        )
        summary[label] = {
            **config,
            "trial": trial.trial_id,
            "val": trial.score,
            "test": test,
        }
    baseline_test = _accuracy(baseline_model.student, data["test"])
    table.add_row(
        "demo defaults",
        "-",
        *_config_cells(defaults),
        f"{baseline_val:.4f}",
        f"{baseline_test:.4f}",
    )
    summary["demo defaults"] = {**defaults, "val": baseline_val, "test": baseline_test}
    console.print(table)
    best = hypermodel.distiller_config(trials[0].hyperparameters)
    console.print(
        "Best configuration: "
        + ", ".join(f"{k}={v:.4g}" for k, v in best.items())
        + f" ({objective} {trials[0].score:.4f}, trial {trials[0].trial_id})."
    )
    n_val = len(data["val"][1])
    console.print(
        f"One seed, {len(trials)} trial(s), {args.epochs} epoch(s); validation has "
        f"{n_val} samples (one sample = {100 / n_val:.2g} points): differences of a "
        "few points between rows are within noise. The demo-defaults row is scored "
        "at its best epoch, like the trials."
    )
    with open(os.path.join(directory, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return 0
