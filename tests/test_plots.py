"""Tests for keras_gramkd.plots: Gram heat maps and training curves."""

import struct
import sys

import keras
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from keras_gramkd.plots import (  # noqa: E402
    gram_color_limits,
    plot_class_gram_matrices,
    plot_gram_matrices,
    plot_paired_differences,
    plot_training_curves,
    run_style,
)

NAMES = ["image", "audio", "text"]


def _grams(seed=0, m=3):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(m, 4)), rng.normal(size=(m, 6))
    return a @ a.T, b @ b.T


def _png_size(path):
    """(width, height) from a PNG header; fails if the file is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _annotations(ax):
    return [float(t.get_text()) for t in ax.texts]


def _off_diagonal(*matrices):
    m = matrices[0].shape[0]
    return np.concatenate([a[~np.eye(m, dtype=bool)] for a in matrices])


def _heatmaps(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def _colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_gram_plot_png_labels_and_annotated_values(tmp_path):
    teacher, student = _grams()
    path = tmp_path / "gram.png"
    fig = plot_gram_matrices(teacher, student, NAMES, path=path, title="epoch 3")

    width, height = _png_size(path)
    assert 600 < width < 1600 and 250 < height < 700
    assert path.stat().st_size > 10_000
    assert fig.get_suptitle() == "epoch 3"

    ax_t, ax_s, ax_d = fig.axes[:3]
    assert [ax.get_title() for ax in (ax_t, ax_s, ax_d)] == [
        "teacher",
        "student",
        "|teacher - student|",
    ]
    for ax in (ax_t, ax_s, ax_d):
        assert [t.get_text() for t in ax.get_xticklabels()] == NAMES
        assert [t.get_text() for t in ax.get_yticklabels()] == NAMES
    # Annotations, row-major, equal the matrices to the printed precision.
    np.testing.assert_allclose(_annotations(ax_t), teacher.ravel(), atol=0.005)
    np.testing.assert_allclose(_annotations(ax_s), student.ravel(), atol=0.005)
    np.testing.assert_allclose(
        _annotations(ax_d), np.abs(teacher - student).ravel(), atol=0.005
    )
    # Heat maps show the matrices, on one colour scale for teacher and student
    # set by the off-diagonal entries; the diagonal is masked and hatched.
    np.testing.assert_allclose(ax_t.images[0].get_array().data, teacher)
    np.testing.assert_allclose(ax_s.images[0].get_array().data, student)
    off = _off_diagonal(teacher, student)
    assert ax_t.images[0].get_clim() == ax_s.images[0].get_clim()
    assert ax_t.images[0].get_clim() == (off.min(), off.max())
    assert max(np.diag(teacher).max(), np.diag(student).max()) > off.max()
    diff = np.abs(teacher - student)
    assert ax_d.images[0].get_clim() == (0.0, _off_diagonal(diff).max())
    for ax in (ax_t, ax_s, ax_d):
        mask = np.ma.getmaskarray(ax.images[0].get_array())
        np.testing.assert_array_equal(mask, np.eye(3, dtype=bool))
        assert [p.get_hatch() for p in ax.patches] == ["///"] * 3


def test_gram_plot_class_rows(tmp_path):
    teacher, student = _grams(1)
    class_grams = {3: _grams(2), 7: _grams(3)}
    path = tmp_path / "classes.png"
    fig = plot_gram_matrices(
        teacher, student, NAMES, path=path, class_grams=class_grams, fmt=".3f"
    )
    heatmaps = _heatmaps(fig)
    assert [ax.get_title() for ax in heatmaps] == [
        "teacher",
        "student",
        "|teacher - student|",
        "class 3: teacher",
        "class 3: student",
        "class 3: |teacher - student|",
        "class 7: teacher",
        "class 7: student",
        "class 7: |teacher - student|",
    ]
    np.testing.assert_allclose(
        _annotations(heatmaps[4]), class_grams[3][1].ravel(), atol=0.0005
    )
    np.testing.assert_allclose(
        _annotations(heatmaps[6]), class_grams[7][0].ravel(), atol=0.0005
    )
    # One colour scale across all teacher and student maps of all rows, from
    # their off-diagonal entries.
    off = _off_diagonal(teacher, student, *class_grams[3], *class_grams[7])
    for ax in heatmaps:
        if not ax.get_title().endswith("|"):
            assert ax.images[0].get_clim() == (off.min(), off.max())
    # Three rows of heat maps are much taller than one.
    single = tmp_path / "single.png"
    plot_gram_matrices(teacher, student, NAMES, path=single)
    assert _png_size(path)[1] > 2 * _png_size(single)[1]


def test_gram_plot_accepts_backend_tensors():
    teacher, student = _grams(4)
    fig = plot_gram_matrices(
        keras.ops.convert_to_tensor(teacher.astype("float32")),
        keras.ops.convert_to_tensor(student.astype("float32")),
        NAMES,
    )
    np.testing.assert_allclose(_annotations(fig.axes[0]), teacher.ravel(), atol=0.005)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((np.eye(3), np.eye(2), NAMES), {}, r"`student_gram` has shape \(2, 2\)"),
        ((np.eye(3), np.eye(3), ["a", "b"]), {}, r"2 names.*3x3"),
        ((np.ones((3, 2)), np.eye(3), NAMES), {}, r"`teacher_gram` must be a square"),
        ((np.eye(3), np.eye(3), NAMES), {"class_grams": {1: (np.eye(3),)}}, "pair"),
        (
            (np.eye(3), np.eye(3), NAMES),
            {"class_grams": {1: (np.eye(3), np.eye(4))}},
            r"class_grams\[1\]\[1\].*same shape",
        ),
        ((np.full((3, 3), np.nan), np.eye(3), NAMES), {}, "non-finite"),
    ],
)
def test_gram_plot_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plot_gram_matrices(*args, **kwargs)


HISTORY = {
    "accuracy": [0.5, 0.7, 0.8],
    "gram_loss": [0.3, 0.2, 0.1],
    "kd_loss": [0.9, 0.6, 0.5],
    "loss": [2.0, 1.4, 1.1],
    "task_loss": [0.8, 0.6, 0.5],
    "val_accuracy": [0.4, 0.6, 0.7],
    "val_loss": [2.2, 1.6, 1.3],
}


def test_training_curves_from_history_object(tmp_path):
    history = keras.callbacks.History()
    history.history = dict(HISTORY)
    path = tmp_path / "curves.png"
    fig = plot_training_curves(history, path=path)
    width, height = _png_size(path)
    assert width > 600 and height > 300
    assert [ax.get_title() for ax in fig.axes] == [
        "loss",
        "task_loss",
        "kd_loss",
        "gram_loss",
        "accuracy",
    ]
    by_title = {ax.get_title(): ax for ax in fig.axes}
    train, val = by_title["loss"].lines
    np.testing.assert_allclose(train.get_ydata(), HISTORY["loss"])
    np.testing.assert_allclose(train.get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(val.get_ydata(), HISTORY["val_loss"])
    assert train.get_linestyle() == "-" and val.get_linestyle() == "--"
    assert len(by_title["gram_loss"].lines) == 1  # no val_gram_loss
    np.testing.assert_allclose(
        by_title["accuracy"].lines[1].get_ydata(), HISTORY["val_accuracy"]
    )


def test_training_curves_several_runs_and_keys(tmp_path):
    runs = {
        "gram": HISTORY,
        "kd only": {"loss": [3.0, 2.0], "kd_loss": [1.0, 0.5], "val_loss": [3, 2.5]},
    }
    fig = plot_training_curves(runs, path=tmp_path / "runs.png", keys=["kd_loss"])
    assert [ax.get_title() for ax in fig.axes] == ["kd_loss, training"]
    (ax,) = fig.axes
    labels = [line.get_label() for line in ax.lines]
    assert labels == ["gram", "kd only"]
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [1.0, 0.5])
    assert ax.lines[0].get_color() != ax.lines[1].get_color()
    assert _png_size(tmp_path / "runs.png")[0] > 200

    fig = plot_training_curves(runs, keys=["loss", "val_loss", "val_accuracy"])
    by_title = {ax.get_title(): ax for ax in fig.axes}
    assert len(by_title["loss, training"].lines) == 2
    assert len(by_title["loss, validation"].lines) == 2
    assert len(by_title["accuracy, validation"].lines) == 1  # only "gram" has it


@pytest.mark.parametrize(
    "history, kwargs, match",
    [
        ({}, {}, r"history is empty"),
        (keras.callbacks.History(), {}, r"history is empty"),
        ({"a": {"loss": [1.0]}, "b": {}}, {}, r"history\['b'\] is empty"),
        ({"loss": []}, {}, r"history\['loss'\] has no values"),
        ({"loss": [1.0]}, {"keys": ["gram_loss"]}, r"'gram_loss'.*metrics.*'loss'"),
        ({"loss": [1.0]}, {"keys": []}, r"`keys` is empty"),
        ([1.0, 2.0], {}, r"keras History or a dict"),
        ({"loss": [1.0]}, {"log_scale": "yes"}, r"`log_scale` must be"),
        ({"loss": [1.0]}, {"titles": ["a"]}, r"`titles` must be a dict"),
        ({"a": {"loss": [1.0]}}, {"keys": ["val_loss"]}, r"'val_loss'.*metrics"),
    ],
)
def test_training_curves_errors(history, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plot_training_curves(history, **kwargs)


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r'pip install "keras-gramkd\[plots\]"'):
        plot_training_curves({"loss": [1.0]})


def test_gram_plot_colour_bars_beside_the_maps():
    teacher, student = _grams(1)
    fig = plot_gram_matrices(teacher, student, NAMES, class_grams={3: _grams(2)})
    fig.canvas.draw()
    bars = _colorbars(fig)
    maps = _heatmaps(fig)
    assert [bar.get_ylabel() for bar in bars] == [
        "Gram (off-diagonal scale; diagonal hatched)",
        "|teacher - student|",
    ]
    gram_bar, diff_bar = (bar.get_position() for bar in bars)
    student, diff = maps[1].get_position(), maps[2].get_position()
    # Teacher | student | Gram bar | difference | its bar, vertically centred.
    assert student.x1 < gram_bar.x0 < gram_bar.x1 < diff.x0 < diff.x1 < diff_bar.x0
    for bar in (gram_bar, diff_bar):
        assert (
            bar.y0 < maps[-1].get_position().y1 and bar.y1 > maps[0].get_position().y0
        )


def test_gram_colour_limits_ignore_the_diagonal():
    cosine = np.array([[1.0, 0.1, 0.4], [0.1, 1.0, 0.3], [0.4, 0.3, 1.0]])
    other = np.array([[1.0, 0.2, 0.5], [0.2, 1.0, 0.25], [0.5, 0.25, 1.0]])
    assert gram_color_limits([cosine, other]) == (0.1, 0.5)
    assert gram_color_limits([np.array([[2.0]])]) == (1.0, 3.0)  # M = 1: all
    fig = plot_gram_matrices(np.array([[2.0]]), np.array([[1.5]]), ["a"])
    assert fig.axes[0].images[0].get_clim() == (1.5, 2.0)


def test_class_gram_figure_is_compact_and_readable(tmp_path):
    names = ["fou", "fac", "kar", "pix", "zer", "mor"]
    rng = np.random.default_rng(5)
    class_grams = {}
    for c in range(10):
        a = rng.normal(size=(6, 8)) + 1.0
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b = a + 0.3 * rng.normal(size=a.shape)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        class_grams[f"digit {c}"] = (a @ a.T, b @ b.T)
    path = tmp_path / "gram_per_class.png"
    fig = plot_class_gram_matrices(class_grams, names, path=path, title="per digit")
    width, height = _png_size(path)
    assert 1000 < width < 2400 and 800 < height < 2000
    assert fig.get_suptitle() == "per digit"
    maps = _heatmaps(fig)
    assert len(maps) == 30 and all(len(ax.images) == 1 for ax in maps)
    assert [ax.get_title() for ax in maps[3:6]] == [
        "digit 1: teacher",
        "digit 1: student",
        "digit 1: |teacher - student|",
    ]
    off = _off_diagonal(*(m for pair in class_grams.values() for m in pair))
    diffs = [np.abs(t - s) for t, s in class_grams.values()]
    for i, ax in enumerate(maps):
        limits = (0.0, _off_diagonal(*diffs).max()) if i % 3 == 2 else None
        assert ax.images[0].get_clim() == (limits or (off.min(), off.max()))
    assert len(_colorbars(fig)) == 2
    np.testing.assert_allclose(
        _annotations(maps[4]), class_grams["digit 1"][1].ravel(), atol=0.05
    )
    # Without annotations (many modalities by default), one class per row.
    fig = plot_class_gram_matrices(
        {0: class_grams["digit 0"]}, names, ncols=3, annotate=False
    )
    assert [len(ax.texts) for ax in _heatmaps(fig)] == [0, 0, 0]


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (({}, NAMES), {}, "non-empty dict"),
        (({1: (np.eye(3), np.eye(2))}, NAMES), {}, r"class_grams\[1\]\[1\]"),
        (({1: (np.eye(3), np.eye(3))}, NAMES[:2]), {}, "2 names"),
        (({1: (np.eye(3), np.eye(3))}, NAMES), {"ncols": 0}, "`ncols`"),
    ],
)
def test_class_gram_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plot_class_gram_matrices(*args, **kwargs)


def test_paired_differences_title_and_values(tmp_path):
    diffs = {"gram": [0.01, -0.002, 0.004], "sp": [0.02, 0.01, 0.0]}
    path = tmp_path / "paired.png"
    fig = plot_paired_differences(diffs, "kd", path=path, setting="noisy")
    assert fig.get_suptitle() == (
        "Paired accuracy difference to kd per method, noisy setting, 3 seeds"
    )
    width, height = _png_size(path)
    assert 500 < width < 1000 and 200 < height < 600
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["gram", "sp"]
    dots = [line for line in ax.lines if line.get_marker() == "o"]
    np.testing.assert_allclose(dots[0].get_xdata(), [1.0, -0.2, 0.4])
    np.testing.assert_allclose(dots[1].get_ydata(), [1, 1, 1])
    assert [t.get_text() for t in ax.texts] == ["+0.40 ± 0.35", "+1.00 ± 0.58"]
    fig = plot_paired_differences({"gram": [0.01]}, "kd", seeds=1)
    assert fig.get_suptitle().endswith(", 1 seed")
    fig = plot_paired_differences(diffs, "kd", title="my title")
    assert fig.get_suptitle() == "my title"
    with pytest.raises(ValueError, match="diffs is empty"):
        plot_paired_differences({}, "kd")
    with pytest.raises(ValueError, match=r"diffs\['sp'\] has no values"):
        plot_paired_differences({"gram": [0.1], "sp": []}, "kd")


METHODS = [
    "labels",
    "kd",
    "keras_kd",
    "gram",
    "gram_batch_mean",
    "gram_off_diagonal",
    "sp",
    "rkd",
    "pkt",
    "fitnet",
    "modality_sp",
    "extra",
]


def _study_histories(validation=True):
    """Twelve methods' histories like the demo's: FitNet's loss near 400."""
    epochs = np.arange(1, 6)
    runs = {}
    for i, name in enumerate(METHODS):
        task = 2.0 * np.exp(-epochs / 3) + 0.01 * i
        run = {"accuracy": 0.9 - 0.5 * np.exp(-epochs / 2) - 0.01 * i}
        run["task_loss"] = task
        if name != "labels":
            run["kd_loss"] = 0.5 * np.exp(-epochs / 4) + 0.01 * i
        if name.startswith("gram"):
            run["gram_loss"] = 0.02 * np.exp(-epochs / 4) + 0.001 * i
        if name == "fitnet":
            run["fitnet_loss"] = 4.0 * np.exp(-epochs)
        run["loss"] = task + 100 * run.get("fitnet_loss", 0.0)
        if validation:
            run["val_accuracy"] = run["accuracy"] - 0.02
            run["val_loss"] = run["loss"] + 0.1
        runs[name] = {k: list(v) for k, v in run.items()}
    return runs


def test_curves_compare_twelve_methods(tmp_path):
    runs = _study_histories()
    path = tmp_path / "curves.png"
    label = "test accuracy per epoch (observed only; the last epoch is kept)"
    fig = plot_training_curves(
        runs, path=path, title="seed 0", titles={"val_accuracy": label, "nope": "x"}
    )
    width, height = _png_size(path)
    assert 1000 < width < 2200 and 500 < height < 1400
    assert fig.get_suptitle() == "seed 0"
    panels = fig.axes
    assert [ax.get_title().replace("\n", " ") for ax in panels] == [
        label,
        "accuracy, training",
        "task_loss, training",
        "kd_loss, training",
        "gram_loss, training",
        "fitnet_loss, training",
    ]
    assert all(ax.lines for ax in panels)  # no empty panel
    # The held-out curves, one per method, in each method's style.
    val = panels[0]
    assert [line.get_label() for line in val.lines] == METHODS
    styles = [(line.get_color(), line.get_linestyle()) for line in val.lines]
    assert len(set(styles)) == 12
    for i, name in enumerate(METHODS):
        np.testing.assert_allclose(val.lines[i].get_ydata(), runs[name]["val_accuracy"])
    # Each term's panel holds only the methods that have the term, styled alike.
    by_title = {ax.get_title(): ax for ax in panels}
    gram = by_title["gram_loss, training"]
    assert [line.get_label() for line in gram.lines] == [
        "gram",
        "gram_batch_mean",
        "gram_off_diagonal",
    ]
    assert (gram.lines[0].get_color(), gram.lines[0].get_linestyle()) == styles[3]
    assert len(by_title["kd_loss, training"].lines) == 11
    # FitNet's loss spans decades: log scale there, linear where it does not.
    assert by_title["fitnet_loss, training"].get_yscale() == "log"
    assert by_title["task_loss, training"].get_yscale() == "linear"
    # One legend beside the panels, one entry per method.
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == METHODS
    fig.canvas.draw()
    legend_box = legend.get_window_extent()
    for ax in panels:
        assert not legend_box.overlaps(ax.get_window_extent())


def test_curves_without_validation_and_with_keys():
    runs = _study_histories(validation=False)
    fig = plot_training_curves(runs, titles={"val_accuracy": "unused"})
    assert fig.axes[0].get_title() == "accuracy, training"
    assert not any("val" in ax.get_title() for ax in fig.axes)
    fig = plot_training_curves(runs, keys=["loss"], log_scale=False)
    (ax,) = fig.axes
    assert len(ax.lines) == 12 and ax.get_yscale() == "linear"
    fig = plot_training_curves(runs, keys=["loss"])
    assert fig.axes[0].get_yscale() == "log"  # FitNet's ~400 beside ~0.1


def test_run_styles_are_distinct():
    styles = [run_style(i) for i in range(48)]
    assert len({(color, line) for color, line, _ in styles}) == 48
    assert len({marker for _, _, marker in styles[:12]}) == 12
