"""The options of `gramkd demo`, `tune` and `export`: argparse only, no keras.

The defaults and choices are written out here, so that ``--help`` prints them
without importing a backend; `tests/test_cli.py` checks that each one equals the
library's own value (`keras_gramkd.demo.DEFAULTS`, `keras_gramkd.tuning.TUNERS`,
...).

Example:

>>> import argparse
>>> parser = add_demo_arguments(argparse.ArgumentParser())
>>> parser.parse_args(["--seeds", "5"]).seeds
5
"""

import argparse

VIEWS = ("pix", "fou", "fac", "kar", "zer", "mor")
SETTINGS = ("clean", "noisy", "few-labels", "unreliable", "missing")
DEFAULT_SETTING = "noisy"
GRAM_NORMALIZE_CHOICES = ("l2", "centered", "dim", "none")
DEMO_DEFAULTS = {
    "epochs": 30,
    "teacher_epochs": 30,
    "seeds": 3,
    "gram_weight": 3.0,
    "kd_weight": 1.0,
    "temperature": 4.0,
    "gram_normalize": "l2",
}
# The default run: the reference kd, labels, the modality Gram (also the fused
# Gram where the student fuses with attention), its batch-mean control and SP
# (the cheapest relational baseline), chosen so that the default `gramkd demo`
# ends within 4 minutes on 2 CPU cores (`keras_gramkd.demo.study.
# expected_seconds`: about 3.4 min); a name the setting does not have is left
# out. --full runs every method at FULL (about 8 min).
DEMO_METHODS = (
    "labels",
    "kd",
    "gram",
    "gram_fused",
    "gram_batch_mean",
    "gram_fused_batch_mean",
    "sp",
)
FULL = {"epochs": 30, "teacher_epochs": 30, "seeds": 3}
# 5 student epochs: at 2 the quick student (about 62 %) had so many near-tied
# logits that quantised exports came near or below the 98 % top-1 agreement
# bar by chance (5 epochs: about 80 %, agreement >= 99 %).
QUICK = {"epochs": 5, "teacher_epochs": 3, "seeds": 1}
TUNERS = ("random", "bayesian", "hyperband")
TUNE_SETTINGS = ("clean", "noisy")  # the weight search; --terms runs on every setting
TERM_FAMILIES = ("kd", "gram", "modality_sp", "sp", "rkd", "pkt", "fitnet")
EXPORT_FORMATS = ("tflite", "onnx")
EXPORT_FORMAT_ALIASES = ("litert",)
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")


def at_least(minimum, kind=int):
    """An argparse type: a number of `kind` that is at least `minimum`.

    >>> at_least(1)("3")
    3
    """

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        if not value >= minimum:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def positive_float(text):
    """An argparse type: a finite number above 0.

    >>> positive_float("0.5")
    0.5
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _count_option(parser, flag, default, what):
    """A whole-number option of at least 1, its default stated in its help."""
    parser.add_argument(
        flag,
        type=at_least(1),
        default=default,
        help=f"{what}, at least 1 (default: {default})",
    )


def _views(parser):
    parser.add_argument(
        "--views",
        nargs="+",
        default=None,
        metavar="VIEW",
        help=f"digit views to use, from {', '.join(VIEWS)}, space- or "
        "comma-separated (default: all six)",
    )


def add_demo_arguments(parser):
    """Adds the `gramkd demo` options to an `argparse.ArgumentParser`."""
    _views(parser)
    parser.add_argument(
        "--setting",
        choices=SETTINGS,
        default=DEFAULT_SETTING,
        help=f"what teacher and student see (default: {DEFAULT_SETTING})",
    )
    d = DEMO_DEFAULTS
    for flag, kind, what in (
        ("--epochs", at_least(1), "student epochs, at least 1"),
        ("--teacher-epochs", at_least(1), "teacher epochs, at least 1"),
        ("--seeds", at_least(1), "student seeds, paired across methods, at least 1"),
        ("--gram-weight", at_least(0.0, float), "weight of the modality Gram, >= 0"),
        ("--kd-weight", at_least(0.0, float), "weight of the logit KD term, >= 0"),
        ("--temperature", positive_float, "KD temperature, above 0"),
    ):
        default = d[flag[2:].replace("-", "_")]
        parser.add_argument(
            flag, type=kind, default=None, help=f"{what} (default: {default:g})"
        )
    parser.add_argument(
        "--gram-normalize",
        choices=GRAM_NORMALIZE_CHOICES,
        default=None,
        help=f"Gram matrix normalisation (default: {d['gram_normalize']})",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="METHOD",
        help="methods to run, space- or comma-separated, including kd (default: "
        "labels, kd, gram, gram_fused where the student fuses with attention, "
        "the main Gram's batch-mean control and sp; --full adds keras_kd, the "
        "other Gram controls, rkd, pkt, fitnet, modality_sp)",
    )
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK['seeds']} seed, {QUICK['epochs']} epochs, labels, "
        "kd and the Gram",
    )
    runs.add_argument(
        "--full",
        action="store_true",
        help=f"every method, {FULL['seeds']} seeds, {FULL['epochs']} epochs "
        "(about 8 minutes on 2 CPU cores, the default about 3); --methods, "
        "--seeds and --epochs still override",
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default: runs/demo-<timestamp>/)"
    )
    parser.add_argument(
        "--export",
        action="store_true",
        help="export the best student to TFLite and ONNX (float32, float16, "
        "dynamic, int8), verify each file and add the table to the results "
        '(needs pip install "keras-gramkd[export]")',
    )
    return parser


def add_tune_arguments(parser):
    """Adds the `gramkd tune` options to an `argparse.ArgumentParser`."""
    parser.add_argument(
        "--terms",
        nargs="+",
        default=None,
        metavar="FAMILY",
        choices=TERM_FAMILIES + ("all",),
        help="search which distillation term pays instead of the loss weights: "
        f"the families ({', '.join(TERM_FAMILIES)}, or all), each with --trials "
        "trials, then a confirmation on fresh seeds",
    )
    _count_option(
        parser, "--trials", 8, "trials of random and bayesian search (per family)"
    )
    _count_option(parser, "--epochs", 10, "epochs per trial (hyperband: the most)")
    parser.add_argument(
        "--tuner",
        choices=TUNERS,
        default="random",
        help="search algorithm; bayesian needs scikit-learn (default: random)",
    )
    parser.add_argument(
        "--directory",
        default=None,
        help="tuner folder; an existing one resumes its search "
        "(default: runs/tune-<timestamp>/)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="start over in an existing folder"
    )
    _views(parser)
    parser.add_argument(
        "--setting",
        choices=SETTINGS,
        default="noisy",
        help="what the student sees, as in `gramkd demo`; the weight search "
        f"takes {' or '.join(TUNE_SETTINGS)}, --terms every one (default: noisy)",
    )
    _count_option(parser, "--teacher-epochs", 20, "teacher epochs")
    parser.add_argument(
        "--confirm-seeds",
        type=at_least(2),
        default=5,
        help="--terms: fresh seeds of the confirmation, at least 2 (default: 5)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the split and search (default: 0)"
    )
    return parser


def add_export_arguments(parser):
    """Adds the `gramkd export` arguments to an `argparse.ArgumentParser`."""
    parser.add_argument("model", help="the student's .keras file")
    parser.add_argument(
        "--format",
        nargs="+",
        default=list(EXPORT_FORMATS),
        choices=EXPORT_FORMATS + EXPORT_FORMAT_ALIASES,
        help="formats to write; litert is tflite (default: tflite onnx)",
    )
    parser.add_argument(
        "--quantize",
        nargs="+",
        default=["none"],
        choices=QUANTIZATIONS,
        help="one or more quantisations (default: none, float32)",
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
    parser.add_argument(
        "--out", default="export", help="output folder (default: export/)"
    )
    parser.add_argument(
        "--int8-io", action="store_true", help="int8 TFLite inputs and outputs"
    )
    _count_option(parser, "--num-calibration-samples", 200, "rows to calibrate on")
    _count_option(parser, "--runs", 20, "timed runs per file")
    parser.add_argument(
        "--no-check", action="store_true", help="report tolerance misses, don't fail"
    )
    parser.add_argument("--markdown", action="store_true", help="print Markdown")
    parser.add_argument("--json", help="also write the report as JSON to this path")
    return parser
