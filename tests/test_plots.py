"""Tests for keras_gramkd.plots: Gram heat maps and training curves."""

import struct
import sys

import keras
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from keras_gramkd.plots import plot_gram_matrices, plot_training_curves  # noqa: E402

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


def test_gram_plot_png_labels_and_annotated_values(tmp_path):
    teacher, student = _grams()
    path = tmp_path / "gram.png"
    fig = plot_gram_matrices(teacher, student, NAMES, path=path, title="epoch 3")

    width, height = _png_size(path)
    assert width > 500 and height > 150
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
    # Heat maps show the matrices, on one colour scale for teacher and student.
    np.testing.assert_allclose(ax_t.images[0].get_array(), teacher)
    np.testing.assert_allclose(ax_s.images[0].get_array(), student)
    both = np.concatenate([teacher, student])
    assert ax_t.images[0].get_clim() == ax_s.images[0].get_clim()
    np.testing.assert_allclose(ax_t.images[0].get_clim(), (both.min(), both.max()))
    assert ax_d.images[0].get_clim()[0] == 0.0


def test_gram_plot_class_rows(tmp_path):
    teacher, student = _grams(1)
    class_grams = {3: _grams(2), 7: _grams(3)}
    path = tmp_path / "classes.png"
    fig = plot_gram_matrices(
        teacher, student, NAMES, path=path, class_grams=class_grams, fmt=".3f"
    )
    heatmaps = [ax for ax in fig.axes if ax.get_title()]
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
    # One colour scale across all teacher and student maps of all rows.
    all_grams = np.stack([teacher, student, *class_grams[3], *class_grams[7]])
    for ax in heatmaps:
        if not ax.get_title().endswith("|"):
            np.testing.assert_allclose(
                ax.images[0].get_clim(), (all_grams.min(), all_grams.max())
            )
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
    assert [ax.get_title() for ax in fig.axes] == ["kd_loss"]
    (ax,) = fig.axes
    labels = [line.get_label() for line in ax.lines]
    assert labels == ["gram train", "kd only train"]
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [1.0, 0.5])
    assert ax.lines[0].get_color() != ax.lines[1].get_color()
    assert _png_size(tmp_path / "runs.png")[0] > 200

    fig = plot_training_curves(runs)
    by_title = {ax.get_title(): ax for ax in fig.axes}
    assert len(by_title["loss"].lines) == 4  # two runs x (train, val)
    assert len(by_title["accuracy"].lines) == 2  # only the first run has it


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
    ],
)
def test_training_curves_errors(history, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plot_training_curves(history, **kwargs)


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r'pip install "keras-gramkd\[plots\]"'):
        plot_training_curves({"loss": [1.0]})


def test_gram_plot_has_a_colour_bar_under_each_column():
    # The bars sit under their own panels, so no empty gap opens between the
    # student and the difference columns.
    teacher, student = _grams(1)
    fig = plot_gram_matrices(teacher, student, NAMES, class_grams={3: _grams(2)})
    fig.canvas.draw()
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    panels = [ax for ax in fig.axes if ax.get_title()][:3]
    assert [bar.get_xlabel() for bar in bars] == ["Gram", "Gram", "|teacher - student|"]
    for bar, panel in zip(bars, panels, strict=True):
        b, p = bar.get_position(), panel.get_position()
        assert b.y1 < p.y0  # below the panels
        assert abs((b.x0 + b.x1) / 2 - (p.x0 + p.x1) / 2) < 0.1 * p.width
    gap = panels[2].get_position().x0 - panels[1].get_position().x1
    assert gap < 0.5 * panels[1].get_position().width
