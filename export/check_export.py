"""Compare an exported .tflite / .onnx file with its .keras source.

Runs the file in its real runtime (ai_edge_litert or onnxruntime) on the inputs of
an .npz file (one array per model input, keyed by input name; other keys such as
labels are ignored) and prints max |diff|, top-1 agreement, latency and whether the
tolerance for its quantisation holds. Exit code 0 when it does, 1 when not.

Usage:

    python export/check_export.py export/student_int8.tflite student.keras data.npz
    python export/check_export.py export/model.onnx student.keras data.npz \\
        --quantize float16

The quantisation (which picks the tolerance) is read from the file name that
`export_student` writes (`*_float32`, `*_float16`, `*_dynamic`, `*_int8`) unless
`--quantize` is given.
"""

import argparse
import re
import sys
from pathlib import Path

import keras

try:
    import keras_gramkd  # noqa: F401
except ImportError:  # Run from a source checkout without installing.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from keras_gramkd.export import (
    ExportReport,
    input_names,
    load_inputs_npz,
    load_student,
    verify_artifact,
)


def _quantize_from_name(path):
    match = re.search(r"_(float32|float16|dynamic|int8)\.(tflite|onnx)$", str(path))
    if not match or match.group(1) == "float32":
        return None
    return match.group(1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", help="the exported .tflite or .onnx file")
    parser.add_argument("model", help="the .keras file it was exported from")
    parser.add_argument("data", help=".npz of inputs keyed by input name")
    parser.add_argument(
        "--quantize",
        choices=["none", "float16", "dynamic", "int8"],
        help="how the file was quantised (default: from its name)",
    )
    parser.add_argument("--runs", type=int, default=20, help="timed runs")
    args = parser.parse_args(argv)

    model = load_student(args.model)
    data = load_inputs_npz(args.data, input_names(model))
    if args.quantize is None:
        quantize = _quantize_from_name(args.artifact)
    else:
        quantize = None if args.quantize == "none" else args.quantize
    row = verify_artifact(
        args.artifact,
        model,
        data,
        quantize=quantize,
        latency_runs=args.runs,
        path=f"checked vs {Path(args.model).name}",
    )
    num_samples = len(next(iter(data.values())))
    directory = str(Path(args.artifact).parent)
    print(ExportReport([row], keras.backend.backend(), num_samples, directory))
    return 0 if row.passed else 1


if __name__ == "__main__":
    sys.exit(main())
