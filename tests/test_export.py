"""Tests for keras_gramkd.export: TFLite (LiteRT) and ONNX export on any backend.

One multi-input student (three named inputs of the UCI digits) is trained once per
module and exported once in every quantisation; the tests then check the files in
their real runtimes. Runtimes are required (the `export` extra): a missing one fails
the test instead of skipping it.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from gramkd.options import add_export_arguments
from keras_gramkd import export as gx
from keras_gramkd.export import formats
from keras_gramkd.export.convert import in_process_supported
from keras_gramkd.export.inputs import all_layers, input_names, input_signature
from keras_gramkd.export.verify import agreement

INPUTS = ("pix", "fou", "kar")
REPO = Path(__file__).resolve().parents[1]
BACKEND = keras.backend.backend()


def _mfeat_path():
    candidates = [
        REPO / "keras_gramkd" / "datasets" / "mfeat.npz",
        REPO.parent / "shared" / "data" / "mfeat.npz",
        Path("/work/shared/data/mfeat.npz"),
    ]
    for path in candidates:
        if path.is_file():
            return path
    pytest.fail(f"mfeat.npz not found in {[str(p) for p in candidates]}")


@pytest.fixture(scope="module")
def digits():
    """Train/test split of three views, standardised with train statistics."""
    with np.load(_mfeat_path()) as npz:
        views = {name: npz[name].astype("float32") for name in INPUTS}
        labels = npz["label"].astype("int32")
    order = np.random.default_rng(0).permutation(len(labels))
    train, test = order[:1600], order[1600:]
    x_train, x_test = {}, {}
    for name, x in views.items():
        mean, std = x[train].mean(0), x[train].std(0) + 1e-6
        x_train[name] = (x[train] - mean) / std
        x_test[name] = (x[test] - mean) / std
    return x_train, labels[train], x_test, labels[test]


def _student(dims, width=256, dtype=None):
    inputs = {name: keras.Input((dim,), name=name) for name, dim in dims.items()}
    embeds = [
        keras.layers.Dense(width, activation="relu", name=f"{name}_embed", dtype=dtype)(
            inputs[name]
        )
        for name in dims
    ]
    fused = keras.layers.Concatenate()(embeds)
    hidden = keras.layers.Dense(64, activation="relu", dtype=dtype)(fused)
    logits = keras.layers.Dense(10, name="logits", dtype=dtype)(hidden)
    return keras.Model(inputs, logits, name="student")


@pytest.fixture(scope="module")
def student(digits):
    x_train, y_train, x_test, y_test = digits
    keras.utils.set_random_seed(0)
    model = _student({name: x.shape[1] for name, x in x_train.items()})
    model.compile(
        "adam",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=4, batch_size=64, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    assert accuracy > 0.9
    return model


@pytest.fixture(scope="module")
def report(student, digits, tmp_path_factory):
    x_train, _, x_test, _ = digits
    return gx.export_student(
        student,
        tmp_path_factory.mktemp("export"),
        formats=("tflite", "onnx"),
        quantize=[None, "float16", "dynamic", "int8"],
        representative_data=x_train,
        sample_data=x_test,
    )


def _row(report, fmt, quantize):
    (row,) = [r for r in report.rows if r.format == fmt and r.quantize == quantize]
    return row


def test_runtimes_installed():
    for module in ("onnxruntime", "ai_edge_litert.interpreter", "onnx"):
        assert importlib.util.find_spec(module.split(".")[0]), module


@pytest.mark.slow
def test_every_file_is_written_and_passes(report):
    assert report.ok
    assert report.backend == BACKEND
    assert report.num_samples == 400
    assert len(report.rows) == 8
    for row in report.rows:
        assert Path(row.file).is_file()
        assert row.bytes == Path(row.file).stat().st_size
        assert row.latency_ms > 0 and row.keras_latency_ms > 0
        assert row.batch_sizes == "1, dynamic"


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
@pytest.mark.slow
def test_tolerances(report, fmt):
    assert _row(report, fmt, None).max_abs_diff <= 1e-4
    assert _row(report, fmt, None).top1_agreement == 1.0
    assert _row(report, fmt, "float16").max_abs_diff <= 1e-2
    assert _row(report, fmt, "dynamic").top1_agreement >= 0.98
    assert _row(report, fmt, "int8").top1_agreement >= 0.98


@pytest.mark.slow
def test_quantised_files_are_smaller(report):
    tflite = _row(report, "tflite", None).bytes
    assert _row(report, "tflite", "int8").bytes <= 0.30 * tflite
    assert _row(report, "tflite", "dynamic").bytes <= 0.35 * tflite
    assert _row(report, "tflite", "float16").bytes <= 0.55 * tflite
    onnx = _row(report, "onnx", None).bytes
    assert _row(report, "onnx", "int8").bytes <= 0.40 * onnx


@pytest.mark.slow
def test_export_path_per_backend(report):
    paths = {row.format: row.path for row in report.rows}
    if BACKEND == "tensorflow":
        assert paths == {"tflite": "in-process", "onnx": "in-process"}
    else:
        assert paths["tflite"] == "child process (tensorflow)"
        onnx_here = (
            formats.torch_onnx_takes_dicts()  # Keras 3.15 and later
            if BACKEND == "torch"
            else importlib.util.find_spec("jax2onnx")
        )
        expected = "in-process" if onnx_here else "child process (tensorflow)"
        assert paths["onnx"] == expected


@pytest.mark.slow
def test_inputs_are_named_and_fed_by_name(report, student, digits):
    import onnxruntime
    from ai_edge_litert.interpreter import Interpreter

    x_test = {k: v[:8] for k, v in digits[2].items()}
    expected = student.predict_on_batch(x_test)
    for row in report.rows:
        assert set(row.inputs) == set(INPUTS)
        assert row.inputs == {k: "float32" for k in INPUTS}
    # The signature order is the converter's; feeding by name must not care.
    path = _row(report, "tflite", None).file
    interpreter = Interpreter(model_path=path)
    runner = interpreter.get_signature_runner()
    for order in (INPUTS, tuple(reversed(INPUTS))):
        out = runner(**{k: x_test[k] for k in order})
        np.testing.assert_allclose(out["output_0"], expected, atol=1e-4)
    session = onnxruntime.InferenceSession(_row(report, "onnx", None).file)
    assert {i.name for i in session.get_inputs()} == set(INPUTS)
    (out,) = session.run(None, dict(reversed(list(x_test.items()))))
    np.testing.assert_allclose(out, expected, atol=1e-4)


@pytest.mark.slow
def test_plain_students_have_no_flex_ops(report):
    for row in report.rows:
        if row.format == "tflite":
            ops = gx.tflite_op_names(row.file)
            assert "FULLY_CONNECTED" in ops
            assert not [op for op in ops if op.startswith("Flex")], ops


@keras.saving.register_keras_serializable(package="gramkd_test")
class Determinant(keras.layers.Layer):
    """det of the input seen as 2x2 matrices: TFLite has it only as a Flex op."""

    def call(self, x):
        return keras.ops.det(keras.ops.reshape(x, (-1, 2, 2)))[:, None]


@pytest.mark.slow
def test_flex_ops_fail_with_the_op_name(tmp_path):
    inputs = keras.Input((4,), name="a")
    model = keras.Model(inputs, keras.layers.Dense(2)(Determinant()(inputs)))
    with pytest.raises(gx.FlexOpsError, match="FlexMatrixDeterminant") as info:
        gx.export_student(model, tmp_path, formats="tflite")
    assert "standalone LiteRT" in str(info.value)


@pytest.mark.slow
def test_int8_inputs_and_outputs(student, digits, tmp_path):
    x_train, _, x_test, _ = digits
    report = gx.export_student(
        student,
        tmp_path,
        formats=["litert"],
        quantize="int8",
        int8_io=True,
        representative_data=(x_train, digits[1]),
        sample_data=x_test,
        latency_runs=3,
    )
    (row,) = report.rows
    assert row.inputs == {k: "int8" for k in INPUTS}
    assert row.top1_agreement >= 0.98


@pytest.mark.slow
def test_mixed_precision_student_exports_float32(digits, tmp_path):
    x_train = {k: v[:64] for k, v in digits[0].items()}
    model = _student({k: v.shape[1] for k, v in x_train.items()}, 16, "mixed_float16")
    report = gx.export_student(
        model, tmp_path, formats="onnx", sample_data=x_train, latency_runs=3
    )
    (row,) = report.rows
    assert row.inputs == {k: "float32" for k in INPUTS}
    assert row.passed and row.max_abs_diff <= 1e-4


def _one_unit_student(dims, seed):
    keras.utils.set_random_seed(seed)
    inputs = {name: keras.Input((dim,), name=name) for name, dim in dims.items()}
    embeds = [keras.layers.Dense(8, activation="relu")(inputs[n]) for n in dims]
    logit = keras.layers.Dense(1)(keras.layers.Concatenate()(embeds))
    return keras.Model(inputs, logit, name="binary")


@pytest.fixture(scope="module")
def one_unit(digits, tmp_path_factory):
    """A one-unit (binary: digit >= 5) student, exported dynamic and int8."""
    x_train, y_train, x_test, _ = digits
    model = _one_unit_student({k: v.shape[1] for k, v in x_train.items()}, seed=0)
    model.compile("adam", keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(x_train, (y_train >= 5).astype("float32"), epochs=3, verbose=0)
    report = gx.export_student(
        model,
        tmp_path_factory.mktemp("one_unit"),
        quantize=["dynamic", "int8"],
        representative_data={k: v[:200] for k, v in x_train.items()},
        sample_data=x_test,
        latency_runs=1,
    )
    return model, report


@pytest.mark.slow
def test_one_unit_export_is_judged_on_sign_and_values(one_unit):
    _, report = one_unit
    assert report.ok and len(report.rows) == 4
    assert {(r.format, r.quantize) for r in report.rows} == {
        (f, q) for f in ("tflite", "onnx") for q in ("dynamic", "int8")
    }
    for row in report.rows:
        assert row.criterion == "sign >= 98%, rms/std <= 0.1"
        assert row.top1_agreement >= 0.98 and row.rms_ratio <= 0.1


@pytest.mark.parametrize("other", ["unrelated", "scaled"])
@pytest.mark.slow
def test_one_unit_file_fails_against_another_model(one_unit, digits, other):
    """An argmax over one unit always agrees; sign and RMS diff must not."""
    model, report = one_unit
    x_test = digits[2]
    if other == "unrelated":
        against = _one_unit_student({k: v.shape[1] for k, v in x_test.items()}, 1)
    else:  # Same signs, values 1.5 times larger: only the value tolerance sees it.
        against = keras.Model(model.input, keras.layers.Rescaling(1.5)(model.output))
    for row in report.rows:
        checked = gx.verify_artifact(
            row.file, against, x_test, row.quantize, latency_runs=1
        )
        assert not checked.passed, (row.file, checked)
        assert checked.rms_ratio > 0.3
        if other == "scaled":  # Sign agreement alone would pass it.
            assert checked.top1_agreement >= 0.98
        error = gx.ExportVerificationError(gx.ExportReport([checked], BACKEND, 1, "."))
        assert "sign >= 98%, rms/std <= 0.1 failed" in str(error)
        assert "exported from this model" in str(error)


@pytest.mark.slow
def test_report_renderings(report):
    text = str(report)
    assert "max|diff|" in text and "student_int8.tflite" in text
    markdown = report.to_markdown().splitlines()
    assert len(markdown) == 2 + len(report.rows)
    assert markdown[0].startswith("| format |")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] and len(data["rows"]) == 8
    assert data["rows"][0]["inputs"]


@pytest.mark.slow
def test_cli_exports_a_keras_file(student, digits, tmp_path, capsys):
    student.save(tmp_path / "student.keras")
    np.savez(tmp_path / "data.npz", label=digits[3], **digits[2])
    parser = add_export_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            str(tmp_path / "student.keras"),
            "--format",
            "onnx",
            "--calibration",
            str(tmp_path / "data.npz"),
            "--out",
            str(tmp_path / "out"),
            "--runs",
            "3",
            "--json",
            str(tmp_path / "report.json"),
        ]
    )
    assert gx.run_export(args) == 0
    assert "student_float32.onnx" in capsys.readouterr().out
    assert json.loads((tmp_path / "report.json").read_text())["ok"]

    args = parser.parse_args([str(tmp_path / "student.keras"), "--quantize", "int8"])
    assert gx.run_export(args) == 2
    assert "representative_data" in capsys.readouterr().err

    script = REPO / "export" / "check_export.py"
    spec = importlib.util.spec_from_file_location("check_export", script)
    check_export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_export)
    argv = [
        str(tmp_path / "out" / "student_float32.onnx"),
        str(tmp_path / "student.keras"),
        str(tmp_path / "data.npz"),
    ]
    assert check_export.main(argv) == 0
    assert "ok (max|diff| <= 1e-04)" in capsys.readouterr().out


def test_unknown_format(student, tmp_path):
    with pytest.raises(ValueError, match="Unknown export format 'coreml'"):
        gx.export_student(student, tmp_path, formats=("tflite", "coreml"))
    with pytest.raises(ValueError, match="Unknown quantize='int4'"):
        gx.export_student(student, tmp_path, quantize="int4")


def test_int8_needs_representative_data(student, tmp_path):
    with pytest.raises(ValueError, match="int8.*needs representative_data"):
        gx.export_student(student, tmp_path, quantize="int8")


def test_path_that_is_not_a_keras_model(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="is not a Keras model"):
        gx.export_student(text, tmp_path)
    fake = tmp_path / "broken.keras"
    fake.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="is not a readable .keras file"):
        gx.export_student(fake, tmp_path)
    with pytest.raises(ValueError, match="not found"):
        gx.export_student(tmp_path / "missing.keras", tmp_path)


def _tiny(layer, name="a"):
    inputs = keras.Input((4,), name=name)
    return keras.Model({name: inputs}, keras.layers.Dense(2)(layer(inputs)))


X4 = {"a": np.random.default_rng(0).normal(size=(16, 4)).astype("float32")}


def test_dynamic_length_input_needs_sample_data(tmp_path):
    inputs = keras.Input((None, 4), name="seq")
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Dense(5)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(pooled))
    with pytest.raises(
        ValueError, match=r"\{'seq': \(None, 4\)\} have a dynamic.*Pass sample_data"
    ):
        gx.export_student(model, tmp_path, formats="onnx")


@keras.saving.register_keras_serializable(package="gramkd_test")
class Halve(keras.layers.Layer):
    """A custom layer in an importable module: the child process imports it."""

    def call(self, x):
        return 0.5 * x


class Thrice(keras.layers.Layer):
    """Not registered: the child gets it as a custom object by module and name."""

    def call(self, x):
        return 3.0 * x


def triple(x):
    return 3.0 * x


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
@pytest.mark.parametrize(
    "layer",
    ["module layer", "unregistered layer", "pure lambda", "module function"],
)
@pytest.mark.slow
def test_custom_code_the_child_can_import_exports(tmp_path, fmt, layer):
    layer = {
        "module layer": Halve(),
        "unregistered layer": Thrice(),
        "pure lambda": keras.layers.Lambda(lambda x: 2.0 * x + 1.0),
        "module function": keras.layers.Lambda(triple),
    }[layer]
    report = gx.export_student(
        _tiny(layer), tmp_path, formats=fmt, sample_data=X4, latency_runs=1
    )
    (row,) = report.rows
    assert row.passed and row.max_abs_diff <= 1e-4


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
@pytest.mark.parametrize("what", ["__main__ layer", "local function", "lambda"])
def test_custom_code_the_child_cannot_import_is_named(tmp_path, fmt, what):
    def local(x):
        return 2.0 * x

    if what == "__main__ layer":  # as if defined in the user's script
        cls = type(
            "ScriptLayer",
            (keras.layers.Layer,),
            {"call": Halve.call, "__module__": "__main__"},
        )
        layer, named = cls(), r"ScriptLayer \(in __main__\)"
    elif what == "local function":
        layer = keras.layers.Lambda(local)
        named = r"test_custom_code_the_child_cannot_import_is_named.<locals>.local"
    else:
        layer = keras.layers.Lambda(lambda x: keras.ops.tanh(x), name="squash")
        named = r"the Lambda layer 'squash', whose lambda reads \['keras'\]"
    model = _tiny(layer)
    if in_process_supported(fmt):  # Nothing to import: it works.
        report = gx.export_student(
            model, tmp_path, formats=fmt, sample_data=X4, latency_runs=1
        )
        assert report.ok
        return
    with pytest.raises(ValueError, match=named) as info:
        gx.export_student(model, tmp_path, formats=fmt, sample_data=X4)
    assert "Move it into a module" in str(info.value)
    assert "KERAS_BACKEND=tensorflow" in str(info.value)


def test_lambda_in_a_keras_file_says_how_to_load_it(tmp_path):
    _tiny(keras.layers.Lambda(lambda x: 2.0 * x)).save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match=r"safe_mode=False.*pass the model") as info:
        gx.export_student(tmp_path / "lambda.keras", tmp_path)
    assert "keras.saving.load_model(path, safe_mode=False)" in str(info.value)


@pytest.mark.slow
def test_tflite_input_names_with_spaces_are_named_with_a_fix(tmp_path):
    model = _tiny(keras.layers.Identity(), name="left eye")
    with pytest.raises(
        ValueError, match=r"TFLite cannot name inputs \['left eye'\]"
    ) as info:
        gx.export_student(model, tmp_path, formats="tflite")
    assert "'left eye' -> 'left_eye'" in str(info.value)
    # ONNX takes the name as it is.
    data = {"left eye": X4["a"]}
    report = gx.export_student(
        model, tmp_path, formats="onnx", sample_data=data, latency_runs=1
    )
    assert report.ok and report.rows[0].inputs == {"left eye": "float32"}


def test_missing_data_key(student, digits, tmp_path):
    partial = {k: v for k, v in digits[2].items() if k != "kar"}
    with pytest.raises(ValueError, match=r"lacks the model input\(s\) \['kar'\]"):
        gx.export_student(student, tmp_path, formats="onnx", sample_data=partial)


@pytest.mark.parametrize(
    "module, fmt", [("onnxruntime", "onnx"), ("ai_edge_litert", "tflite")]
)
def test_missing_optional_dependency(student, tmp_path, monkeypatch, module, fmt):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r'pip install "keras-gramkd\[export\]"'):
        gx.export_student(student, tmp_path, formats=fmt)


@pytest.mark.slow
def test_import_is_lazy():
    code = (
        "import sys, keras_gramkd.export\n"
        "heavy = ['onnxruntime', 'ai_edge_litert', 'tf2onnx', 'onnx']\n"
        "if sys.modules['keras'].backend.backend() != 'tensorflow':\n"
        "    heavy.append('tensorflow')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_top1_agreement_counts_ties_at_the_files_resolution():
    # Row 0: the file ties the Keras class with another (int8 step) -> agrees, and
    # is counted as a tie; row 1: the file prefers another class -> disagrees;
    # row 2: exact agreement.
    keras_out = np.array([[1.00, 1.03, 0.0], [2.0, 0.0, 1.9], [0.0, 0.0, 5.0]])
    file_out = np.array([[1.0, 1.0, 0.0], [1.9, 0.0, 2.0], [0.0, 0.0, 5.0]])
    share, ties = agreement(file_out, keras_out)
    assert share == pytest.approx(2 / 3) and ties == 1
    assert agreement(keras_out, keras_out) == (1.0, 0)


class Stack(keras.layers.Layer):
    """A custom layer holding its sub-layers in a list and an attribute."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.blocks = [keras.layers.Dense(3, name="block0"), keras.layers.Dense(3)]
        self.head = keras.layers.Dense(2, name="head")

    def call(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_all_layers_finds_nested_models_and_custom_layers():
    inner_in = keras.Input((4,), name="inner_in")
    inner = keras.Model(inner_in, Stack(name="stack")(inner_in), name="inner")
    inputs = keras.Input((4,), name="a")
    model = keras.Model({"a": inputs}, inner(inputs), name="outer")
    names = [layer.name for layer in all_layers(model)]
    assert names[0] == "outer"
    assert {"inner", "stack", "block0", "head"} <= set(names)
    assert len(names) == len(set(names))


@pytest.mark.parametrize("structure", ["dict", "list", "single"])
def test_input_names_and_signature_follow_the_input_structure(structure):
    a, b = keras.Input((4,), name="a"), keras.Input((2,), name="b")
    merged = keras.layers.Concatenate()([a, b])
    if structure == "dict":
        model = keras.Model({"b": b, "a": a}, merged)
        assert input_names(model) == ["b", "a"]
        (signature,) = input_signature(model)
        assert list(signature) == ["b", "a"]
        assert signature["a"].shape == (None, 4)
    elif structure == "list":
        model = keras.Model([a, b], merged)
        assert input_names(model) == ["a", "b"]
        (signature,) = input_signature(model)
        assert [spec.name for spec in signature] == ["a", "b"]
    else:
        model = keras.Model(a, keras.layers.Dense(1)(a))
        assert input_names(model) == ["a"]
        (signature,) = input_signature(model)
        assert signature.shape == (None, 4) and signature.name == "a"


def test_a_distiller_stands_for_its_student(tmp_path):
    from helpers import make_data, make_net, modality_map, sparse_ce

    from keras_gramkd import Distiller

    distiller = Distiller(
        make_net("t", 8),
        make_net("s", 3),
        teacher_modalities=modality_map("t"),
        student_modalities=modality_map("s"),
    )
    distiller.compile("adam", sparse_ce())
    distiller.fit(*make_data(8), verbose=0)
    assert gx.load_student(distiller) is distiller.student
    distiller.save(tmp_path / "distiller.keras")
    loaded = gx.load_student(tmp_path / "distiller.keras")
    assert loaded.name == distiller.student.name
    assert gx.input_names(loaded) == gx.input_names(distiller.student)
    for mine, theirs in zip(loaded.weights, distiller.student.weights, strict=True):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
