"""`gramkd export` and `python -m keras_gramkd.export`: the command line."""

import argparse
import json
import sys
from pathlib import Path

from keras_gramkd.export.child import CHILD_COMMAND, child_main
from keras_gramkd.export.errors import ExportError
from keras_gramkd.export.inputs import input_names, load_inputs_npz, load_student
from keras_gramkd.export.pipeline import FORMATS, export_student


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


def main(argv=None):
    """`python -m keras_gramkd.export [ARGS]`, or a child-process job; exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_COMMAND]:
        return child_main(argv[1])
    parser = argparse.ArgumentParser(
        prog="python -m keras_gramkd.export",
        description="Export a Keras student to TFLite / ONNX and verify it.",
    )
    return run_export(add_export_arguments(parser).parse_args(argv))
