"""The `gramkd` command: `gramkd demo` (the study), `tune` and `export`.

`--backend` (before or after the subcommand) sets KERAS_BACKEND before keras is
imported; without it, Keras' own choice holds (KERAS_BACKEND, else
~/.keras/keras.json, else TensorFlow):

    gramkd --backend jax demo --quick
    gramkd export student.keras --format tflite onnx --out export_dir/

Arguments are checked before any import of keras or of an optional extra, so a
wrong argument is reported at once; then a missing extra is named (`demo` and
`tune` need the ``cli`` extra: rich, and matplotlib for the demo's figures).
"""

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import sys

from gramkd import options

# subcommand -> (help, function adding its arguments, module, function running it)
COMMANDS = {
    "demo": (
        "train a teacher and students on the embedded digits and compare the losses",
        options.add_demo_arguments,
        "keras_gramkd.demo.cli",
        "run_demo",
    ),
    "tune": (
        "search the loss weights and temperature with KerasTuner on the digits",
        options.add_tune_arguments,
        "keras_gramkd.tuning.cli",
        "run_tune",
    ),
    "export": (
        "export a student to TFLite (LiteRT) and ONNX, verified in each runtime",
        options.add_export_arguments,
        "keras_gramkd.export.cli",
        "run_export",
    ),
}
# The extra a subcommand needs beyond the library, and the modules it installs
# (checked before anything is imported).
COMMAND_EXTRAS = {
    "demo": ("cli", ("rich", "matplotlib")),
    "tune": ("cli", ("rich",)),
}
# The package each Keras backend needs (each is an extra of keras-gramkd).
BACKEND_PACKAGES = ("tensorflow", "jax", "torch")


def _add_backend(parser, default):
    parser.add_argument(
        "--backend",
        choices=BACKEND_PACKAGES,
        default=default,
        help="Keras backend (default: KERAS_BACKEND, else keras.json, else tensorflow)",
    )


def build_parser():
    """The `gramkd` parser; imports nothing but the standard library."""
    parser = argparse.ArgumentParser(
        prog="gramkd", description="Multi-modality knowledge distillation for Keras 3."
    )
    parser.add_argument(
        "--version",
        action="version",
        version=importlib.metadata.version("keras-gramkd"),
    )
    _add_backend(parser, None)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _, _) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        # SUPPRESS: a --backend given before the subcommand is kept.
        _add_backend(subparser, argparse.SUPPRESS)
        add_arguments(subparser)
    return parser


def missing_extra(command):
    """The error line naming the extra `command` needs, or None if installed.

    >>> missing_extra("export") is None
    True
    """
    extra, modules = COMMAND_EXTRAS.get(command, (None, ()))
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (
        f"gramkd {command}: error: {', '.join(missing)} not installed; install the "
        f'{extra} extra: pip install "keras-gramkd[{extra}]"'
    )


def main(argv=None):
    """Entry point of the `gramkd` console script; returns the exit code."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    missing = missing_extra(args.command)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    _, _, module, run = COMMANDS[args.command]
    try:
        command = importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name not in BACKEND_PACKAGES:
            raise
        print(f"gramkd: error: {error}", file=sys.stderr)  # names the extra
        return 2
    return getattr(command, run)(args)


if __name__ == "__main__":
    sys.exit(main())
