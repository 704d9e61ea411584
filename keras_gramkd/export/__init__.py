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

Each format is one `ExportFormat` record in a registry (`formats`): its name and
aliases, suffix, the backends that convert it in process, its converter, the
runner that verifies it and the quantisations it allows. `register_format` adds
a format that `export_student` then writes and verifies like the built-in ones.

The modules, by concern: `formats` (the registry), `inputs` (the student and its
input data), `convert` (`model.export` and ONNX quantisation), `child` (the
TensorFlow child process), `runtimes` (LiteRT and onnxruntime runners), `verify`
(file vs Keras model), `report` (the table), `pipeline` (`export_student`) and
`cli` (`gramkd export`). The names below are the public API.

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

from keras_gramkd.export.cli import run_export
from keras_gramkd.export.errors import (
    ExportError,
    ExportVerificationError,
    FlexOpsError,
)
from keras_gramkd.export.formats import (
    ExportFormat,
    format_names,
    get_format,
    register_format,
    unregister_format,
)
from keras_gramkd.export.inputs import input_names, load_inputs_npz, load_student
from keras_gramkd.export.pipeline import FORMATS, QUANTIZATIONS, export_student
from keras_gramkd.export.report import ExportReport, ExportRow
from keras_gramkd.export.runtimes import tflite_op_names
from keras_gramkd.export.verify import (  # noqa: F401 (the tolerances, as before)
    FLOAT16_ATOL,
    FLOAT32_ATOL,
    MAX_RMS_RATIO,
    MIN_TOP1_AGREEMENT,
    verify_artifact,
)

__all__ = [
    "FORMATS",
    "QUANTIZATIONS",
    "ExportError",
    "ExportFormat",
    "ExportReport",
    "ExportRow",
    "ExportVerificationError",
    "FlexOpsError",
    "export_student",
    "format_names",
    "get_format",
    "input_names",
    "load_inputs_npz",
    "load_student",
    "register_format",
    "run_export",
    "tflite_op_names",
    "unregister_format",
    "verify_artifact",
]
