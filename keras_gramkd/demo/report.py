"""The demo's report: progress display, conclusion, tables and figures."""

import os

import keras
import numpy as np

from keras_gramkd.console import markdown_table, new_table
from keras_gramkd.demo.settings import (
    FEW_LABELS_PER_CLASS,
    MISSING_DROPOUT,
    SPLIT_SEED,
    SWAP_PROBABILITY,
    TEST_NOISE_SEED,
)
from keras_gramkd.study import paired_difference

MEASURES = {"accuracy": "test accuracy", "dropped": "accuracy with one view missing"}


class Progress:
    """A rich progress bar over the study's runs on a terminal, a line per
    run when piped (silent when not verbose)."""

    def __init__(self, console, verbose, total):
        self._lines = verbose and not console.is_terminal
        self._console, self._done, self._total = console, 0, total
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=console,
            disable=not verbose or self._lines,
        )
        self._task = self._bar.add_task("study", total=total, metrics="")

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self._bar.__exit__(*exc)

    def advance(self, message):
        self._bar.update(self._task, advance=1, metrics=message)
        self._done += 1
        if self._lines:
            self._console.print(f"[{self._done}/{self._total}] {message}")

    def run_done(self, method, seed, accuracy):
        self.advance(f"{method} seed {seed}: accuracy {accuracy:.3f}")

    def epoch_callback(self, name):
        """A Keras callback that shows `name`'s epoch and loss."""
        update = self._bar.update
        task = self._task

        class _Epochs(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                loss = (logs or {}).get("loss", float("nan"))
                update(task, metrics=f"{name} epoch {epoch + 1}: loss {loss:.3f}")

        return _Epochs()


def best_run(result, measure, only=None):
    """(method, seed) of the best method by mean `measure`, at its best seed."""
    names = [only] if only else list(result.methods)
    method = max(names, key=lambda m: np.mean(result.values(m, measure)))
    values = result.values(method, measure)
    return method, result.methods[method].seeds[int(np.argmax(values))]


def data_summary(data, views):
    """What the setting's splits hold (for results.json)."""
    labels = data.student_train[1]
    return {
        "dataset": "UCI multiple features (mfeat), embedded",
        "setting": data.setting,
        "views": list(views),
        "split_seed": SPLIT_SEED,
        "n_train_teacher": int(len(data.teacher_train[1])),
        "n_train_student": int(len(labels)),
        "n_labelled_student": int(np.sum(labels >= 0)),
        "n_test": int(len(data.student_test[1])),
        "noise_std": data.student_noise,
        "test_noise_seed": TEST_NOISE_SEED if data.student_noise else None,
        "few_labels_per_class": FEW_LABELS_PER_CLASS if data.has_unlabelled else None,
        "swap_probability": SWAP_PROBABILITY if data.setting == "unreliable" else None,
        "modality_dropout": MISSING_DROPOUT if data.modality_dropout else None,
        "student_fusion": data.fusion,
        "headline": data.headline,
    }


# Two-sided 95 % critical values of Student's t for 1..30 degrees of freedom
# (n seeds give n - 1): with few seeds "2 standard errors" is far too lenient.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_critical(n):
    """The 95 % two-sided critical value of t for a mean over `n` seeds.

    >>> t_critical(10)
    2.262
    """
    return _T975[n - 2] if n - 1 <= len(_T975) else 1.96


def _verdict(p):
    n = len(p["diffs"])
    if n < 2:
        return "one seed cannot tell"
    margin = t_critical(n) * p["se"]
    if p["mean"] - margin > 0:
        return "helped"
    if p["mean"] + margin < 0:
        return "hurt"
    return "within seed noise"


def _points(p):
    se = "n/a" if not np.isfinite(p["se"]) else f"{100 * p['se']:.2f}"
    return f"{100 * p['mean']:+.2f} ± {se}"


def keras_kd_note(result, measure, kd_weight):
    """Why ``keras_kd`` (Keras' own Distiller) may differ from ``kd``."""
    p = result.paired("keras_kd", measure)
    scale = 1.0 + kd_weight
    return (
        f"keras_kd, Keras' own keras.distillation.Distiller, differs from kd by "
        f"{_points(p)} points ({_verdict(p)}). Its loss, w·task + "
        f"(1 - w)·T²·KL with w = 1/(1 + kd_weight) = {1 / scale:.3g} (Keras' "
        "LogitsDistillation multiplies its KLDivergence by T², as kd does), is "
        f"the kd loss task + kd_weight·T²·KL divided by {scale:g}. Adam's step "
        "m/(√v + ε) does not change when the loss is scaled, except through ε: "
        f"keras_kd trains like kd with ε = {scale:g} × 1e-7, the same step "
        "size wherever a gradient is well above 1e-7. The steps of the "
        "near-zero gradients differ a little, and that grows over training "
        "into a difference like a change of seed: the objective is the same."
    )


def conclusion(result, data, gram, kd_weight=1.0):
    """Plain words on the paired differences to KD, in the headline measure.

    `kd_weight` is the run's; it explains ``keras_kd`` where that ran.
    """
    measure = data.headline
    n = len(result.config["seeds"])
    others = [m for m in result.methods if m not in (result.reference, "labels")]
    if not others:
        return "Only labels and KD ran: no term to judge."
    paired = {m: result.paired(m, measure) for m in others}
    rule = (
        f"a difference counts when its 95 % confidence interval excludes 0, "
        f"i.e. beyond {t_critical(n):.2f} standard errors"
        if n > 1
        else "one seed gives no interval"
    )
    parts = [
        f"On the {data.setting} setting ({MEASURES[measure]}, paired over "
        f"{n} seed(s), mean ± standard error; {rule}):"
    ]
    if gram in paired:
        p = paired[gram]
        parts.append(
            f"adding the modality Gram term ({gram}) to logit KD changed it by "
            f"{_points(p)} points ({_verdict(p)}; better on {p['better']} of "
            f"{len(p['diffs'])} seeds)."
        )
        for control in ("batch_mean", "off_diagonal", "diagonal"):
            name = f"{gram}_{control}"
            if name in result.methods:
                q = result.paired(name, measure)
                gain = paired_difference(
                    result.values(gram, measure),
                    result.values(name, measure),
                )
                parts.append(
                    f"Its {control.replace('_', '-')} control: {_points(q)}; the "
                    f"per-sample Gram minus the control: {_points(gain)}."
                )
    best = max(paired, key=lambda m: paired[m]["mean"])
    helped = [m for m in others if _verdict(paired[m]) == "helped"]
    hurt = [m for m in others if _verdict(paired[m]) == "hurt"]
    parts.append(
        f"The largest mean gain over KD: {best} ({_points(paired[best])}). "
        + (
            f"Beyond the 95 % interval: {', '.join(helped)} helped"
            if helped
            else "No term beat KD beyond the 95 % interval"
        )
        + (f"; {', '.join(hurt)} hurt." if hurt else ".")
    )
    if "keras_kd" in paired:
        parts.append(keras_kd_note(result, measure, kd_weight))
    return " ".join(parts)


def _title(results):
    c, d = results["config"], results["data"]
    return (
        f"gramkd demo: setting {c['setting']}, {len(c['views'])} views, "
        f"{d['n_labelled_student']} labelled / {d['n_train_student']} student "
        f"train, {d['n_test']} test, {c['seeds']} seed(s), {c['epochs']} epochs, "
        f"gram {c['gram_normalize']} x{c['gram_weight']:g}, kd x{c['kd_weight']:g}, "
        f"T={c['temperature']:g}, backend {results['backend']}"
    )


def _dropped_table(result, views):
    headers = ["model"] + [f"no {v}" for v in views]
    rows = [["teacher"] + [f"{100 * result.teacher_dropped[v]:.1f}" for v in views]]
    for name, r in result.methods.items():
        rows.append([name] + [f"{100 * np.mean(r.dropped[v]):.1f}" for v in views])
    return headers, rows


def _notes(results):
    c = results["config"]
    return (
        "Columns: test accuracy (mean ± sd over seeds); paired difference to "
        "labels+KD (points, mean ± standard error over seeds, and on how many "
        "seeds the method was better); accuracy with one view zeroed at test "
        "time (mean over views) and its paired difference; |ΔG|, the mean "
        "absolute difference between the teacher's and the student's "
        f"per-sample {c['gram_normalize']!r} Gram matrices of the view "
        "embeddings on the test split; parameters; training time per run "
        "(tracing included)."
        + "".join(
            f" Control {name} not run: {why}."
            for name, why in results["skipped_controls"].items()
        )
    )


def markdown(results, result):
    """results.md: the title, the tables, notes and the conclusion."""
    headers, rows = _dropped_table(result, results["data"]["views"])
    return "\n\n".join(
        [
            f"# {_title(results)}",
            result.to_markdown(),
            "Accuracy (%) with one view zeroed at test time (mean over seeds):",
            markdown_table(headers, rows),
            _notes(results),
            f"**Conclusion.** {results['conclusion']}",
            f"Wall time {results['wall_time_s']:.0f} s.\n",
        ]
    )


def _print(console, title, headers, rows):
    table = new_table(console, title=title, title_justify="left")
    for h in headers:
        table.add_column(h, justify="left" if h in ("model", "method") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def print_tables(console, results, result, out):
    """The tables and the conclusion on the console."""
    _print(console, _title(results), *result.table())
    _print(
        console,
        "accuracy % with one view zeroed at test time",
        *_dropped_table(result, results["data"]["views"]),
    )
    console.print(f"[bold]Conclusion.[/bold] {results['conclusion']}")
    for name, why in results["skipped_controls"].items():
        console.print(f"Control {name} not run: {why}.")
    console.print(
        "Files: results.json, results.md, gram.png, gram_per_class.png, curves.png, "
        "paired.png, "
        f"student.keras ({results['wall_time_s']:.0f} s; expected about "
        f"{results['expected_time_s']:.0f} s).",
        markup=False,
        highlight=False,
    )
    print_wrote(console, out)


def print_wrote(console, folder):
    """The last line of a command: ``Wrote <absolute folder>/``."""
    path = os.path.join(os.path.abspath(folder), "")
    console.print(f"Wrote {path}", markup=False, highlight=False, soft_wrap=True)


def plot_grams(out, teacher_grams, student_grams, y, views, normalize, which):
    """gram.png: mean teacher and student Grams, overall and per digit."""
    from keras_gramkd.plots import plot_class_gram_matrices, plot_gram_matrices

    t, s = teacher_grams, student_grams
    per_class = {
        f"digit {c}": (t[y == c].mean(0), s[y == c].mean(0)) for c in np.unique(y)
    }
    plot_gram_matrices(
        t.mean(0),
        s.mean(0),
        list(views),
        path=os.path.join(out, "gram.png"),
        title=f"Modality Gram ({normalize}), test set: teacher vs student ({which})",
    )
    plot_class_gram_matrices(
        per_class,
        list(views),
        path=os.path.join(out, "gram_per_class.png"),
        title=f"Modality Gram ({normalize}) per digit, test set: teacher vs "
        f"student ({which})",
    )


def plot_curves(out, result):
    """curves.png: the training losses and accuracy of each method's first seed."""
    from keras_gramkd.plots import plot_training_curves

    histories = {name: r.histories[0] for name, r in result.methods.items()}
    plot_training_curves(
        histories,
        path=os.path.join(out, "curves.png"),
        title=f"Per-epoch curves, seed {result.config['seeds'][0]} of each method",
        titles={
            "val_accuracy": "test accuracy per epoch "
            "(observed only; the last epoch is kept)"
        },
    )
