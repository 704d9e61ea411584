"""`gramkd tune`: search the Distiller's loss weights on the embedded digits.

With ``--terms``, it searches which distillation term pays instead
(`keras_gramkd.tuning.terms_cli`).

Trains (or reuses) a teacher, searches with KerasTuner (a line per trial: its
number, settings, score and time), and prints the trials and the best
configurations (with and without the Gram term) next to the demo's defaults,
trained the same way. The run's summary goes to `summary.json` in the tuner's
directory, whose absolute path is the last line printed.
"""

import datetime
import json
import os
import sys
import time

import keras
import numpy as np

from gramkd.options import TUNE_SETTINGS
from keras_gramkd import zoo
from keras_gramkd.console import make_console, new_table
from keras_gramkd.datasets.mfeat import check_views, stratified_split
from keras_gramkd.demo.settings import (
    NOISE_STD,
    TEST_NOISE_SEED,
    add_fixed_noise,
    load_setting,
)
from keras_gramkd.demo.study import DEFAULTS
from keras_gramkd.saving import check_keras_archive
from keras_gramkd.tuning.search import (
    best_with_and_without_gram,
    completed_trials,
    import_keras_tuner,
    make_tuner,
    objective_name,
)
from keras_gramkd.tuning.term_search import SEARCH_TUNERS
from keras_gramkd.tuning.terms_cli import run_term_search


def _take(x, y, idx):
    return {k: v[idx] for k, v in x.items()}, y[idx]


def _tune_data(views, setting, seed):
    """Teacher data, student train / validation (20 % held out) and test splits."""
    data = load_setting(setting, views=views)
    x, y = data.student_train
    train_idx, val_idx = stratified_split(y, 0.2, np.random.default_rng(seed))
    x_val, y_val = _take(x, y, val_idx)
    if setting == "noisy":  # fixed noise, like the study's noisy test split
        x_val = add_fixed_noise(x_val, TEST_NOISE_SEED + 1)
    return {
        "teacher_train": data.teacher_train,
        "teacher_test": data.teacher_test,
        "train": _take(x, y, train_idx),
        "val": (x_val, y_val),
        "test": data.student_test,
    }


def _teacher(args, views, directory, data, console):
    """The teacher: reused from `directory`, or trained and saved there.

    Prints its test accuracy on the clean views.
    """
    path = os.path.join(directory, "teacher.keras")
    if os.path.exists(path) and not args.overwrite:
        console.print(f"Teacher: reusing {path}")
        try:
            check_keras_archive(path)
        except ValueError as error:
            hint = "Or pass --overwrite to train a new one."
            raise ValueError(f"{error} {hint}") from None
        teacher = keras.saving.load_model(path, compile=False)
    else:
        x, y = data["teacher_train"]
        teacher = zoo.build_teacher({v: x[v].shape[1] for v in views})
        teacher.compile(
            keras.optimizers.Adam(zoo.TEACHER_LEARNING_RATE),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=_jit(),
        )
        epochs = args.teacher_epochs
        with console.status(f"Training the teacher ({epochs} epochs)..."):
            teacher.fit(x, y, epochs=epochs, batch_size=zoo.BATCH_SIZE, verbose=0)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        teacher.save(path)
    accuracy = _accuracy(teacher, data["teacher_test"])
    console.print(f"Teacher test accuracy (clean views): {accuracy:.4f}")
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


def _check_args(args):
    """The views to use; raises ValueError for a bad option."""
    views = check_views(
        [v for item in args.views for v in item.split(",") if v] if args.views else None
    )
    for name in ("trials", "epochs", "teacher_epochs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1.")
    if args.terms:
        if args.tuner not in SEARCH_TUNERS:
            raise ValueError(
                f"--terms takes --tuner {' or '.join(SEARCH_TUNERS)}: "
                f"{args.tuner} gives each family a different budget."
            )
    elif args.setting not in TUNE_SETTINGS:
        raise ValueError(
            f"The weight search runs on --setting {' or '.join(TUNE_SETTINGS)}; "
            f"--terms searches the terms on {args.setting!r}."
        )
    return views


class TrialProgress:
    """A line per trial: its number, settings, score, and the time taken.

    The hypermodel's `fit` (KerasTuner's public hook for a trial's training)
    hands `report` the trial's settings and its training.

    Args:
        console: where the lines go.
        total: the number of trials, or None (Hyperband decides it).
        done: trials completed before this search (a resumed search).
        objective: the tuner's objective (a name or a `keras_tuner.Objective`).
    """

    def __init__(self, console, total, done, objective):
        self.console, self.total, self.trial = console, total, done
        self.name = objective_name(objective)
        self.direction = getattr(objective, "direction", None) or (
            "min" if self.name.endswith("loss") else "max"
        )
        self.start = time.perf_counter()

    def line(self, config, history, seconds):
        """The text for one finished trial (`history`: a `keras.callbacks.History`)."""
        values = history.history.get(self.name)
        of = f"/{self.total}" if self.total else ""
        text = f"Trial {self.trial}{of}: {', '.join(_config_words(config))}"
        if values:
            pick = min if self.direction == "min" else max
            best = pick(range(len(values)), key=lambda i: values[i])
            epoch = history.epoch[best] + 1
            text += f": {self.name} {values[best]:.4f} (epoch {epoch})"
        return (
            f"{text} in {seconds:.0f} s; "
            f"{time.perf_counter() - self.start:.0f} s in all"
        )

    def report(self, config, train):
        """Runs `train()` (a trial's fit) and prints its line; returns its result."""
        self.trial += 1
        start = time.perf_counter()
        try:
            history = train()
        except Exception as error:
            self.console.print(
                f"Trial {self.trial}: failed after {time.perf_counter() - start:.0f}"
                f" s ({type(error).__name__}: {error})",
                markup=False,
                highlight=False,
            )
            raise
        text = self.line(config, history, time.perf_counter() - start)
        self.console.print(text, markup=False, highlight=False)
        return history


def _config_words(config):
    cells = _config_cells(config)
    return [f"{k} {v}" for k, v in zip(("kd", "gram", "T", "lr"), cells, strict=True)]


def _hypermodel(teacher, views, dims, setting, search_space=None):
    """A `DistillerHyperModel` over the reference student for `views`; once its
    ``progress`` is a `TrialProgress`, each trial's fit prints its line."""
    from keras_gramkd.tuning.hypermodel import DistillerHyperModel

    class ReportingHyperModel(DistillerHyperModel):
        progress = None

        def fit(self, hp, model, *args, **kwargs):
            train = super().fit
            if self.progress is None:
                return train(hp, model, *args, **kwargs)
            return self.progress.report(
                self.distiller_config(hp), lambda: train(hp, model, *args, **kwargs)
            )

    noise = NOISE_STD if setting == "noisy" else 0.0
    return ReportingHyperModel(
        teacher,
        lambda hp: zoo.build_student(dims, noise_std=noise),
        teacher_modalities=zoo.view_addresses("t", views),
        student_modalities=zoo.view_addresses("s", views),
        search_space=search_space,
        jit_compile=_jit(),
    )


def _demo_defaults():
    """The demo's loss settings, as a fixed search space."""
    return {
        "task_weight": 1.0,
        "kd_weight": DEFAULTS["kd_weight"],
        "gram_weight": DEFAULTS["gram_weight"],
        "temperature": DEFAULTS["temperature"],
        "learning_rate": zoo.STUDENT_LEARNING_RATE,
    }


def _best_table(console, tuner, hypermodel, trials, data, objective):
    """The best trials (overall, Gram on, Gram off): a table and their summary."""
    rows = [("best", trials[0])]
    rows += zip(
        ("best, Gram on", "best, Gram off"),
        best_with_and_without_gram(tuner, hypermodel),
        strict=True,
    )
    table = new_table(console, title="Best configurations vs the demo defaults")
    for header in ("", "trial", "kd", "gram", "T", "lr", objective, "test accuracy"):
        table.add_column(header, justify="right")
    summary = {}
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
    return table, summary


def _train_baseline(baseline, fit_kwargs, data, objective):
    """Trains the demo defaults like a trial; returns (model, best validation)."""
    kt = import_keras_tuner()
    model = baseline.build(kt.HyperParameters())
    history = model.fit(*data["train"], **fit_kwargs)
    return model, max(history.history[objective])


def _add_baseline(table, summary, model, val, data):
    """Adds the demo defaults' row to the table and the summary."""
    defaults = _demo_defaults()
    test = _accuracy(model.student, data["test"])
    table.add_row(
        "demo defaults", "-", *_config_cells(defaults), f"{val:.4f}", f"{test:.4f}"
    )
    summary["demo defaults"] = {**defaults, "val": val, "test": test}


def _print_conclusion(console, hypermodel, trials, objective, n_val, epochs):
    best = hypermodel.distiller_config(trials[0].hyperparameters)
    console.print(
        "Best configuration: "
        + ", ".join(f"{k}={v:.4g}" for k, v in best.items())
        + f" ({objective} {trials[0].score:.4f}, trial {trials[0].trial_id})."
    )
    console.print(
        f"One seed, {len(trials)} trial(s), {epochs} epoch(s); validation has "
        f"{n_val} samples (one sample = {100 / n_val:.2g} points): differences of a "
        "few points between rows are within noise. The demo-defaults row is scored "
        "at its best epoch, like the trials."
    )


def run_tune(args):
    """Runs `gramkd tune` from parsed arguments; returns the exit code."""
    console = make_console()
    try:
        views = _check_args(args)
    except ValueError as error:
        print(f"gramkd tune: error: {error}", file=sys.stderr)
        return 2
    try:  # a missing extra is named after the argument errors
        import_keras_tuner()
    except ImportError as error:
        print(f"gramkd tune: error: {error}", file=sys.stderr)
        return 1
    directory = args.directory or os.path.join(
        "runs", "tune-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    )
    if args.terms:
        return run_term_search(
            args,
            views,
            directory,
            lambda data: _teacher(args, views, directory, data, console),
            console,
        )
    keras.utils.set_random_seed(args.seed)
    data = _tune_data(views, args.setting, args.seed)
    teacher = _teacher(args, views, directory, data, console)
    dims = {v: data["train"][0][v].shape[1] for v in views}
    hypermodel = _hypermodel(teacher, views, dims, args.setting)
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
        batch_size=zoo.BATCH_SIZE,
        verbose=0,
    )
    total = None if args.tuner == "hyperband" else args.trials
    progress = TrialProgress(
        console, total, len(completed_trials(tuner)), hypermodel.objective
    )
    hypermodel.progress = progress
    with console.status(f"Searching ({args.tuner}) in {directory} ..."):
        tuner.search(*data["train"], **fit_kwargs)
    trials = completed_trials(tuner)
    if not trials:
        console.print("No trial completed.")
        _print_wrote(console, directory)
        return 1
    objective = objective_name(hypermodel.objective)
    console.print(_trials_table(console, trials, hypermodel, objective, args.epochs))
    # Demo defaults, trained the same way, for reference.
    baseline = _hypermodel(teacher, views, dims, args.setting, _demo_defaults())
    baseline, baseline_val = _train_baseline(baseline, fit_kwargs, data, objective)
    table, summary = _best_table(console, tuner, hypermodel, trials, data, objective)
    _add_baseline(table, summary, baseline, baseline_val, data)
    console.print(table)
    _print_conclusion(
        console, hypermodel, trials, objective, len(data["val"][1]), args.epochs
    )
    summary = {
        "directory": directory,
        "tuner": args.tuner,
        "setting": args.setting,
        **summary,
    }
    with open(os.path.join(directory, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    _print_wrote(console, directory)
    return 0


def _print_wrote(console, directory):
    path = os.path.join(os.path.abspath(directory), "")
    console.print(f"Wrote {path}", markup=False, highlight=False, soft_wrap=True)
