"""Tests for keras_gramkd.export.formats: the registry of export formats.

A toy format, registered by a fixture and by nothing else, is written and
verified end to end by `export_student`: a new format is one record.
"""

from pathlib import Path

import keras
import numpy as np
import pytest

from keras_gramkd import export as gx
from keras_gramkd.export import formats
from keras_gramkd.export.convert import in_process_supported
from keras_gramkd.export.inputs import input_names

BACKENDS = ("tensorflow", "jax", "torch")


def save_weights(model, out, quantize, calibration, int8_io):
    """The toy converter: the model's JSON and its weights in one `.npz` file."""
    dtype = "float16" if quantize == "float16" else "float32"
    weights = [keras.ops.convert_to_numpy(w.value).astype(dtype) for w in model.weights]
    np.savez(out, np.array(model.to_json()), *weights)


class WeightsRunner:
    """The toy runtime: rebuilds the Keras model from the file and runs it."""

    dynamic_batch = True

    def __init__(self, path):
        with np.load(path) as npz:
            arrays = [npz[f"arr_{i}"] for i in range(len(npz.files))]
        self.model = keras.models.model_from_json(str(arrays[0]))
        self.model.set_weights([w.astype("float32") for w in arrays[1:]])
        self.names = input_names(self.model)

    def input_dtypes(self):
        return {name: "float32" for name in self.names}

    def __call__(self, data):
        outputs = self.model.predict_on_batch({k: data[k] for k in self.names})
        return [np.asarray(y, np.float32) for y in keras.tree.flatten(outputs)]


def toy_format(**overrides):
    fields = {
        "name": "toy",
        "suffix": ".npz",
        "convert": save_weights,
        "runner": WeightsRunner,
        "runtime": "keras",
        "aliases": ("weights",),
        "in_process": dict.fromkeys(BACKENDS),
        "quantizations": (None, "float16"),
    }
    return formats.ExportFormat(**{**fields, **overrides})


@pytest.fixture
def toy():
    fmt = toy_format()
    gx.register_format(fmt)
    yield fmt
    gx.unregister_format("toy")


def _model():
    keras.utils.set_random_seed(0)
    inputs = {n: keras.Input((d,), name=n) for n, d in (("a", 4), ("b", 3))}
    fused = keras.layers.Concatenate()([inputs["a"], inputs["b"]])
    hidden = keras.layers.Dense(8, activation="relu")(fused)
    return keras.Model(inputs, keras.layers.Dense(3)(hidden), name="tiny")


def test_a_registered_format_is_written_and_verified(toy, tmp_path):
    report = gx.export_student(
        _model(), tmp_path, formats=["toy"], quantize=[None, "float16"], latency_runs=1
    )
    assert report.ok
    assert [(r.format, r.quantize) for r in report.rows] == [
        ("toy", None),
        ("toy", "float16"),
    ]
    for row in report.rows:
        assert Path(row.file).is_file() and row.file.endswith(".npz")
        assert row.path == "in-process"
        assert row.note.startswith("keras, 64 samples")
        assert row.inputs == {"a": "float32", "b": "float32"}
        assert row.batch_sizes == "1, dynamic"
    assert report.rows[0].max_abs_diff <= 1e-6
    assert 0 < report.rows[1].max_abs_diff <= 1e-2
    assert Path(report.rows[0].file).name == "tiny_float32.npz"


def test_the_format_is_found_by_alias_and_by_suffix(toy, tmp_path):
    model = _model()
    (row,) = gx.export_student(model, tmp_path, formats="WEIGHTS", latency_runs=1).rows
    assert gx.get_format("weights") is toy
    assert formats.format_for_file(row.file) is toy
    again = gx.verify_artifact(
        row.file,
        model,
        {"a": np.ones((5, 4), "float32"), "b": np.ones((5, 3), "float32")},
    )
    assert again.passed and again.format == "toy"


def test_a_quantisation_the_format_lacks_is_refused(toy, tmp_path):
    with pytest.raises(ValueError, match=r"'toy' format cannot be quantised as"):
        gx.export_student(_model(), tmp_path, formats="toy", quantize="int8")


def test_unknown_names_list_the_registered_formats(toy, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"choose from \['tflite', 'onnx', 'toy'\] \('litert' is accepted "
        r"for 'tflite', 'weights' is accepted for 'toy'\)\.",
    ):
        gx.export_student(_model(), tmp_path, formats="coreml")


def test_unregistering_removes_the_format(tmp_path):
    gx.register_format(toy_format())
    assert gx.format_names() == ("tflite", "onnx", "toy")
    assert gx.unregister_format("weights").name == "toy"
    assert gx.format_names() == ("tflite", "onnx")
    with pytest.raises(ValueError, match="Unknown export format 'toy'"):
        gx.export_student(_model(), tmp_path, formats="toy")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"name": "onnx"}, r"name\(s\) \['onnx'\] are already registered"),
        ({"aliases": ("litert",)}, r"\['litert'\] are already registered"),
        ({"suffix": ".tflite"}, r"'.tflite' is already 'tflite''s"),
        ({"quantizations": (None, "int4")}, r"unknown quantisation\(s\) \['int4'\]"),
    ],
)
def test_clashing_records_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        gx.register_format(toy_format(**overrides))
    assert gx.format_names() == ("tflite", "onnx")


def test_a_format_the_child_process_lacks_fails_before_converting(tmp_path):
    gx.register_format(toy_format(in_process={}))
    try:
        with pytest.raises(ValueError, match=r"\['toy'\] cannot be converted"):
            gx.export_student(_model(), tmp_path, formats="toy")
    finally:
        gx.unregister_format("toy")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "version, here", [("3.14.1", False), ("3.15.0", True), ("4.0.0", True)]
)
def test_torch_writes_onnx_here_from_keras_3_15(monkeypatch, version, here):
    """Keras 3.14's torch backend refuses dict inputs in export_onnx: there the
    ONNX file is written in the TensorFlow child process."""
    monkeypatch.setattr(keras, "version", lambda: version)
    assert gx.get_format("onnx").converts_in_process("torch") is here


def test_the_built_in_records():
    assert gx.FORMATS == gx.format_names() == ("tflite", "onnx")
    assert gx.QUANTIZATIONS == (None, "float16", "dynamic", "int8")
    tflite, onnx = gx.get_format("litert"), gx.get_format("onnx")
    assert (tflite.suffix, onnx.suffix) == (".tflite", ".onnx")
    assert tflite.quantize_file is None and onnx.quantize_file is not None
    assert tflite.converts_in_process("tensorflow")
    assert not tflite.converts_in_process("torch")
    assert onnx.converts_in_process("torch") == formats.torch_onnx_takes_dicts()
    for fmt in (tflite, onnx):
        assert in_process_supported(fmt.name) == fmt.converts_in_process()
    with pytest.raises(ValueError, match=r"x\.bin: expected a \.tflite or \.onnx"):
        formats.format_for_file("x.bin")
