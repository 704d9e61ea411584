"""`gramkd demo` on the command line: its arguments and its entry point."""

import sys

from keras_gramkd.datasets import MFEAT_VIEWS
from keras_gramkd.demo.settings import DEFAULT_SETTING, SETTINGS
from keras_gramkd.demo.study import (
    DEFAULTS,
    GRAM_NORMALIZE_CHOICES,
    resolve_config,
    run_study,
)


def add_demo_arguments(parser):
    """Adds the `gramkd demo` options to an `argparse.ArgumentParser`."""
    parser.add_argument(
        "--views",
        nargs="+",
        default=None,
        help=f"views to use, from {', '.join(MFEAT_VIEWS)} (default all; "
        "space- or comma-separated)",
    )
    parser.add_argument(
        "--setting",
        choices=SETTINGS,
        default=DEFAULT_SETTING,
        help=f"what teacher and student see (default {DEFAULT_SETTING}); see "
        "the README's results section",
    )
    d = DEFAULTS
    for flag, kind, what in (
        ("--epochs", int, "student epochs"),
        ("--teacher-epochs", int, "teacher epochs"),
        ("--seeds", int, "student seeds, paired across methods"),
        ("--gram-weight", float, "weight of the modality Gram term"),
        ("--kd-weight", float, "weight of the logit KD term"),
        ("--temperature", float, "KD temperature"),
    ):
        default = d[flag[2:].replace("-", "_")]
        parser.add_argument(
            flag, type=kind, default=None, help=f"{what} (default {default:g})"
        )
    parser.add_argument(
        "--gram-normalize",
        choices=GRAM_NORMALIZE_CHOICES,
        default=None,
        help=f"Gram matrix normalisation (default {d['gram_normalize']})",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="methods to run (space- or comma-separated; must include kd; "
        "default all: labels, kd, keras_kd, gram, gram_fused where the "
        "student fuses with attention, the Gram controls, sp, rkd, pkt, "
        "fitnet, modality_sp)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 seed, 5 epochs, labels, kd and the Gram",
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default runs/demo-<timestamp>/)"
    )
    parser.add_argument(
        "--export",
        action="store_true",
        help="export the best student to TFLite and ONNX (float32, float16, "
        "dynamic, int8), verify each file and add the table to the results "
        '(needs pip install "keras-gramkd[export]")',
    )
    return parser


def run_demo(args):
    """Runs `gramkd demo` from parsed arguments; returns the exit code."""
    views = None
    if args.views:
        views = [v for item in args.views for v in item.split(",") if v]
    options = dict(
        epochs=args.epochs,
        teacher_epochs=args.teacher_epochs,
        seeds=args.seeds,
        gram_weight=args.gram_weight,
        kd_weight=args.kd_weight,
        temperature=args.temperature,
        gram_normalize=args.gram_normalize,
    )
    try:
        resolve_config(
            views, args.setting, quick=args.quick, methods=args.methods, **options
        )
    except ValueError as error:
        print(f"gramkd demo: error: {error}", file=sys.stderr)
        return 2
    results = run_study(
        views,
        args.setting,
        methods=args.methods,
        quick=args.quick,
        out=args.out,
        export=args.export,
        **options,
    )
    if args.export and not results["export"]["ok"]:
        print(
            "gramkd demo: error: an exported file missed its tolerance; see the "
            "export table in results.md.",
            file=sys.stderr,
        )
        return 1
    return 0
