"""`gramkd export` and `python -m keras_gramkd.export`: the command line.

The options are those of `gramkd.options.add_export_arguments`.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from gramkd.options import add_export_arguments
from keras_gramkd.export.child import CHILD_COMMAND, child_main
from keras_gramkd.export.errors import ExportError
from keras_gramkd.export.inputs import input_names, load_inputs_npz, load_student
from keras_gramkd.export.pipeline import export_student


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
    print(f"Wrote {os.path.join(os.path.abspath(args.out), '')}")
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
