"""`gramkd demo` on the command line: its entry point (options: `gramkd.options`)."""

import sys

from keras_gramkd.demo.study import resolve_config, run_study


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
            views,
            args.setting,
            quick=args.quick,
            full=args.full,
            methods=args.methods,
            **options,
        )
    except ValueError as error:
        print(f"gramkd demo: error: {error}", file=sys.stderr)
        return 2
    results = run_study(
        views,
        args.setting,
        methods=args.methods,
        quick=args.quick,
        full=args.full,
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
