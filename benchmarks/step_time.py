"""Training steps per second of each distillation variant, on one backend.

    python benchmarks/step_time.py [--backend tensorflow|jax|torch] [--quick]
        [--json PATH] [--cases demo,teacher-sized,synthetic] [--rounds N]
        [--repeats N] [--warmup N] [--steps N | --epoch-s S] [--variants a,b,...]
        [--jit-compile false,true] [--threads N]

For each `jit_compile` setting (`--jit-compile`, a comma-separated list of auto
/ true / false; default false,true) and each case, every variant of
`harness.VARIANTS` (the unchecked steps only when named) is compiled with that
setting, fitted for `--warmup` epochs, then measured `--repeats` times, each
repeat `--rounds` timed epochs interleaved across the variants. An epoch has
`--steps` steps, or, by default, as many as make an epoch of (a) last about
`--epoch-s` seconds (1.0), counted from two timed epochs of (a) before the case
is measured: epochs of a few tens of milliseconds varied by 10-20 % between
whole runs. The table shows the median over repeats of each repeat's median,
each variant's time ratio to (a) the student alone (each repeat's own ratio,
their median, and their spread: (max - min) / median), and the student and
teacher forward passes per step, both as traced and as executed. See
benchmarks/README.md.
"""

import argparse
import math
import os

CASES = ("demo", "teacher-sized", "synthetic")
# harness.VARIANTS' keys (harness imports keras); the unchecked step's only
# on request (--variants).
DEFAULT_VARIANTS = ("a", "b", "c", "d", "e", "kd_only", "stack_only", "gram_raw")
VARIANT_KEYS = (*DEFAULT_VARIANTS, "d_unchecked", "e_unchecked")
# The fewest steps per epoch (and the calibration's first guess); --epoch-s
# lengthens epochs of fast steps (the demo case on an idle machine: ~1 ms
# per step).
STEPS = {"demo": 60, "teacher-sized": 30, "synthetic": 12}
EPOCH_S = 1.0
QUICK_STEPS = 2
QUICK_VIEWS = ("pix", "fou")  # smaller graphs: quicker to trace and compile
SYNTHETIC = {"full": (8, 256, 256), "quick": (3, 16, 32)}  # M, d, batch
TARGETS = (
    ("e", "a", 1.10, "(e) at most 1.10x the time of (a)"),
    ("d", "c", 1.0, "(d) never slower than (c)"),
    ("d", "kd_only", 1.05, "the Gram term adds at most 5% over KD-only"),
)


JIT_CHOICES = ("auto", "true", "false")


def common_parser(doc, quick_help, jit_default="auto"):
    """The options both benchmarks share."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(
        "--backend",
        choices=("tensorflow", "jax", "torch"),
        default=os.environ.get("KERAS_BACKEND", "tensorflow"),
    )
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", help="output file (default runs/benchmarks/)")
    parser.add_argument("--rounds", type=int, help="timed epochs per repeat")
    parser.add_argument("--steps", type=int, help="steps per epoch")
    if jit_default == "auto":
        parser.add_argument("--jit-compile", default="auto", choices=JIT_CHOICES)
    else:
        parser.add_argument(
            "--jit-compile",
            default=jit_default,
            help=f"comma-separated settings of {'/'.join(JIT_CHOICES)} "
            f"(default {jit_default})",
        )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads per operation (default: the backend's own choice)",
    )
    return parser


def configure(args):
    """Sets the backend and the thread counts: call before importing keras."""
    os.environ["KERAS_BACKEND"] = args.backend
    if args.threads:
        n = str(args.threads)
        os.environ.update(
            OMP_NUM_THREADS=n,
            MKL_NUM_THREADS=n,
            TF_NUM_INTRAOP_THREADS=n,
            TF_NUM_INTEROP_THREADS=n,
            XLA_FLAGS=f"--xla_cpu_multi_thread_eigen=false "
            f"intra_op_parallelism_threads={n}",
        )
    if args.rounds is None:
        args.rounds = 2 if args.quick else 9
    args.jit = jit_value(args.jit_compile)


def jit_value(setting):
    """The `compile(jit_compile=...)` value of a command-line setting."""
    return {"true": True, "false": False}.get(setting, "auto")


def comma_choices(parser, value, default, choices, what):
    """The comma-separated `value` (or `default`) as a list of `choices`."""
    picked = [item for item in (value or default).split(",") if item]
    unknown = sorted(set(picked) - set(choices))
    if unknown or not picked:
        parser.error(f"unknown {what} {unknown}; choose from {', '.join(choices)}")
    return picked


def parse_args(argv=None):
    parser = common_parser(__doc__, "a smoke run of the demo case", "false,true")
    parser.add_argument(
        "--cases", help="comma-separated (default all; demo with --quick)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs")
    parser.add_argument(
        "--epoch-s",
        type=float,
        default=EPOCH_S,
        help="without --steps: steps per epoch such that an epoch of (a) "
        f"lasts about this many seconds (default {EPOCH_S})",
    )
    parser.add_argument(
        "--repeats", type=int, help="whole measurements (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--variants",
        help=f"comma-separated, of {', '.join(VARIANT_KEYS)} (default: "
        f"{', '.join(DEFAULT_VARIANTS)})",
    )
    parser.add_argument(
        "--batch-size", type=int, help="batch size (default: each case's own)"
    )
    args = parser.parse_args(argv)
    if args.variants:
        picked = comma_choices(parser, args.variants, "", VARIANT_KEYS, "variants")
        # (a) is every ratio's baseline: always measured, first.
        args.variants = [v for v in VARIANT_KEYS if v in picked or v == "a"]
    default = "demo" if args.quick else ",".join(CASES)
    args.cases = comma_choices(parser, args.cases, default, CASES, "cases")
    args.jit_settings = comma_choices(
        parser, args.jit_compile, "false,true", JIT_CHOICES, "jit_compile settings"
    )
    args.jit_compile = args.jit_settings[0]  # what configure() reads
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    return args


def case_steps(harness, name, args, jit):
    """Steps per epoch of a case: `--steps`, the quick run's, or calibrated so
    that an epoch of (a), the student alone, lasts about `--epoch-s`."""
    if args.steps or args.quick:
        return args.steps or QUICK_STEPS
    run = harness.build_variant(make_case(harness, name, args, STEPS[name]), "a", jit)
    run.fit(1, timed=False)
    run.fit(2, timed=True)
    step_s = min(run.epoch_times) / run.steps_per_epoch
    return max(STEPS[name], math.ceil(args.epoch_s / step_s))


def make_case(harness, name, args, steps):
    if name == "synthetic":
        m, d, batch = SYNTHETIC["quick" if args.quick else "full"]
        return harness.synthetic_case(m, d, args.batch_size or batch, steps)
    return harness.demo_case(
        steps,
        teacher_sized=name == "teacher-sized",
        batch_size=args.batch_size,
        views=QUICK_VIEWS if args.quick else None,
    )


def run_case(harness, case, args, jit):
    """Times every variant of `case` compiled with `jit`; returns its JSON entry."""
    names = args.variants or list(DEFAULT_VARIANTS)
    runs = [harness.build_variant(case, name, jit) for name in names]
    harness.measure(
        [r for r in runs if r.x is not None], args.warmup, args.rounds, args.repeats
    )
    first = runs[0].result()
    variants = {}
    for run in runs:
        short, description = harness.VARIANTS[run.name]
        entry = {
            "label": short,
            "description": description.format(feature_layer=case.feature_layer),
            "available": run.x is not None,
            "note": run.note,
        }
        if run.x is not None:
            entry.update(run.result())
            entry["ratio_to_a"], entry["ratio_spread"] = harness.ratio_over_repeats(
                entry, first
            )
            entry["cpu_ratio_to_a"], entry["cpu_ratio_spread"] = (
                harness.ratio_over_repeats(entry, first, "repeat_median_epoch_cpu_s")
            )
        variants[run.name] = entry
    info = case.info(runs[0].model)
    d = next((run for run in runs if run.name == "d"), runs[0])
    shape = (
        case.batch_size,
        info["modalities"],
        info["teacher_embed_dim"],
        info["student_embed_dim"],
    )
    return {
        **info,
        "variants": variants,
        "gram_cost": {
            name: _ratios(variants, name, "kd_only")
            for name in ("stack_only", "gram_raw", "d")
        },
        "gram_overhead_ms": _difference(variants, "median_step_ms"),
        "gram_overhead_ops": _difference(variants, "ops_per_step"),
        "gram_term_alone_ms": harness.gram_term_ms(*shape, d.model.jit_compile),
        "largest_repeat_spread": max(
            (
                v["repeat_spread"]
                for v in variants.values()
                if v["available"] and v["repeat_spread"] is not None
            ),
            default=None,
        ),
        "gram_flops": harness.gram_flops(*shape),
        "targets": [
            {
                "target": text,
                **_ratios(variants, num, den),
                "limit": limit,
                "met": _met(_ratio(variants, num, den)[0], limit),
            }
            for num, den, limit, text in TARGETS
        ],
    }


def _available(variants, name):
    variant = variants.get(name)
    return variant if variant is not None and variant["available"] else None


def _ratio(variants, num, den, key="repeat_median_epoch_s"):
    import harness

    return harness.ratio_over_repeats(
        _available(variants, num), _available(variants, den), key
    )


def _ratios(variants, num, den):
    ratio, spread = _ratio(variants, num, den)
    cpu_ratio, cpu_spread = _ratio(variants, num, den, "repeat_median_epoch_cpu_s")
    return {
        "ratio": ratio,
        "spread": spread,
        "cpu_ratio": cpu_ratio,
        "cpu_spread": cpu_spread,
    }


def _difference(variants, key):
    """(d) - kd_only for `key`, or None where it is not measured."""
    d, kd_only = _available(variants, "d"), _available(variants, "kd_only")
    if d is None or kd_only is None or d[key] is None or kd_only[key] is None:
        return None
    return d[key] - kd_only[key]


def _met(ratio, limit):
    return None if ratio is None else ratio <= limit


def print_case(harness, name, entry):
    """Prints the case's variants, its targets and the Gram term's cost."""
    rows = []
    for key, v in entry["variants"].items():
        row = [f"({key})" if len(key) == 1 else key, v["label"]]
        if v["available"]:
            row += [
                f"{v['steps_per_s']:.1f}",
                f"{v['median_step_ms']:.2f}",
                _x(v["ratio_to_a"], v["ratio_spread"]),
                _x(v["cpu_ratio_to_a"], v["cpu_ratio_spread"]),
                _pct(v["repeat_spread"]),
                f"{v['student_forwards_traced']} / {v['student_forwards_executed']}",
                f"{v['teacher_forwards_traced']} / {v['teacher_forwards_executed']}",
                "-" if v["ops_per_step"] is None else v["ops_per_step"],
            ]
        rows.append(row + ["-"] * (10 - len(row)))
    headers = [
        "",
        "variant",
        "steps/s",
        "ms/step",
        "time / (a)",
        "CPU time / (a)",
        "ms spread",
        "student fwd traced / run",
        "teacher fwd traced / run",
        "ops/step",
    ]
    harness.print_table(f"{name}: {entry['description']}", headers, rows)
    for key, v in entry["variants"].items():
        if v["note"]:
            print(f"  ({key}) {v['note']}")
    rows = [
        [t["target"], _x(t["ratio"], t["spread"]), _x(t["cpu_ratio"]), t["limit"]]
        + [{True: "met", False: "MISSED", None: "n/a"}[t["met"]]]
        for t in entry["targets"]
    ]
    rows += [
        [f"{key} / kd_only", _x(cost["ratio"], cost["spread"]), _x(cost["cpu_ratio"])]
        for key, cost in entry["gram_cost"].items()
    ]
    ops = entry["gram_overhead_ops"]
    rows += [
        [
            "Gram overhead per step, (d) - kd_only",
            _ms(entry["gram_overhead_ms"]),
        ],
        ["  its operations per step", "-" if ops is None else f"{ops:+d}"],
        ["Gram loss alone, value + gradient", f"{entry['gram_term_alone_ms']:.3f} ms"],
        ["  its arithmetic", f"{entry['gram_flops'] / 1e6:.2f} MFLOP"],
    ]
    headers = ["target / Gram cost", "time", "CPU time", "limit", ""]
    harness.print_table(f"{name}: targets and Gram cost", headers, rows, left=1)


def _x(ratio, spread=None):
    """`1.234x`, and `± 2.1 %` (the spread over repeats) when there is one."""
    if ratio is None:
        return "-"
    return f"{ratio:.3f}x" + ("" if spread is None else f" ±{_pct(spread / 2)}")


def _pct(value):
    return "-" if value is None else f"{100 * value:.1f}%"


def _ms(value):
    return "-" if value is None else f"{value:.2f} ms"


def main(argv=None):
    args = parse_args(argv)
    configure(args)
    import harness

    result = {
        "benchmark": "step_time",
        "machine": harness.machine_info(),
        "settings": {
            "quick": args.quick,
            "cases": args.cases,
            "warmup_epochs": args.warmup,
            "timed_epochs": args.rounds,
            "repeats": args.repeats,
            "steps_per_epoch": args.steps
            or (QUICK_STEPS if args.quick else f"calibrated: (a) ~{args.epoch_s} s"),
            "jit_compile": args.jit_settings,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "statistic": "median over repeats of each repeat's median epoch "
            "wall time; ratios: median over repeats of each repeat's ratio; "
            "spread: (max - min) / median over repeats",
        },
        "jit_compile": {},
    }
    path = args.json or harness.default_json("step_time")
    for setting in args.jit_settings:
        cases = {}
        result["jit_compile"][setting] = {"cases": cases}
        for name in args.cases:
            jit = jit_value(setting)
            steps = case_steps(harness, name, args, jit)
            print(f"== jit_compile={setting}: {name}, {steps} steps", flush=True)
            entry = run_case(harness, make_case(harness, name, args, steps), args, jit)
            cases[name] = entry
            print_case(harness, f"{name}, jit_compile={setting}", entry)
            harness.write_json(path, result)  # what is done so far, case by case
    harness.write_json(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
