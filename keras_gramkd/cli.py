"""The `gramkd` command: `gramkd demo` (the study), `tune` and `export`.

`--backend` (before or after the subcommand) is read before keras is imported,
so it selects the Keras backend (it overrides KERAS_BACKEND):

    gramkd demo --backend jax --quick
    gramkd export student.keras --format tflite onnx --out export_dir/
"""

import argparse
import importlib
import json
import os
import sys

from keras_gramkd import missing_backend_message

BACKENDS = ("tensorflow", "jax", "torch")

# subcommand -> (module, help, function adding its arguments, function running it)
COMMANDS = {
    "demo": (
        "keras_gramkd.demo",
        "train a teacher and students on the embedded digits and compare the losses",
        "add_demo_arguments",
        "run_demo",
    ),
    "tune": (
        "keras_gramkd.tuning",
        "search the loss weights and temperature with KerasTuner on the digits",
        "add_tune_arguments",
        "run_tune",
    ),
    "export": (
        "keras_gramkd.export",
        "export a student to TFLite (LiteRT) and ONNX, verified in each runtime",
        "add_export_arguments",
        "run_export",
    ),
}


def _configured_backend():
    """The backend keras will load: KERAS_BACKEND, else keras.json, else TF."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def _backend_parser():
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        help="Keras backend to use (default: KERAS_BACKEND, else tensorflow)",
    )
    return parser


def build_parser():
    """The full parser; imports keras (through the subcommand modules)."""
    from keras_gramkd import __version__

    parser = argparse.ArgumentParser(
        prog="gramkd",
        description="Multi-modality knowledge distillation for Keras 3.",
        parents=[_backend_parser()],
    )
    parser.add_argument("--version", action="version", version=__version__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text, add_arguments, _) in COMMANDS.items():
        subparser = subparsers.add_parser(
            name, help=help_text, description=help_text, parents=[_backend_parser()]
        )
        getattr(importlib.import_module(module), add_arguments)(subparser)
    return parser


def main(argv=None):
    """Entry point of the `gramkd` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    known, _ = _backend_parser().parse_known_args(argv)
    if known.backend:
        os.environ["KERAS_BACKEND"] = known.backend
    message = missing_backend_message(_configured_backend())
    if message:
        print(f"gramkd: error: {message}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    module, _, _, run = COMMANDS[args.command]
    return getattr(importlib.import_module(module), run)(args)


if __name__ == "__main__":
    sys.exit(main())
