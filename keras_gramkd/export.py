"""Export a student to TFLite (LiteRT) and ONNX, and verify every file.

`export_student` converts a trained student with Keras' own `model.export`
(`format="litert"` / `format="onnx"`), quantises it if asked, then loads each file
in the runtime it will ship with (`ai_edge_litert` and `onnxruntime`) and compares
it with the Keras model on sample data: max |diff|, RMS diff over the output's
spread, top-1 (or, for one-unit outputs, sign) agreement, latency per sample and
the batch sizes the file accepts.

Keras can only build a `.tflite` file under the TensorFlow backend, and ONNX
export differs per backend (TensorFlow: tf2onnx; PyTorch: `torch.onnx`; JAX:
jax2onnx). Where the current backend cannot produce a format, the student is
saved to a `.keras` file and converted in a child process running
`KERAS_BACKEND=tensorflow`; the report says which path each file took.

Backend-specific packages (tensorflow, onnxruntime, ai_edge_litert, ...) are
imported lazily, inside the functions that need them.

Example:

```python
from keras_gramkd.export import export_student

report = export_student(
    student,                       # a keras.Model or a path to a .keras file
    "export_dir/",
    formats=("tflite", "onnx"),
    quantize="int8",               # None | "float16" | "dynamic" | "int8" (or a list)
    representative_data=x_train,   # dict of arrays keyed by input name
    sample_data=x_test,
)
print(report)
```
"""

from __future__ import annotations

import argparse
import builtins
import dataclasses
import dis
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterable, Mapping
from pathlib import Path

import keras
import numpy as np

__all__ = [
    "FORMATS",
    "QUANTIZATIONS",
    "ExportError",
    "ExportReport",
    "ExportRow",
    "ExportVerificationError",
    "FlexOpsError",
    "add_export_arguments",
    "export_student",
    "input_names",
    "load_inputs_npz",
    "load_student",
    "run_export",
    "tflite_op_names",
    "verify_artifact",
]

FORMATS = ("tflite", "onnx")
QUANTIZATIONS = (None, "float16", "dynamic", "int8")
_FORMAT_ALIASES = {"tflite": "tflite", "litert": "tflite", "onnx": "onnx"}
_SUFFIX = {"tflite": ".tflite", "onnx": ".onnx"}
_EXTRA = 'pip install "keras-gramkd[export]"'
# Tolerances checked against the Keras model on `sample_data`.
FLOAT32_ATOL = 1e-4
FLOAT16_ATOL = 1e-2
MIN_TOP1_AGREEMENT = 0.98
# Quantised files: RMS |diff| at most this share of the Keras output's std.
MAX_RMS_RATIO = 0.1
_IN_PROCESS = "in-process"
_ONNX_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}
_CHILD = "child process (tensorflow)"
# Names TensorFlow accepts for a SavedModel signature argument (Keras already
# refuses '/' in a layer name).
_TFLITE_NAME = re.compile(r"[A-Za-z0-9.][A-Za-z0-9_.>-]*")


class ExportError(RuntimeError):
    """An export or a verification step failed."""


class FlexOpsError(ExportError):
    """A `.tflite` file needs TensorFlow Select (Flex) ops that LiteRT lacks."""

    def __init__(self, path, ops):
        self.path = str(path)
        self.ops = tuple(ops)
        super().__init__(
            f"{self.path} needs TensorFlow Select (Flex) ops that the standalone "
            f"LiteRT runtime cannot run: {', '.join(self.ops)}. Replace the op(s) "
            f"in the student with TFLite builtins (the op name after 'Flex' is the "
            "TensorFlow op), or link the 'tensorflow-lite-select-tf-ops' runtime on "
            "the device."
        )


class ExportVerificationError(ExportError):
    """An exported file is outside its tolerance; `.report` holds the table."""

    def __init__(self, report):
        self.report = report
        bad = [r for r in report.rows if not r.passed]
        lines = [
            f"{r.file}: {r.criterion} failed (max|diff| {r.max_abs_diff:.3g}, "
            f"rms/std {r.rms_ratio:.3g}, agreement {100 * r.top1_agreement:.2f}%; "
            f"{r.note}). Check that the file was exported from this model."
            for r in bad
        ]
        super().__init__(
            "Exported files failed verification:\n  "
            + "\n  ".join(lines)
            + f"\n\n{report}"
        )


def _require(module, what):
    """Imports an optional dependency or fails naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{what} needs the optional dependency '{module}', which is not "
            f"installed. Install the export extra: {_EXTRA}"
        ) from error


# --------------------------------------------------------------------------
# Report


@dataclasses.dataclass
class ExportRow:
    """One exported file and what verifying it in its runtime found.

    Attributes:
        format: `"tflite"` or `"onnx"`.
        quantize: `None` (float32), `"float16"`, `"dynamic"` or `"int8"`.
        file: Path of the exported file.
        bytes: Size of the file.
        path: How it was produced: in-process or in a TensorFlow child process.
        max_abs_diff: Max |runtime - Keras| over all outputs of `sample_data`.
        rms_ratio: RMS |runtime - Keras| over the std of the Keras output (the
            largest over outputs).
        top1_agreement: Share of samples whose argmax matches Keras (a tie at
            the file's resolution that includes the Keras class counts, and
            `note` says how many); for a one-unit output, whose sign does (side
            of 0.5 if the Keras output lies in [0, 1]). The smallest over
            outputs.
        latency_ms: Median runtime latency per sample, in milliseconds.
        keras_latency_ms: Median Keras `predict_on_batch` latency per sample.
        batch_sizes: `"1, dynamic"` or `"1"`: what the file accepts.
        inputs: `{name: dtype}` of the file's inputs, in the file's order.
        criterion: The tolerance checked, e.g. `"max|diff| <= 1e-04"`.
        passed: Whether the criterion held.
        note: Extra information (runtime, number of samples, ...).
    """

    format: str
    quantize: str | None
    file: str
    bytes: int
    path: str
    max_abs_diff: float
    rms_ratio: float
    top1_agreement: float
    latency_ms: float
    keras_latency_ms: float
    batch_sizes: str
    inputs: dict
    criterion: str
    passed: bool
    note: str = ""

    def cells(self):
        """Returns the row as strings, in `ExportReport.COLUMNS` order."""
        return [
            self.format,
            self.quantize or "float32",
            os.path.basename(self.file),
            f"{self.bytes:,}",
            f"{self.max_abs_diff:.2e}",
            f"{self.rms_ratio:.2e}",
            f"{100 * self.top1_agreement:.2f}%",
            f"{self.latency_ms:.4f}",
            f"{self.keras_latency_ms:.4f}",
            self.batch_sizes,
            self.path,
            ("ok" if self.passed else "FAIL") + f" ({self.criterion})",
        ]


@dataclasses.dataclass
class ExportReport:
    """The result of `export_student`: one `ExportRow` per exported file.

    `str(report)` is a plain-text table; `to_markdown()` the same as Markdown;
    `to_dict()` a JSON-ready dict.

    Attributes:
        rows: The `ExportRow`s.
        backend: The Keras backend the export ran under.
        num_samples: Number of `sample_data` rows used for verification.
        export_dir: Directory holding the files.
    """

    rows: list
    backend: str
    num_samples: int
    export_dir: str

    COLUMNS = (
        "format",
        "quantize",
        "file",
        "bytes",
        "max|diff|",
        "rms/std",
        "top-1 agree",
        "ms/sample",
        "keras ms/sample",
        "batch",
        "path",
        "check",
    )

    @property
    def ok(self):
        """True when every file passed its tolerance."""
        return all(row.passed for row in self.rows)

    def to_dict(self):
        """Returns the report as a JSON-serialisable dict."""
        return {
            "backend": self.backend,
            "num_samples": self.num_samples,
            "export_dir": self.export_dir,
            "ok": self.ok,
            "rows": [dataclasses.asdict(row) for row in self.rows],
        }

    def to_markdown(self):
        """Returns the report as a Markdown table."""
        lines = [
            "| " + " | ".join(self.COLUMNS) + " |",
            "|" + "|".join("---" for _ in self.COLUMNS) + "|",
        ]
        lines += ["| " + " | ".join(row.cells()) + " |" for row in self.rows]
        return "\n".join(lines)

    def __str__(self):
        table = [list(self.COLUMNS)] + [row.cells() for row in self.rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [
            f"Export report (backend: {self.backend}, {self.num_samples} samples, "
            f"dir: {self.export_dir})",
            fmt.format(*table[0]),
            fmt.format(*("-" * w for w in widths)),
        ]
        lines += [fmt.format(*line) for line in table[1:]]
        return "\n".join(lines)


# --------------------------------------------------------------------------
# Model and data helpers


def load_student(student):
    """Returns a `keras.Model` from a model or a path to a `.keras` file.

    Args:
        student: A `keras.Model`, or a `str`/`Path` to a `.keras` file.

    Returns:
        The `keras.Model`.

    Raises:
        ValueError: If the path does not exist or is not a Keras model file.
    """
    if isinstance(student, keras.Model):
        return student
    if not isinstance(student, (str, os.PathLike)):
        raise TypeError(
            "student must be a keras.Model or a path to a .keras file, got "
            f"{type(student).__name__}."
        )
    path = Path(student)
    if not path.is_file():
        raise ValueError(f"Student file not found: {path}.")
    if path.suffix != ".keras":
        raise ValueError(
            f"{path} is not a Keras model: expected a '.keras' file saved with "
            "model.save(...)."
        )
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as error:
        if "safe_mode" in str(error):
            raise ValueError(
                f"{path} holds a Lambda layer with Python code, which Keras loads "
                "only with safe_mode=False. If you trust the file, load it "
                "yourself, keras.saving.load_model(path, safe_mode=False), and "
                "pass the model instead of the path."
            ) from error
        raise ValueError(
            f"{path} is not a Keras model that can be loaded: {error}"
        ) from error
    if not isinstance(model, keras.Model):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a Keras model.")
    return model


def input_names(model):
    """Returns the names the exported files give the model's inputs.

    For a model built on a dict of inputs these are the dict's keys; otherwise
    the names of its `keras.Input` tensors.

    Args:
        model: A built `keras.Model`.

    Returns:
        A list of input names, in Keras order.
    """
    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, Mapping):
        return list(struct.keys())
    return [tensor.name for tensor in model.inputs]


def _check_tflite_names(model):
    """Raises a `ValueError` for input names a TFLite signature cannot hold."""
    bad = [n for n in input_names(model) if not _TFLITE_NAME.fullmatch(n)]
    if bad:
        fixed = {n: re.sub(r"[^A-Za-z0-9_.-]", "_", n).lstrip("_") for n in bad}
        raise ValueError(
            f"TFLite cannot name inputs {bad}: a signature input name may hold "
            "only letters, digits, '_', '.' and '-', and may not start with "
            "'_'. Rename the keras.Input (and its key in the input dict), e.g. "
            + ", ".join(f"{n!r} -> {f or 'input'!r}" for n, f in fixed.items())
            + ". ONNX accepts the names as they are (formats='onnx')."
        )


def _input_specs(model):
    """`{name: (shape without batch, dtype)}` of the model's inputs."""
    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, Mapping):
        tensors = list(struct.values())
    else:
        tensors = list(model.inputs)
    names = input_names(model)
    return {
        name: (tuple(t.shape[1:]), keras.backend.standardize_dtype(t.dtype))
        for name, t in zip(names, tensors, strict=True)
    }


def _input_signature(model):
    """An explicit `input_signature` with a dynamic batch, for `model.export`."""
    specs = {
        name: keras.InputSpec(shape=(None, *shape), dtype=dtype, name=name)
        for name, (shape, dtype) in _input_specs(model).items()
    }
    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, Mapping):
        return [specs]
    values = list(specs.values())
    if isinstance(struct, (list, tuple)) and len(values) > 1:
        return [values]
    return [values[0]]


def _keras_inputs(model, data):
    """Shapes a `{name: array}` dict into what `model` is called with."""
    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, Mapping):
        return data
    values = [data[name] for name in input_names(model)]
    return values if len(values) > 1 else values[0]


def _as_input_dict(model, data, what, limit=None):
    """Normalises user data to a `{input name: float array}` dict.

    Accepts a dict of arrays, a single array (one-input models), a list of
    arrays in input order, an `(x, y)` tuple, or an iterable of such batches
    (e.g. a `tf.data.Dataset`), stopping after `limit` rows.
    """
    names = input_names(model)
    specs = _input_specs(model)
    # An `(x, y)` or `(x, y, sample_weight)` tuple: keep x. (A tuple of one
    # array per input has an array, not a dict, as its first item.)
    is_xy = isinstance(data, tuple) and len(data) in (2, 3)
    if is_xy and (not _is_array(data[0]) or len(names) == 1):
        data = data[0]
    single = isinstance(data, Mapping) or _is_array(data)
    if single or (isinstance(data, list) and all(_is_array(x) for x in data)):
        batches = [data]
    elif isinstance(data, Iterable):
        batches = data
    else:
        raise TypeError(f"{what}: unsupported type {type(data).__name__}.")

    columns = {name: [] for name in names}
    count = 0
    for batch in batches:
        if isinstance(batch, tuple) and len(batch) in (2, 3):
            batch = batch[0]
        if isinstance(batch, Mapping):
            missing = [n for n in names if n not in batch]
            if missing:
                raise ValueError(
                    f"{what} lacks the model input(s) {missing}; it has "
                    f"{sorted(batch)}. Keys must be the input names {names}."
                )
            parts = {n: np.asarray(batch[n]) for n in names}
        elif _is_array(batch) and len(names) == 1:
            parts = {names[0]: np.asarray(batch)}
        elif isinstance(batch, (list, tuple)) and len(batch) == len(names):
            parts = {n: np.asarray(x) for n, x in zip(names, batch, strict=True)}
        else:
            raise ValueError(f"{what} must be a dict keyed by the input names {names}.")
        for name, array in parts.items():
            columns[name].append(array)
        count += len(next(iter(parts.values())))
        if limit is not None and count >= limit:
            break
    if not count:
        raise ValueError(f"{what} is empty.")
    out = {}
    for name in names:
        array = np.concatenate(columns[name])[:limit]
        shape, dtype = specs[name]
        if len(array.shape) != len(shape) + 1 or any(
            d is not None and d != s
            for d, s in zip(shape, array.shape[1:], strict=True)
        ):
            raise ValueError(
                f"{what}['{name}'] has rows of shape {array.shape[1:]}, the model "
                f"expects {shape}."
            )
        out[name] = array.astype(dtype if "float" not in dtype else "float32")
    return out


def _is_array(x):
    return hasattr(x, "shape") and hasattr(x, "dtype")


def load_inputs_npz(path, names):
    """Loads model inputs from an `.npz` file whose keys are the input names.

    Keys that are not input names (labels, for instance) are ignored. A model
    with a single input may also read an `.npz` with a single array.

    Args:
        path: Path to the `.npz` file.
        names: The model's input names (see `input_names`).

    Returns:
        A `{name: array}` dict.

    Example:

    ```python
    np.savez("calib.npz", pix=x["pix"], fou=x["fou"], kar=x["kar"])
    data = load_inputs_npz("calib.npz", input_names(student))
    ```
    """
    with np.load(path) as npz:
        keys = list(npz.keys())
        if len(names) == 1 and names[0] not in keys and len(keys) == 1:
            return {names[0]: npz[keys[0]]}
        missing = [n for n in names if n not in keys]
        if missing:
            raise ValueError(
                f"{path} lacks the model input(s) {missing}; it has {keys}. "
                f"Save one array per input, keyed by the input names {list(names)}."
            )
        return {n: npz[n] for n in names}


def _float32_model(model):
    """Returns `model`, or a float32 copy of it if it uses mixed precision."""
    policies = {
        layer.dtype_policy.name
        for layer in model._flatten_layers()
        if getattr(layer, "dtype_policy", None) is not None
    }
    if policies <= {"float32"}:
        return model, False

    def fix(node):
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if (
                    key == "dtype"
                    and isinstance(value, dict)
                    and value.get("class_name") == "DTypePolicy"
                ) or (key == "dtype" and value in ("mixed_float16", "mixed_bfloat16")):
                    out[key] = "float32"
                else:
                    out[key] = fix(value)
            return out
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    config = keras.saving.serialize_keras_object(model)
    clone = keras.saving.deserialize_keras_object(fix(config))
    clone.set_weights(model.get_weights())
    return clone, True


def _global_names(code):
    """Non-builtin global names that a function's bytecode reads."""
    names = {
        i.argval
        for i in dis.get_instructions(code)
        if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")
    }
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return {name for name in names if not hasattr(builtins, name)}


def _custom_objects(model, formats):
    """`{saved name: [module, qualified name]}` the child process must import.

    These are the model's own classes and the named functions of its `Lambda`
    layers. One defined in `__main__` (a script or notebook) or inside a
    function cannot be imported there, and a saved Python lambda keeps only
    its bytecode, not the globals it reads: each is a `ValueError` that says
    what to move where.
    """
    layers = model._flatten_layers()
    classes = {type(model)} | {type(layer) for layer in layers}
    objects = {
        keras.saving.get_registered_name(c): c
        for c in classes
        if c.__module__.split(".")[0] != "keras"
    }
    stuck = []
    for layer in layers:
        if not isinstance(layer, keras.layers.Lambda):
            continue
        if layer.function.__name__ != "<lambda>":
            objects[layer.function.__name__] = layer.function
        elif _global_names(layer.function.__code__):
            names = sorted(_global_names(layer.function.__code__))
            stuck.append(f"the Lambda layer {layer.name!r}, whose lambda reads {names}")
    stuck += sorted(
        f"{obj.__qualname__} (in {obj.__module__})"
        for obj in objects.values()
        if obj.__module__ == "__main__" or "<locals>" in obj.__qualname__
    )
    if stuck:
        raise ValueError(
            f"The student uses {'; '.join(stuck)}. Exporting {formats} from the "
            f"{keras.backend.backend()} backend converts in a TensorFlow child "
            "process, which cannot import a class or function defined in "
            "__main__ (your script or notebook) or inside a function, nor the "
            "globals of a saved lambda. Move it into a module (a .py file next "
            "to your script; a lambda becomes a def there) and import it from "
            "there, or export under KERAS_BACKEND=tensorflow."
        )
    return {name: [obj.__module__, obj.__qualname__] for name, obj in objects.items()}


# --------------------------------------------------------------------------
# Conversion


def _in_process_supported(fmt):
    """Whether Keras can write `fmt` under the current backend in-process."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return True
    if fmt == "onnx" and backend == "torch":
        return True
    if fmt == "onnx" and backend == "jax":
        return importlib.util.find_spec("jax2onnx") is not None
    # TFLite quantisation (float16 / dynamic / int8) uses the TensorFlow
    # converter; Keras' torch route (litert-torch) does not offer it.
    return False


def _tflite_converter_kwargs(quantize, calibration, int8_io):
    import tensorflow as tf

    if quantize is None:
        return {}
    kwargs = {"optimizations": [tf.lite.Optimize.DEFAULT]}
    if quantize == "float16":
        kwargs["target_spec"] = {"supported_types": [tf.float16]}
    elif quantize == "int8":
        rows = len(next(iter(calibration.values())))

        def representative_dataset():
            for i in range(rows):
                yield {k: v[i : i + 1] for k, v in calibration.items()}

        kwargs["representative_dataset"] = representative_dataset
        kwargs["target_spec"] = {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]}
        if int8_io:
            kwargs["inference_input_type"] = tf.int8
            kwargs["inference_output_type"] = tf.int8
    return kwargs


def _convert(model, fmt, quantize, out, calibration=None, int8_io=False):
    """Writes one file with Keras' `model.export` (current backend)."""
    signature = _input_signature(model)
    if fmt == "tflite":
        _require("tensorflow", "TFLite export")
        kwargs = _tflite_converter_kwargs(quantize, calibration, int8_io)
        model.export(
            str(out),
            format="litert",
            input_signature=signature,
            verbose=False,
            **kwargs,
        )
    else:
        if keras.backend.backend() == "tensorflow":
            _require("tf2onnx", "ONNX export under TensorFlow")
        model.export(str(out), format="onnx", input_signature=signature, verbose=False)


def _quantize_onnx(src, dst, quantize, calibration):
    """Quantises a float32 ONNX file with onnxruntime's tools."""
    _require("onnx", "ONNX quantisation")
    # onnxruntime's quantizer logs a "consider pre-processing" hint on the root
    # logger for every call; it is advice, not a problem with the file.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        _quantize_onnx_file(src, dst, quantize, calibration)
    finally:
        root.setLevel(level)


def _quantize_onnx_file(src, dst, quantize, calibration):
    if quantize == "float16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        onnx.save(model, str(dst))
        return
    from onnxruntime import quantization as q

    if quantize == "dynamic":
        q.quantize_dynamic(str(src), str(dst), weight_type=q.QuantType.QInt8)
        return

    rows = len(next(iter(calibration.values())))

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self._rows = iter(range(rows))

        def get_next(self):
            i = next(self._rows, None)
            if i is None:
                return None
            return {k: v[i : i + 1] for k, v in calibration.items()}

    # onnxruntime's own pre-processing (shape inference, MatMul + Add fused
    # into Gemm, so biases quantise to int32 as in TFLite): on the demo's
    # student it cut rms/std from 0.027 to 0.024 and the file by 13 %.
    pre = Path(dst).with_suffix(".pre.onnx")
    try:
        q.quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        q.quantize_static(
            str(pre),
            str(dst),
            Reader(),
            quant_format=q.QuantFormat.QDQ,
            activation_type=q.QuantType.QInt8,
            weight_type=q.QuantType.QInt8,
            per_channel=True,
        )
    finally:
        pre.unlink(missing_ok=True)


def _child_objects(model, jobs):
    """Checks that the child process can run `jobs`; returns `_custom_objects`."""
    formats = sorted({job["fmt"] for job in jobs})
    if importlib.util.find_spec("tensorflow") is None:
        raise ImportError(
            f"Exporting {formats} from the {keras.backend.backend()} backend "
            "converts in a TensorFlow child process, and tensorflow is not "
            'installed. Install it with: pip install "keras-gramkd[tensorflow,export]"'
        )
    return _custom_objects(model, formats)


def _run_child(model, jobs, calibration, int8_io, workdir, objects):
    """Converts `jobs` in a `KERAS_BACKEND=tensorflow` child process."""
    model_path = Path(workdir) / "student.keras"
    model.save(model_path)
    spec = {
        "model": str(model_path),
        "jobs": jobs,
        "int8_io": int8_io,
        "objects": objects,
        "calibration": None,
    }
    if calibration is not None:
        spec["calibration"] = str(Path(workdir) / "calibration.npz")
        np.savez(spec["calibration"], **calibration)
    spec_path = Path(workdir) / "job.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "tensorflow"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    paths = [p for p in sys.path if p] + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    result = subprocess.run(
        [sys.executable, "-m", "keras_gramkd.export", "_child", str(spec_path)],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-25:])
        raise ExportError(
            "Converting in the TensorFlow child process failed "
            f"(exit {result.returncode}):\n{tail}"
        )


def _child_main(spec_path):
    """Entry point of the child process: converts the jobs of `spec_path`."""
    spec = json.loads(Path(spec_path).read_text())
    custom_objects = {}
    for name, (module, qualname) in spec["objects"].items():
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        custom_objects[name] = obj
    # The parent wrote this file from the model it holds in memory, so its
    # Lambda layers are the caller's own code, not an untrusted file's.
    model = keras.saving.load_model(
        spec["model"], custom_objects=custom_objects, compile=False, safe_mode=False
    )
    calibration = None
    if spec["calibration"]:
        with np.load(spec["calibration"]) as npz:
            calibration = {k: npz[k] for k in npz.files}
    for job in spec["jobs"]:
        _convert(model, **job, calibration=calibration, int8_io=spec["int8_io"])
    return 0


# --------------------------------------------------------------------------
# Verification


def tflite_op_names(path):
    """Returns the sorted op names of a `.tflite` file (e.g. `FULLY_CONNECTED`).

    Flex (TensorFlow Select) ops appear as `Flex<TensorFlowOp>`.

    Args:
        path: Path to the `.tflite` file.

    Returns:
        A sorted list of op names.
    """
    interpreter_mod = _require("ai_edge_litert.interpreter", "TFLite verification")
    interpreter = interpreter_mod.Interpreter(model_path=str(path))
    return sorted({op["op_name"] for op in interpreter._get_ops_details()})


class _TFLiteRunner:
    """Runs a `.tflite` file in standalone LiteRT, feeding inputs by name."""

    def __init__(self, path):
        interpreter_mod = _require("ai_edge_litert.interpreter", "TFLite verification")
        self.interpreter = interpreter_mod.Interpreter(model_path=str(path))
        flex = sorted(
            {
                op["op_name"]
                for op in self.interpreter._get_ops_details()
                if op["op_name"].startswith("Flex")
            }
        )
        if flex:
            raise FlexOpsError(path, flex)
        try:
            self.interpreter.allocate_tensors()
        except RuntimeError as error:
            flex = re.findall(r"\((Flex\w+)\)", str(error))
            if flex:
                raise FlexOpsError(path, flex) from error
            raise
        key = next(iter(self.interpreter.get_signature_list()))
        self.runner = self.interpreter.get_signature_runner(key)
        self.inputs = self.runner.get_input_details()
        self.outputs = self.runner.get_output_details()
        self.dynamic_batch = all(
            d["shape_signature"][0] == -1 for d in self.inputs.values()
        )

    def input_dtypes(self):
        return {k: np.dtype(d["dtype"]).name for k, d in self.inputs.items()}

    def __call__(self, data):
        feed = {}
        for name, detail in self.inputs.items():
            if name not in data:
                raise ExportError(
                    f"The TFLite signature expects input '{name}', the data has "
                    f"{sorted(data)}."
                )
            x = data[name]
            if np.dtype(detail["dtype"]) in (np.int8, np.uint8):
                scale, zero = detail["quantization"]
                info = np.iinfo(detail["dtype"])
                x = np.clip(np.round(x / scale + zero), info.min, info.max)
            feed[name] = x.astype(detail["dtype"])
        result = self.runner(**feed)
        outs = []
        for name in sorted(result, key=_natural_key):
            y = result[name]
            scale, zero = self.outputs[name]["quantization"]
            if y.dtype in (np.int8, np.uint8) and scale:
                y = (y.astype(np.float32) - zero) * scale
            outs.append(np.asarray(y, np.float32))
        return outs


class _ONNXRunner:
    """Runs an `.onnx` file in onnxruntime, feeding inputs by name."""

    def __init__(self, path):
        ort = _require("onnxruntime", "ONNX verification")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.dynamic_batch = all(
            not isinstance(i.shape[0], int) for i in self.inputs.values()
        )

    def input_dtypes(self):
        return {k: _ONNX_DTYPES.get(i.type, i.type) for k, i in self.inputs.items()}

    def __call__(self, data):
        missing = [name for name in self.inputs if name not in data]
        if missing:
            raise ExportError(
                f"The ONNX graph expects input(s) {missing}, the data has "
                f"{sorted(data)}."
            )
        feed = {name: data[name] for name in self.inputs}
        return [np.asarray(y, np.float32) for y in self.session.run(None, feed)]


def _natural_key(name):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _median_seconds(fn, runs):
    fn()  # Warm up (compilation, allocation).
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _one_unit(ref):
    return ref.ndim < 2 or ref.shape[-1] == 1


def _agreement(got, ref):
    """(share of samples that agree, number of those that agree only by a tie).

    Multi-unit outputs agree when the Keras argmax is among the file's largest
    values: a quantised output has a resolution (one int8 step), and classes
    closer than that come out exactly tied, so the file cannot order them. Such
    ties are counted and reported, since `argmax` on device picks the first.
    An argmax over one unit always agrees, so a one-unit output is compared by
    the side of the threshold: 0.5 if every Keras value is in [0, 1]
    (a probability), else 0 (a logit or a regression value).
    """
    if not _one_unit(ref):
        keras_class = np.argmax(ref, -1)[:, None]
        at_keras_class = np.take_along_axis(got, keras_class, -1)[:, 0]
        agree = at_keras_class == np.max(got, -1)
        tied = agree & (np.argmax(got, -1) != keras_class[:, 0])
        return float(np.mean(agree)), int(np.sum(tied))
    threshold = 0.5 if ref.min() >= 0.0 and ref.max() <= 1.0 else 0.0
    return float(np.mean((got > threshold) == (ref > threshold))), 0


def _rms_ratio(got, ref):
    """RMS |got - ref| over the std of ref (floored at 1e-6)."""
    rms = float(np.sqrt(np.mean(np.square(got.astype(np.float64) - ref))))
    return rms / max(float(np.std(ref)), 1e-6)


def _criterion(quantize, expected):
    if quantize is None:
        return f"max|diff| <= {FLOAT32_ATOL:.0e}"
    if quantize == "float16":
        return f"max|diff| <= {FLOAT16_ATOL:.0e}"
    agree = "sign" if any(_one_unit(e) for e in expected) else "top-1"
    return f"{agree} >= {MIN_TOP1_AGREEMENT:.0%}, rms/std <= {MAX_RMS_RATIO:g}"


def verify_artifact(
    artifact, model, sample_data, quantize=None, latency_runs=20, path=_IN_PROCESS
):
    """Runs an exported file in its runtime and compares it with the Keras model.

    `.tflite` files run in `ai_edge_litert.interpreter.Interpreter`, `.onnx` files
    in `onnxruntime.InferenceSession`; inputs are fed by name. The file is run on
    one sample (batch 1) and, if its batch dimension is dynamic, on all samples at
    once; otherwise sample by sample.

    Args:
        artifact: Path to a `.tflite` or `.onnx` file.
        model: The source `keras.Model` (or a path to its `.keras` file).
        sample_data: Inputs: a dict of arrays keyed by input name.
        quantize: How the file was quantised (`None`, `"float16"`, `"dynamic"`,
            `"int8"`); picks the tolerance: float32 max|diff| <= 1e-4, float16
            <= 1e-2; dynamic and int8 need both top-1 agreement (sign
            agreement for one-unit outputs) >= 98% and RMS diff <= 0.1 of the
            Keras output's std.
        latency_runs: Timed runs; the median is reported.
        path: Text for the report's "path" column.

    Returns:
        An `ExportRow`.

    Raises:
        FlexOpsError: If a `.tflite` file needs Flex ops.

    Example:

    ```python
    row = verify_artifact("export/student_int8.tflite", student, x_test, "int8")
    assert row.passed
    ```
    """
    model = _float32_model(load_student(model))[0]
    artifact = Path(artifact)
    fmt = {".tflite": "tflite", ".onnx": "onnx"}.get(artifact.suffix)
    if fmt is None:
        raise ValueError(f"{artifact}: expected a .tflite or .onnx file.")
    data = _as_input_dict(model, sample_data, "sample_data")
    n = len(next(iter(data.values())))
    runner = _TFLiteRunner(artifact) if fmt == "tflite" else _ONNXRunner(artifact)

    keras_x = _keras_inputs(model, data)
    expected = [
        np.asarray(y, np.float32)
        for y in keras.tree.flatten(model.predict_on_batch(keras_x))
    ]
    keras_seconds = _median_seconds(
        lambda: model.predict_on_batch(keras_x), latency_runs
    )

    first = runner({k: v[:1] for k, v in data.items()})
    if runner.dynamic_batch:
        got = runner(data)

        def run_all():
            return runner(data)

        batch_sizes = "1, dynamic"
    else:
        rows = [runner({k: v[i : i + 1] for k, v in data.items()}) for i in range(n)]
        got = [np.concatenate(parts) for parts in zip(*rows, strict=True)]

        def run_all():
            for i in range(n):
                runner({k: v[i : i + 1] for k, v in data.items()})

        batch_sizes = "1"
    if len(got) != len(expected):
        raise ExportError(
            f"{artifact} has {len(got)} outputs, the Keras model {len(expected)}."
        )
    diff = max(
        float(np.max(np.abs(g.reshape(e.shape) - e)))
        for g, e in zip(got, expected, strict=True)
    )
    diff_first = max(
        float(np.max(np.abs(f.reshape(e[:1].shape) - e[:1])))
        for f, e in zip(first, expected, strict=True)
    )
    diff = max(diff, diff_first)
    got = [g.reshape(e.shape) for g, e in zip(got, expected, strict=True)]
    rms_ratio = max(_rms_ratio(g, e) for g, e in zip(got, expected, strict=True))
    agreements = [_agreement(g, e) for g, e in zip(got, expected, strict=True)]
    agreement = min(a for a, _ in agreements)
    ties = sum(t for _, t in agreements)
    seconds = _median_seconds(run_all, latency_runs)

    if quantize is None:
        passed = diff <= FLOAT32_ATOL
    elif quantize == "float16":
        passed = diff <= FLOAT16_ATOL
    else:
        passed = agreement >= MIN_TOP1_AGREEMENT and rms_ratio <= MAX_RMS_RATIO
    passed = passed and math.isfinite(diff) and math.isfinite(rms_ratio)
    runtime = "ai_edge_litert" if fmt == "tflite" else "onnxruntime"
    return ExportRow(
        format=fmt,
        quantize=quantize,
        file=str(artifact),
        bytes=artifact.stat().st_size,
        path=path,
        max_abs_diff=diff,
        rms_ratio=rms_ratio,
        top1_agreement=agreement,
        latency_ms=1e3 * seconds / n,
        keras_latency_ms=1e3 * keras_seconds / n,
        batch_sizes=batch_sizes,
        inputs=runner.input_dtypes(),
        criterion=_criterion(quantize, expected),
        passed=passed,
        note=f"{runtime}, {n} samples"
        + (f", {ties} agree by a tie at the file's resolution" if ties else ""),
    )


# --------------------------------------------------------------------------
# Public entry point


def _normalise_options(formats, quantize):
    if isinstance(formats, str):
        formats = (formats,)
    out_formats = []
    for fmt in formats:
        key = _FORMAT_ALIASES.get(str(fmt).lower())
        if key is None:
            raise ValueError(
                f"Unknown export format {fmt!r}; choose from {list(FORMATS)} "
                "('litert' is accepted for 'tflite')."
            )
        if key not in out_formats:
            out_formats.append(key)
    if quantize is None or isinstance(quantize, str):
        quantize = (quantize,)
    quants = []
    for q in quantize:
        q = None if q in (None, "none", "float32") else q
        if q not in QUANTIZATIONS:
            raise ValueError(
                f"Unknown quantize={q!r}; choose from None, 'float16', 'dynamic', "
                "'int8'."
            )
        if q not in quants:
            quants.append(q)
    return out_formats, quants


def export_student(
    student,
    export_dir,
    formats=("tflite", "onnx"),
    quantize=None,
    representative_data=None,
    sample_data=None,
    *,
    int8_io=False,
    num_calibration_samples=200,
    latency_runs=20,
    check=True,
    name=None,
):
    """Exports a student to TFLite and/or ONNX and verifies every file.

    Uses Keras' `model.export` in this process where the backend supports the
    format; otherwise saves the student and converts it in a child process with
    `KERAS_BACKEND=tensorflow`. Each file is then run in `ai_edge_litert` or
    `onnxruntime` on `sample_data` and compared with the Keras model.
    Mixed-precision students are exported (and compared) as float32.

    Quantisation: `"float16"` stores float16 weights; `"dynamic"` int8 weights
    with float activations; `"int8"` full-integer (TFLite: only int8 builtin ops;
    ONNX: static QDQ), calibrated on `representative_data`.

    Args:
        student: A `keras.Model` or a path to a `.keras` file.
        export_dir: Directory for the files (created if needed). Files are named
            `{name}_{float32|float16|dynamic|int8}.{tflite|onnx}`.
        formats: `"tflite"` (alias `"litert"`) and/or `"onnx"`.
        quantize: `None`, `"float16"`, `"dynamic"`, `"int8"`, or a list of these
            to export several variants in one call.
        representative_data: Calibration inputs (dict of arrays keyed by input
            name, `(x, y)`, or an iterable of batches). Required for `"int8"`.
        sample_data: Inputs to verify the files on (same forms). Defaults to
            `representative_data`, then to 64 random standard-normal rows.
        int8_io: With `"int8"`, make the TFLite file's inputs and outputs int8
            (quantise with the input's scale and zero point). ONNX keeps float IO.
        num_calibration_samples: Rows of `representative_data` used.
        latency_runs: Timed runs per file; the median is reported.
        check: Raise `ExportVerificationError` if a file misses its tolerance
            (float32: max|diff| <= 1e-4; float16: <= 1e-2; dynamic and int8:
            top-1 agreement, or sign agreement for a one-unit output, >= 98%
            and RMS diff <= 0.1 of the Keras output's std).
        name: File name stem; defaults to the model's name.

    Returns:
        An `ExportReport`; `print(report)` shows the table.

    Raises:
        ValueError: Unknown format or quantisation, `"int8"` without
            representative data, or a `student` path that is not a Keras model.
        ImportError: A runtime or converter is missing (names the extra).
        FlexOpsError: A `.tflite` file needs TensorFlow Select (Flex) ops.
        ExportVerificationError: A file missed its tolerance (with `check=True`).

    Example:

    ```python
    report = export_student(student, "export/", quantize=[None, "int8"],
                            representative_data=x_train, sample_data=x_test)
    print(report)
    ```
    """
    fmts, quants = _normalise_options(formats, quantize)
    model, _ = _float32_model(load_student(student))
    if "tflite" in fmts:
        _check_tflite_names(model)
    if "int8" in quants and representative_data is None:
        raise ValueError(
            "quantize='int8' needs representative_data: a few hundred real input "
            "rows (dict keyed by input name) to calibrate the int8 ranges."
        )
    if "tflite" in fmts:
        _require("ai_edge_litert", "TFLite verification")
    if "onnx" in fmts:
        _require("onnxruntime", "ONNX export and verification")
    calibration = None
    if representative_data is not None:
        calibration = _as_input_dict(
            model, representative_data, "representative_data", num_calibration_samples
        )
    if sample_data is not None:
        samples = _as_input_dict(model, sample_data, "sample_data")
    elif calibration is not None:
        samples = calibration
    else:
        dynamic = {k: s for k, (s, _) in _input_specs(model).items() if None in s}
        if dynamic:
            raise ValueError(
                f"Input(s) {dynamic} have a dynamic dimension (None), so no "
                "random sample data can be made to verify the files. Pass "
                "sample_data: real inputs, a dict of arrays keyed by input name."
            )
        rng = np.random.default_rng(0)
        samples = {
            k: rng.standard_normal((64, *shape)).astype("float32")
            for k, (shape, _) in _input_specs(model).items()
        }

    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    stem = name or model.name or "student"

    # Plan: which files are converted where. ONNX quantisation runs here, on
    # the float32 ONNX file, with onnxruntime's tools.
    plan = []  # (fmt, quantize, file, path)
    child_jobs = []
    in_process = []
    for fmt in fmts:
        here = _in_process_supported(fmt)
        path = _IN_PROCESS if here else _CHILD
        targets = quants if fmt == "tflite" else [None]
        for q in targets:
            out = export_dir / f"{stem}_{q or 'float32'}{_SUFFIX[fmt]}"
            job = {"fmt": fmt, "quantize": q, "out": str(out)}
            (in_process if here else child_jobs).append(job)
        for q in quants:
            plan.append(
                (fmt, q, export_dir / f"{stem}_{q or 'float32'}{_SUFFIX[fmt]}", path)
            )

    objects = _child_objects(model, child_jobs) if child_jobs else None
    for job in in_process:
        _convert(model, **job, calibration=calibration, int8_io=int8_io)
    if child_jobs:
        with tempfile.TemporaryDirectory() as workdir:
            _run_child(model, child_jobs, calibration, int8_io, workdir, objects)
    onnx_float = export_dir / f"{stem}_float32.onnx"
    for fmt, q, out, _ in plan:
        if fmt == "onnx" and q is not None:
            _quantize_onnx(onnx_float, out, q, calibration)
    if "onnx" in fmts and None not in quants:
        onnx_float.unlink()
        plan = [p for p in plan if p[2] != onnx_float]

    rows = [
        verify_artifact(out, model, samples, q, latency_runs=latency_runs, path=path)
        for _, q, out, path in plan
    ]
    report = ExportReport(
        rows=rows,
        backend=keras.backend.backend(),
        num_samples=len(next(iter(samples.values()))),
        export_dir=str(export_dir),
    )
    if check and not report.ok:
        raise ExportVerificationError(report)
    return report


# --------------------------------------------------------------------------
# Command line (`gramkd export`, or `python -m keras_gramkd.export`)


def add_export_arguments(parser):
    """Adds the `gramkd export` arguments to an `argparse` parser.

    Args:
        parser: An `argparse.ArgumentParser` (or subparser).

    Returns:
        The parser.

    Example:

    ```python
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    sys.exit(run_export(parser.parse_args()))
    ```
    """
    parser.add_argument("model", help="the student's .keras file")
    parser.add_argument(
        "--format",
        nargs="+",
        default=list(FORMATS),
        choices=["tflite", "litert", "onnx"],
        help="formats to write (default: tflite onnx)",
    )
    parser.add_argument(
        "--quantize",
        nargs="+",
        default=["none"],
        choices=["none", "float16", "dynamic", "int8"],
        help="one or more quantisations (default: none = float32)",
    )
    parser.add_argument(
        "--calibration",
        help=".npz of representative inputs, one array per input name "
        "(required for int8)",
    )
    parser.add_argument(
        "--sample",
        help=".npz of inputs to verify on, keyed by input name "
        "(default: the calibration data)",
    )
    parser.add_argument("--out", default="export", help="output directory")
    parser.add_argument(
        "--int8-io", action="store_true", help="int8 TFLite inputs and outputs"
    )
    parser.add_argument(
        "--num-calibration-samples", type=int, default=200, help="rows to calibrate on"
    )
    parser.add_argument("--runs", type=int, default=20, help="timed runs per file")
    parser.add_argument(
        "--no-check", action="store_true", help="report tolerance misses, don't fail"
    )
    parser.add_argument("--markdown", action="store_true", help="print Markdown")
    parser.add_argument("--json", help="also write the report as JSON to this path")
    return parser


def run_export(args):
    """Runs `gramkd export` with parsed arguments; returns the exit code.

    Exit codes: 0 all files passed, 1 a file missed its tolerance, 2 a usage or
    export error (message on stderr).

    Args:
        args: The namespace from a parser set up by `add_export_arguments`.

    Returns:
        The process exit code.
    """
    try:
        model = load_student(args.model)
        names = input_names(model)
        calibration = (
            load_inputs_npz(args.calibration, names) if args.calibration else None
        )
        sample = load_inputs_npz(args.sample, names) if args.sample else None
        report = export_student(
            model,
            args.out,
            formats=args.format,
            quantize=args.quantize,
            representative_data=calibration,
            sample_data=sample,
            int8_io=args.int8_io,
            num_calibration_samples=args.num_calibration_samples,
            latency_runs=args.runs,
            check=False,
        )
    except (ValueError, TypeError, ImportError, ExportError, OSError) as error:
        print(f"gramkd export: error: {error}", file=sys.stderr)
        return 2
    print(report.to_markdown() if args.markdown else report)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    if args.no_check or report.ok:
        return 0
    print("gramkd export: some files missed their tolerance", file=sys.stderr)
    return 1


def _main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        return _child_main(argv[1])
    parser = argparse.ArgumentParser(
        prog="python -m keras_gramkd.export",
        description="Export a Keras student to TFLite / ONNX and verify it.",
    )
    return run_export(add_export_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(_main())
