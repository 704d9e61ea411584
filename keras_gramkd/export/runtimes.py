"""The runtimes the files ship with: LiteRT for `.tflite`, onnxruntime for `.onnx`.

The formats' records (`keras_gramkd.export.formats`) name these runners. Each
runner feeds inputs by name and returns the outputs as float32 arrays
(int8 inputs and outputs quantised and dequantised with the file's scale and
zero point). `ai_edge_litert` and `onnxruntime` are imported when a runner is
made.
"""

import re

import numpy as np

from keras_gramkd.export.errors import ExportError, FlexOpsError, require

_ONNX_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}


def _interpreter(path):
    interpreter_mod = require("ai_edge_litert.interpreter", "TFLite verification")
    return interpreter_mod.Interpreter(model_path=str(path))


def _op_names(interpreter):
    # LiteRT's only listing of a file's ops (Keras is not involved).
    return {op["op_name"] for op in interpreter._get_ops_details()}


def tflite_op_names(path):
    """Returns the sorted op names of a `.tflite` file (e.g. `FULLY_CONNECTED`).

    Flex (TensorFlow Select) ops appear as `Flex<TensorFlowOp>`.

    Args:
        path: Path to the `.tflite` file.

    Returns:
        A sorted list of op names.
    """
    return sorted(_op_names(_interpreter(path)))


def _natural_key(name):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class TFLiteRunner:
    """Runs a `.tflite` file in standalone LiteRT, feeding inputs by name."""

    def __init__(self, path):
        self.interpreter = _interpreter(path)
        flex = sorted(o for o in _op_names(self.interpreter) if o.startswith("Flex"))
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
        """`{input name: dtype name}` of the file's inputs."""
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


class ONNXRunner:
    """Runs an `.onnx` file in onnxruntime, feeding inputs by name."""

    def __init__(self, path):
        ort = require("onnxruntime", "ONNX verification")
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
        """`{input name: dtype name}` of the file's inputs."""
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
