"""Plots for distillation runs: Gram-matrix heat maps and training curves.

The functions take plain numpy arrays and dicts (no `Distiller` needed) and
return a `matplotlib.figure.Figure` drawn on the non-interactive Agg canvas,
without touching pyplot's global state; pass `path` to also save a PNG.
matplotlib is imported on first use (``pip install "keras-gramkd[plots]"``).
"""

import os

import numpy as np

_LOSS_ORDER = ("loss", "task_loss", "kd_loss", "gram_loss")
_FIG_DPI = 100


def _new_figure(figsize):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            'keras_gramkd.plots needs matplotlib: pip install "keras-gramkd[plots]"'
        ) from e
    fig = Figure(figsize=figsize, dpi=_FIG_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    if path is not None:
        fig.savefig(os.fspath(path), format="png")
    return fig


def _square(name, value, size=None):
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise ValueError(f"`{name}` must be a square (M, M) matrix; got {array.shape}.")
    if size is not None and array.shape[0] != size:
        raise ValueError(
            f"`{name}` has shape {array.shape} but the teacher Gram matrix is "
            f"{size}x{size}: all Gram matrices must have the same shape."
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` has non-finite values.")
    return array


def _heatmap(ax, matrix, names, vmin, vmax, cmap, fmt, title):
    image = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap=cmap)
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, labels=names, rotation=45, ha="right")
    ax.set_yticks(ticks, labels=names)
    ax.set_title(title, fontsize="medium")
    # Both colour maps are light at the top: dark text there, light text below.
    middle = (vmin + vmax) / 2
    for (i, j), v in np.ndenumerate(matrix):
        light = v > middle
        ax.text(
            j,
            i,
            format(v, fmt),
            ha="center",
            va="center",
            fontsize="small",
            color="black" if light else "white",
        )
    return image


def plot_gram_matrices(
    teacher_gram,
    student_gram,
    modality_names,
    path=None,
    class_grams=None,
    title=None,
    fmt=".2f",
):
    """Draws teacher and student modality Gram matrices and their difference.

    One row of three heat maps: teacher, student (same colour scale, so equal
    colours mean equal values) and |teacher - student| (own scale from 0). Each
    cell is annotated with its value; modality names label both axes.
    `class_grams` adds one such row per class.

    Args:
        teacher_gram: (M, M) array, e.g. the teacher's batch-mean Gram matrix.
        student_gram: (M, M) array, the student's.
        modality_names: list of M names, in the matrices' order.
        path: optional file path; the figure is saved there as PNG.
        class_grams: optional dict class -> (teacher_gram, student_gram) of
            (M, M) arrays, drawn as extra rows in the dict's order.
        title: optional figure title.
        fmt: format spec of the annotated values.

    Returns:
        The `matplotlib.figure.Figure`.

    Example:

    >>> t = np.array([[1.0, 0.8], [0.8, 1.0]])
    >>> s = np.array([[1.0, 0.5], [0.5, 1.0]])
    >>> fig = plot_gram_matrices(t, s, ["image", "audio"])
    >>> [ax.get_title() for ax in fig.axes[:3]]
    ['teacher', 'student', '|teacher - student|']
    """
    teacher = _square("teacher_gram", teacher_gram)
    size = teacher.shape[0]
    student = _square("student_gram", student_gram, size)
    names = [str(n) for n in modality_names]
    if len(names) != size:
        raise ValueError(
            f"`modality_names` has {len(names)} names but the Gram matrices are "
            f"{size}x{size}: give one name per modality."
        )
    rows = [("", teacher, student)]
    if class_grams is not None:
        if not isinstance(class_grams, dict):
            raise ValueError(
                "`class_grams` must be a dict class -> (teacher_gram, student_gram); "
                f"got {type(class_grams).__name__}."
            )
        for label, pair in class_grams.items():
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise ValueError(
                    f"`class_grams[{label!r}]` must be a pair (teacher_gram, "
                    "student_gram)."
                )
            rows.append(
                (
                    f"class {label}: ",
                    _square(f"class_grams[{label!r}][0]", pair[0], size),
                    _square(f"class_grams[{label!r}][1]", pair[1], size),
                )
            )

    both = np.stack([m for _, t, s in rows for m in (t, s)])
    vmin, vmax = float(both.min()), float(both.max())
    if vmin == vmax:
        vmin, vmax = vmin - 1.0, vmax + 1.0
    diffs = [np.abs(t - s) for _, t, s in rows]
    dmax = max(float(max(d.max() for d in diffs)), 1e-12)

    cell = 0.55 * size + 1.6
    fig = _new_figure((3 * cell, len(rows) * cell + 1.0))
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for r, ((prefix, t, s), diff) in enumerate(zip(rows, diffs, strict=True)):
        ax_t, ax_s, ax_d = axes[r]
        image = _heatmap(ax_t, t, names, vmin, vmax, "viridis", fmt, prefix + "teacher")
        _heatmap(ax_s, s, names, vmin, vmax, "viridis", fmt, prefix + "student")
        diff_image = _heatmap(
            ax_d, diff, names, 0.0, dmax, "magma", fmt, prefix + "|teacher - student|"
        )
    # One colour bar under each column, as wide as its panels: no gap opens
    # between the panels (teacher and student share one scale).
    for c, (mappable, label) in enumerate(
        [(image, "Gram"), (image, "Gram"), (diff_image, "|teacher - student|")]
    ):
        fig.colorbar(mappable, ax=axes[:, c].tolist(), location="bottom", label=label)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_paired_differences(diffs, reference, path=None):
    """Per-method paired differences to a reference, in points.

    One row per method: each seed's difference as a dot, the mean as a bar
    with a ±1 standard-error whisker (none for a single seed), and a line at 0.

    Args:
        diffs: dict method -> list of per-seed differences (fractions, e.g.
            accuracy differences; drawn ×100 as points).
        reference: the reference method's name, for the axis label.
        path: optional PNG path.

    Returns:
        The `matplotlib.figure.Figure`.

    Example:

    >>> fig = plot_paired_differences({"gram": [0.01, -0.002, 0.004]}, "kd")
    >>> fig.axes[0].get_xlabel()
    'accuracy − kd (points), mean ± se'
    """
    if not diffs:
        raise ValueError(
            "diffs is empty: give at least one method besides the reference."
        )
    names = list(diffs)
    fig = _new_figure((6.0, 0.6 * len(names) + 1.4))
    ax = fig.subplots()
    for row, name in enumerate(names):
        values = 100 * np.asarray(diffs[name], dtype=np.float64)
        mean = float(values.mean())
        se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0
        ax.barh(row, mean, xerr=se or None, color="tab:blue", alpha=0.4, capsize=4)
        ax.plot(values, np.full(len(values), row), "o", color="tab:blue", ms=4)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(len(names)), labels=names)
    ax.invert_yaxis()
    ax.set_xlabel(f"accuracy − {reference} (points), mean ± se")
    return _save(fig, path)


def _as_history_dict(name, history):
    """Accepts a Keras `History` or its `.history` dict; returns a checked dict."""
    history = getattr(history, "history", history)
    if not isinstance(history, dict):
        raise ValueError(
            f"{name} must be a keras History or a dict metric -> list of values; "
            f"got {type(history).__name__}."
        )
    if not history:
        raise ValueError(f"{name} is empty: it has no metrics to plot.")
    checked = {}
    for key, values in history.items():
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.size == 0:
            raise ValueError(f"{name}[{key!r}] has no values.")
        checked[str(key)] = values
    return checked


def _is_multi_run(history):
    return (
        isinstance(history, dict)
        and bool(history)
        and all(isinstance(v, dict) or hasattr(v, "history") for v in history.values())
    )


def plot_training_curves(history, path=None, keys=None):
    """Plots training curves, one panel per metric, validation dashed.

    Each panel shows one metric by epoch, training (solid) and its `val_`
    counterpart (dashed) where present: first `loss`, `task_loss`, `kd_loss`,
    `gram_loss`, then the other metrics in the history's order.

    Args:
        history: a Keras `History`, its `.history` dict (metric -> per-epoch
            values), or a dict run name -> one of those, to compare runs (one
            colour per run).
        path: optional file path; the figure is saved there as PNG.
        keys: optional list of metric names (without `val_`) to plot; by
            default all metrics found.

    Returns:
        The `matplotlib.figure.Figure`.

    Example:

    >>> h = {"loss": [1.0, 0.6], "gram_loss": [0.3, 0.1], "val_loss": [1.1, 0.8]}
    >>> fig = plot_training_curves(h)
    >>> [ax.get_title() for ax in fig.axes]
    ['loss', 'gram_loss']
    """
    if _is_multi_run(history):
        runs = {
            str(k): _as_history_dict(f"history[{k!r}]", v) for k, v in history.items()
        }
    else:
        runs = {"": _as_history_dict("history", history)}

    found = []
    for run in runs.values():
        for key in run:
            base = key[4:] if key.startswith("val_") else key
            if base not in found:
                found.append(base)
    ordered = [k for k in _LOSS_ORDER if k in found]
    ordered += [k for k in found if k not in _LOSS_ORDER]
    if keys is not None:
        if isinstance(keys, str):
            keys = [keys]
        if not keys:
            raise ValueError(f"`keys` is empty; metrics in the history: {ordered}.")
        unknown = [k for k in keys if k not in found]
        if unknown:
            raise ValueError(
                f"Unknown metric(s) {unknown} in `keys`; metrics in the history: "
                f"{ordered}."
            )
        ordered = list(keys)

    ncols = min(3, len(ordered))
    nrows = -(-len(ordered) // ncols)
    fig = _new_figure((4.2 * ncols, 3.2 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, key in zip(axes, ordered, strict=False):
        for color, (run_name, run) in zip(colors, runs.items(), strict=True):
            for split_key, style, split in (
                (key, "-", "train"),
                (f"val_{key}", "--", "val"),
            ):
                if split_key in run:
                    values = run[split_key]
                    label = f"{run_name} {split}".strip()
                    ax.plot(
                        np.arange(1, values.size + 1),
                        values,
                        style,
                        color=color,
                        marker="o" if values.size < 30 else None,
                        markersize=3,
                        label=label,
                    )
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(ordered) :]:
        ax.remove()
    return _save(fig, path)
