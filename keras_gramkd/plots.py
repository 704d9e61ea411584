"""Plots for distillation runs: Gram-matrix heat maps, training curves and
paired differences between methods.

The functions take plain numpy arrays and dicts (no `Distiller` needed) and
return a `matplotlib.figure.Figure` drawn on the non-interactive Agg canvas,
without touching pyplot's global state; pass `path` to also save a PNG.
matplotlib is imported on first use (``pip install "keras-gramkd[plots]"``).
"""

import os
import textwrap

import numpy as np

_LOSS_ORDER = ("loss", "task_loss", "kd_loss", "gram_loss")
_FIG_DPI = 100
# Twelve colours told apart at a glance (tab10, black, dark yellow); each run
# also gets its own line style and marker, so no two runs look alike.
RUN_COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#000000",
    "#b8860b",
)
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "*", "h", "p")
# A panel's y axis turns logarithmic when its positive values span this ratio.
_LOG_RATIO = 30.0


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


def run_style(index):
    """The (colour, line style, marker) of the `index`-th run.

    The first 48 runs get distinct (colour, line style) pairs; colours repeat
    every 12 runs, each time with another line style.

    Args:
        index: the run's position, from 0.

    Returns:
        A tuple (colour, linestyle, marker).
    """
    color = RUN_COLORS[index % len(RUN_COLORS)]
    style = _LINESTYLES[(index + index // len(RUN_COLORS)) % len(_LINESTYLES)]
    return color, style, _MARKERS[index % len(_MARKERS)]


# Gram heat maps ---------------------------------------------------------------


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


def _names(modality_names, size):
    names = [str(n) for n in modality_names]
    if len(names) != size:
        raise ValueError(
            f"`modality_names` has {len(names)} names but the Gram matrices are "
            f"{size}x{size}: give one name per modality."
        )
    return names


def _class_rows(class_grams, size=None):
    """[(label, teacher, student)] from a dict class -> (teacher, student)."""
    if not isinstance(class_grams, dict) or not class_grams:
        raise ValueError(
            "`class_grams` must be a non-empty dict class -> (teacher_gram, "
            f"student_gram); got {type(class_grams).__name__}."
        )
    rows = []
    for label, pair in class_grams.items():
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ValueError(
                f"`class_grams[{label!r}]` must be a pair (teacher_gram, student_gram)."
            )
        teacher = _square(f"class_grams[{label!r}][0]", pair[0], size)
        size = teacher.shape[0]
        student = _square(f"class_grams[{label!r}][1]", pair[1], size)
        rows.append((str(label), teacher, student))
    return rows


def _off_diagonal(matrices):
    """The off-diagonal entries of (M, M) matrices, flat (all entries if M = 1)."""
    stack = np.stack(matrices)
    size = stack.shape[-1]
    if size == 1:
        return stack.reshape(-1)
    return stack[:, ~np.eye(size, dtype=bool)].reshape(-1)


def gram_color_limits(matrices):
    """Colour limits of Gram heat maps: the range of the off-diagonal entries.

    The diagonal (1 for cosine Grams, a squared norm otherwise) would
    otherwise set the scale and squash the cross-modality relations into one
    colour; the heat maps grey it out and print its value.

    Args:
        matrices: (M, M) arrays drawn on one scale.

    Returns:
        (vmin, vmax), widened by 1 on each side if all entries are equal.
    """
    values = _off_diagonal(matrices)
    vmin, vmax = float(values.min()), float(values.max())
    if vmin == vmax:
        vmin, vmax = vmin - 1.0, vmax + 1.0
    return vmin, vmax


def _heatmap(ax, matrix, names, limits, cmap, fmt, title, fontsize, ticks=True):
    from matplotlib.patches import Rectangle

    size = matrix.shape[0]
    diagonal = np.eye(size, dtype=bool) if size > 1 else np.zeros((1, 1), bool)
    vmin, vmax = limits
    image = ax.imshow(
        np.ma.masked_array(matrix, mask=diagonal),
        vmin=vmin,
        vmax=vmax,
        cmap=cmap,
        interpolation="nearest",
    )
    for i in np.flatnonzero(diagonal.any(1)):
        ax.add_patch(
            Rectangle(
                (i - 0.5, i - 0.5),
                1,
                1,
                facecolor="0.88",
                edgecolor="0.6",
                hatch="///",
                lw=0,
            )
        )
    positions = np.arange(size)
    if ticks:
        ax.set_xticks(positions, labels=names, rotation=45, ha="right")
        ax.set_yticks(positions, labels=names)
    else:
        ax.set_xticks(positions, labels=[])
        ax.set_yticks(positions, labels=[])
    ax.tick_params(length=0, labelsize="small")
    if title:
        ax.set_title(title, fontsize="medium")
    if fontsize:
        # The colour maps are light at the top: dark text there, light below.
        middle = (vmin + vmax) / 2
        for (i, j), v in np.ndenumerate(matrix):
            if diagonal[i, j]:
                color, style = "0.35", "italic"
            else:
                color, style = ("black" if v > middle else "white"), "normal"
            ax.text(
                j,
                i,
                format(v, fmt),
                ha="center",
                va="center",
                fontsize=fontsize,
                color=color,
                style=style,
            )
    return image


def _gram_cmaps():
    from matplotlib import colormaps

    # Masked (diagonal) cells show the hatched patch underneath.
    return (
        colormaps["viridis"].with_extremes(bad=(0, 0, 0, 0)),
        colormaps["magma"].with_extremes(bad=(0, 0, 0, 0)),
    )


def _draw_gram_rows(fig, rows, names, fmt, ncols_groups=1, annotate=True):
    """Teacher, student and |difference| maps for each row, `ncols_groups`
    rows side by side; one colour bar for teacher and student, one for the
    difference, beside the maps. Returns the maps' axes, row by row."""
    gram_cmap, diff_cmap = _gram_cmaps()
    limits = gram_color_limits([m for _, t, s in rows for m in (t, s)])
    diffs = [np.abs(t - s) for _, t, s in rows]
    dmax = max(float(_off_diagonal(diffs).max()), 1e-12)
    size = len(names)
    fontsize = None
    if annotate:
        fontsize = "small" if size <= 6 else "x-small" if size <= 9 else None

    nrows = -(-len(rows) // ncols_groups)
    # A narrow empty column between side-by-side classes keeps them apart.
    columns = [c for g in range(ncols_groups) for c in ([1.0] * 3 + [0.25])][:-1]
    grid = fig.subplots(
        nrows, len(columns), squeeze=False, gridspec_kw={"width_ratios": columns}
    )
    for ax in grid[:, 3::4].ravel():
        ax.remove()
    maps = []
    for index, ((label, t, s), diff) in enumerate(zip(rows, diffs, strict=True)):
        r, g = divmod(index, ncols_groups)
        ax_t, ax_s, ax_d = grid[r, 4 * g : 4 * g + 3]
        prefix = f"{label}: " if label else ""
        image = _heatmap(
            ax_t, t, names, limits, gram_cmap, fmt, prefix + "teacher", fontsize
        )
        _heatmap(ax_s, s, names, limits, gram_cmap, fmt, prefix + "student", fontsize)
        diff_image = _heatmap(
            ax_d,
            diff,
            names,
            (0.0, dmax),
            diff_cmap,
            fmt,
            prefix + "|teacher - student|",
            fontsize,
        )
        maps += [ax_t, ax_s, ax_d]
    for empty in range(len(rows), nrows * ncols_groups):
        r, g = divmod(empty, ncols_groups)
        for ax in grid[r, 4 * g : 4 * g + 3]:
            ax.remove()
    # One column of classes: each bar beside its maps; several: both bars
    # at the right of the grid (a bar needs a contiguous block of maps).
    beside = ncols_groups == 1
    pairs = [ax for i, ax in enumerate(maps) if i % 3 != 2]
    bars = [
        (image, pairs, "Gram (off-diagonal scale; diagonal hatched)"),
        (diff_image, maps[2::3], "|teacher - student|"),
    ]
    for mappable, beside_maps, label in bars if beside else bars[::-1]:
        fig.colorbar(
            mappable,
            ax=beside_maps if beside else maps,
            location="right",
            shrink=0.9,
            label=label,
        )
    return maps


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
    colours mean equal values) and |teacher - student| (own scale from 0),
    each with its colour bar beside it. The colour scales come from the
    off-diagonal entries (`gram_color_limits`): the diagonal is hatched grey
    and only printed. Each cell is annotated with its value; modality names
    label both axes. For per-class maps, prefer `plot_class_gram_matrices`
    (a separate, compact figure).

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
    names = _names(modality_names, size)
    rows = [("", teacher, student)]
    if class_grams is not None:
        rows += [(f"class {c}", t, s) for c, t, s in _class_rows(class_grams, size)]

    side = 0.42 * size + 1.0
    row = side + 0.4 if len(rows) == 1 else 0.8 * side + 0.6
    fig = _new_figure((3 * side + 2.4, len(rows) * row + (0.6 if title else 0.2)))
    _draw_gram_rows(fig, rows, names, fmt)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_class_gram_matrices(
    class_grams,
    modality_names,
    path=None,
    title=None,
    fmt=".1f",
    ncols=2,
    annotate=None,
):
    """Per-class teacher, student and |difference| Gram maps in one compact
    figure: `ncols` classes per row, one colour scale for every teacher and
    student map (from the off-diagonal entries, as in `plot_gram_matrices`)
    and one for every difference, with the colour bars beside the maps.

    Args:
        class_grams: dict class -> (teacher_gram, student_gram) of (M, M)
            arrays, drawn in the dict's order and labelled by its keys.
        modality_names: list of M names, in the matrices' order.
        path: optional file path; the figure is saved there as PNG.
        title: optional figure title.
        fmt: format spec of the annotated values.
        ncols: classes side by side per row.
        annotate: print each cell's value (default: when M <= 6).

    Returns:
        The `matplotlib.figure.Figure`.

    Example:

    >>> t = np.array([[1.0, 0.8], [0.8, 1.0]])
    >>> fig = plot_class_gram_matrices({0: (t, t), 1: (t, 0.5 * t)}, ["a", "b"])
    >>> fig.axes[3].get_title()
    '1: teacher'
    """
    rows = _class_rows(class_grams)
    size = rows[0][1].shape[0]
    names = _names(modality_names, size)
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"`ncols` must be a positive int; got {ncols!r}.")
    ncols = min(ncols, len(rows))
    nrows = -(-len(rows) // ncols)
    annotate = size <= 6 if annotate is None else bool(annotate)
    side = 0.32 * size + 0.9
    fig = _new_figure(
        (3 * ncols * side + 2.4, nrows * (0.72 * side + 0.6) + (0.6 if title else 0.2))
    )
    _draw_gram_rows(fig, rows, names, fmt, ncols_groups=ncols, annotate=annotate)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# Paired differences -------------------------------------------------------------


def plot_paired_differences(
    diffs, reference, path=None, title=None, setting=None, seeds=None
):
    """Per-method paired differences to a reference, in points.

    One row per method: each seed's difference as a dot, the mean as a bar
    with a ±1 standard-error whisker (none for a single seed), its value
    printed beside it, and a line at 0. The title names the reference, the
    setting and the number of seeds.

    Args:
        diffs: dict method -> list of per-seed differences (fractions, e.g.
            accuracy differences; drawn ×100 as points).
        reference: the reference method's name, for the axis label.
        path: optional PNG path.
        title: optional figure title (default: built from `reference`,
            `setting` and `seeds`).
        setting: optional name of the data setting, for the default title.
        seeds: optional number of seeds for the default title (default: the
            most differences any method has).

    Returns:
        The `matplotlib.figure.Figure`.

    Example:

    >>> fig = plot_paired_differences({"gram": [0.01, -0.002, 0.004]}, "kd")
    >>> fig.axes[0].get_xlabel()
    'accuracy − kd (points), mean ± se'
    >>> fig.get_suptitle()
    'Paired accuracy difference to kd per method, 3 seeds'
    """
    if not diffs:
        raise ValueError(
            "diffs is empty: give at least one method besides the reference."
        )
    names = list(diffs)
    values = {
        n: 100 * np.asarray(diffs[n], dtype=np.float64).reshape(-1) for n in names
    }
    empty = [n for n in names if values[n].size == 0]
    if empty:
        raise ValueError(f"diffs[{empty[0]!r}] has no values.")
    if seeds is None:
        seeds = max(v.size for v in values.values())
    if title is None:
        where = f", {setting} setting" if setting else ""
        count = f"{seeds} seed" + ("" if seeds == 1 else "s")
        title = f"Paired accuracy difference to {reference} per method{where}, {count}"

    fig = _new_figure((7.0, 0.45 * len(names) + 1.6))
    ax = fig.subplots()
    for row, name in enumerate(names):
        v = values[name]
        mean = float(v.mean())
        se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0
        ax.barh(
            row,
            mean,
            xerr=se or None,
            color="tab:blue",
            alpha=0.35,
            capsize=4,
            height=0.6,
        )
        ax.plot(v, np.full(v.size, row), "o", color="tab:blue", ms=4)
        text = f"{mean:+.2f} ± {se:.2f}" if v.size > 1 else f"{mean:+.2f}"
        ax.annotate(
            text,
            (1.0, row),
            xycoords=("axes fraction", "data"),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize="small",
        )
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(len(names)), labels=names)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel(f"accuracy − {reference} (points), mean ± se")
    fig.suptitle("\n".join(textwrap.wrap(title, 70)))
    return _save(fig, path)


# Training curves ----------------------------------------------------------------


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


def _single_run_keys(found):
    """Base metric names (`val_` stripped): losses first, then the others."""
    bases = []
    for key in found:
        base = key[4:] if key.startswith("val_") else key
        if base not in bases:
            bases.append(base)
    ordered = [k for k in _LOSS_ORDER if k in bases]
    return ordered + [k for k in bases if k not in _LOSS_ORDER]


# Not compared by default: weighted totals (their scale is set by each
# method's term weights) and the count of rows the Distiller left out.
_NOT_COMPARED = ("loss", "total_loss", "skipped_samples")


def _comparison_keys(found):
    """Panels that compare runs: held-out scores, training scores, the task
    loss, then each term's loss."""

    def is_loss(k):
        return k.endswith("loss")

    kept = [k for k in found if k.removeprefix("val_") not in _NOT_COMPARED]
    val = [k for k in kept if k.startswith("val_")]
    train = [k for k in kept if not k.startswith("val_")]
    ordered = [k for k in val if not is_loss(k)]
    ordered += [k for k in train if not is_loss(k)]
    ordered += [k for k in train if k == "task_loss"]
    ordered += [k for k in train if is_loss(k) and k != "task_loss"]
    return ordered or list(found)


def _default_title(key, multi):
    if key.startswith("val_"):
        return f"{key[4:]}, validation"
    return f"{key}, training" if multi else key


def _use_log_scale(series):
    values = np.concatenate([np.asarray(v).reshape(-1) for v in series])
    values = values[np.isfinite(values)]
    if values.size == 0 or values.min() <= 0:
        return False
    return values.max() / values.min() >= _LOG_RATIO


def plot_training_curves(
    history, path=None, keys=None, title=None, titles=None, log_scale="auto"
):
    """Plots training curves by epoch, one panel per metric.

    A single run: each panel shows a metric, training (solid) and its `val_`
    counterpart (dashed) where present; first `loss`, `task_loss`, `kd_loss`,
    `gram_loss`, then the other metrics in the history's order.

    Several runs (a dict name -> history), to compare them: each run gets its
    own colour, line style and marker (`run_style`), with one legend beside
    the panels. By default the panels are the held-out scores (`val_`
    metrics other than losses, e.g. `val_accuracy`), the training scores,
    the task loss and each term's loss (e.g. `kd_loss`, `gram_loss`), each
    only for the runs that have it; weighted totals (`loss`, whose scale the
    term weights set) and `skipped_samples` are left out (pass `keys` to
    choose). Panels whose values span a wide range use a log
    scale.

    Args:
        history: a Keras `History`, its `.history` dict (metric -> per-epoch
            values), or a dict run name -> one of those.
        path: optional file path; the figure is saved there as PNG.
        keys: optional list of metric names to plot, one panel each. For a
            single run, names without `val_` (the `val_` curve joins its
            panel); for several runs, any history key (`val_accuracy` is its
            own panel).
        title: optional figure title.
        titles: optional dict key -> panel title (default: the key; for
            several runs "x, training" and "x, validation" for `val_x`); keys
            not plotted are ignored.
        log_scale: "auto" (log where a panel's positive values span a ratio
            of 30 or more), True or False.

    Returns:
        The `matplotlib.figure.Figure`.

    Example:

    >>> h = {"loss": [1.0, 0.6], "gram_loss": [0.3, 0.1], "val_loss": [1.1, 0.8]}
    >>> fig = plot_training_curves(h)
    >>> [ax.get_title() for ax in fig.axes]
    ['loss', 'gram_loss']
    """
    multi = _is_multi_run(history)
    if multi:
        runs = {
            str(k): _as_history_dict(f"history[{k!r}]", v) for k, v in history.items()
        }
    else:
        runs = {"": _as_history_dict("history", history)}
    if log_scale not in ("auto", True, False):
        raise ValueError(
            f'`log_scale` must be "auto", True or False; got {log_scale!r}.'
        )
    if titles is not None and not isinstance(titles, dict):
        raise ValueError(f"`titles` must be a dict key -> title; got {titles!r}.")

    found = []
    for run in runs.values():
        found += [k for k in run if k not in found]
    ordered = _comparison_keys(found) if multi else _single_run_keys(found)
    if keys is not None:
        if isinstance(keys, str):
            keys = [keys]
        if not keys:
            raise ValueError(f"`keys` is empty; metrics in the history: {found}.")
        known = found if multi else _single_run_keys(found)
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise ValueError(
                f"Unknown metric(s) {unknown} in `keys`; metrics in the history: "
                f"{known}."
            )
        ordered = list(keys)

    ncols = min(4 if len(ordered) > 6 else 3, len(ordered))
    nrows = -(-len(ordered) // ncols)
    fig = _new_figure((3.6 * ncols + (2.0 if multi else 0.8), 2.9 * nrows + 0.5))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    legend = {}
    for ax, key in zip(axes, ordered, strict=False):
        if multi:
            series = [
                (name, key, run_style(i))
                for i, name in enumerate(runs)
                if key in runs[name]
            ]
        else:
            color = run_style(0)[0]
            series = [
                (split, k, (color, style, "o"))
                for k, style, split in (
                    (key, "-", "train"),
                    (f"val_{key}", "--", "val"),
                )
                if k in runs[""]
            ]
        drawn = []
        for label, k, (color, style, marker) in series:
            values = runs[label if multi else ""][k]
            (line,) = ax.plot(
                np.arange(1, values.size + 1),
                values,
                linestyle=style,
                color=color,
                marker=marker if values.size < 30 else None,
                markersize=3.5,
                lw=1.4,
                label=label,
            )
            legend.setdefault(label, line)
            drawn.append(values)
        if log_scale is True or (log_scale == "auto" and _use_log_scale(drawn)):
            ax.set_yscale("log")
        name = (titles or {}).get(key) or _default_title(key, multi)
        ax.set_title("\n".join(textwrap.wrap(name, 42)), fontsize="medium")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    for ax in axes[len(ordered) :]:
        ax.remove()
    fig.legend(
        list(legend.values()),
        list(legend),
        loc="outside right upper",
        title="method" if multi else None,
        fontsize="small",
        handlelength=3.0,
    )
    if title:
        fig.suptitle(title)
    return _save(fig, path)
