"""Training steps per second of each distillation variant, on one backend.

    python benchmarks/step_time.py [--backend tensorflow|jax|torch] [--quick]
        [--json PATH] [--cases demo,teacher-sized,synthetic] [--rounds N]
        [--warmup N] [--steps N] [--jit-compile auto|true|false] [--threads N]

For each case, every variant of `harness.VARIANTS` is compiled as users run
it (`jit_compile="auto"` by default), fitted for `--warmup` epochs, then for
`--rounds` timed epochs interleaved across the variants; the table shows the
median steps per second, each variant's time ratio to (a) the student alone
(measured in the same run), and the student and teacher forward passes per
step, both as traced and as executed. See benchmarks/README.md.
"""

import argparse
import os

CASES = ("demo", "teacher-sized", "synthetic")
STEPS = {"demo": 20, "teacher-sized": 20, "synthetic": 6}
QUICK_STEPS = 2
QUICK_VIEWS = ("pix", "fou")  # smaller graphs: quicker to trace and compile
SYNTHETIC = {"full": (8, 256, 256), "quick": (3, 16, 32)}  # M, d, batch
TARGETS = (
    ("e", "a", 1.15, "(e) at most 1.15x the time of (a)"),
    ("d", "c", 1.0, "(d) never slower than (c)"),
    ("d", "kd_only", 1.05, "the Gram term adds at most 5% over KD-only"),
)


def common_parser(doc, quick_help):
    """The options both benchmarks share."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(
        "--backend",
        choices=("tensorflow", "jax", "torch"),
        default=os.environ.get("KERAS_BACKEND", "tensorflow"),
    )
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", help="output file (default runs/benchmarks/)")
    parser.add_argument("--rounds", type=int, help="timed epochs (default 9; 2)")
    parser.add_argument("--steps", type=int, help="steps per epoch")
    parser.add_argument(
        "--jit-compile", default="auto", choices=("auto", "true", "false")
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
    args.jit = {"true": True, "false": False}.get(args.jit_compile, "auto")


def comma_choices(parser, value, default, choices, what):
    """The comma-separated `value` (or `default`) as a list of `choices`."""
    picked = [item for item in (value or default).split(",") if item]
    unknown = sorted(set(picked) - set(choices))
    if unknown or not picked:
        parser.error(f"unknown {what} {unknown}; choose from {', '.join(choices)}")
    return picked


def parse_args(argv=None):
    parser = common_parser(__doc__, "a smoke run of the demo case")
    parser.add_argument(
        "--cases", help="comma-separated (default all; demo with --quick)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs")
    args = parser.parse_args(argv)
    default = "demo" if args.quick else ",".join(CASES)
    args.cases = comma_choices(parser, args.cases, default, CASES, "cases")
    return args


def make_case(harness, name, args):
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS[name])
    if name == "synthetic":
        m, d, batch = SYNTHETIC["quick" if args.quick else "full"]
        return harness.synthetic_case(m, d, batch, steps)
    return harness.demo_case(
        steps,
        teacher_sized=name == "teacher-sized",
        views=QUICK_VIEWS if args.quick else None,
    )


def run_case(harness, case, args):
    """Times every variant of `case`; returns its JSON entry."""
    runs = [harness.build_variant(case, name, args.jit) for name in harness.VARIANTS]
    harness.measure([r for r in runs if r.x is not None], args.warmup, args.rounds)
    first = runs[0].result()
    baseline, cpu_baseline = first["median_epoch_s"], first["median_epoch_cpu_s"]
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
            entry["ratio_to_a"] = entry["median_epoch_s"] / baseline
            entry["cpu_ratio_to_a"] = entry["median_epoch_cpu_s"] / cpu_baseline
        variants[run.name] = entry
    info = case.info(runs[0].model)
    d = next(run for run in runs if run.name == "d")
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
        "gram_flops": harness.gram_flops(*shape),
        "targets": [
            {
                "target": text,
                **_ratios(variants, num, den),
                "limit": limit,
                "met": _met(_ratio(variants, num, den), limit),
            }
            for num, den, limit, text in TARGETS
        ],
    }


def _ratio(variants, num, den, key="median_epoch_s"):
    if not (variants[num]["available"] and variants[den]["available"]):
        return None
    return variants[num][key] / variants[den][key]


def _ratios(variants, num, den):
    return {
        "ratio": _ratio(variants, num, den),
        "cpu_ratio": _ratio(variants, num, den, "median_epoch_cpu_s"),
    }


def _difference(variants, key):
    """(d) - kd_only for `key`, or None where it is not measured."""
    d, kd_only = variants["d"][key], variants["kd_only"][key]
    return None if d is None or kd_only is None else d - kd_only


def _met(ratio, limit):
    return None if ratio is None else ratio <= limit


def print_case(harness, name, entry):
    rows = []
    for key, v in entry["variants"].items():
        row = [f"({key})" if len(key) == 1 else key, v["label"]]
        if v["available"]:
            row += [
                f"{v['steps_per_s']:.1f}",
                f"{v['median_step_ms']:.2f}",
                f"{v['ratio_to_a']:.2f}x",
                f"{v['cpu_ratio_to_a']:.2f}x",
                f"{v['student_forwards_traced']} / {v['student_forwards_executed']}",
                f"{v['teacher_forwards_traced']} / {v['teacher_forwards_executed']}",
                "-" if v["ops_per_step"] is None else v["ops_per_step"],
            ]
        rows.append(row + ["-"] * (9 - len(row)))
    headers = [
        "",
        "variant",
        "steps/s",
        "ms/step",
        "time / (a)",
        "CPU time / (a)",
        "student fwd traced / run",
        "teacher fwd traced / run",
        "ops/step",
    ]
    harness.print_table(f"{name}: {entry['description']}", headers, rows)
    for key, v in entry["variants"].items():
        if v["note"]:
            print(f"  ({key}) {v['note']}")
    rows = [
        [t["target"], _x(t["ratio"]), _x(t["cpu_ratio"]), t["limit"]]
        + [{True: "met", False: "MISSED", None: "n/a"}[t["met"]]]
        for t in entry["targets"]
    ]
    rows += [
        [f"{key} / kd_only", _x(cost["ratio"]), _x(cost["cpu_ratio"])]
        for key, cost in entry["gram_cost"].items()
    ]
    ops = entry["gram_overhead_ops"]
    rows += [
        [
            "Gram overhead per step, (d) - kd_only",
            f"{entry['gram_overhead_ms']:.2f} ms",
        ],
        ["  its operations per step", "-" if ops is None else f"{ops:+d}"],
        ["Gram loss alone, value + gradient", f"{entry['gram_term_alone_ms']:.3f} ms"],
        ["  its arithmetic", f"{entry['gram_flops'] / 1e6:.2f} MFLOP"],
    ]
    headers = ["target / Gram cost", "time", "CPU time", "limit", ""]
    harness.print_table(f"{name}: targets and Gram cost", headers, rows, left=1)


def _x(ratio):
    return "-" if ratio is None else f"{ratio:.3f}x"


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
            "jit_compile": args.jit_compile,
            "threads": args.threads,
            "statistic": "median epoch wall time over the timed epochs",
        },
        "cases": {},
    }
    for name in args.cases:
        entry = run_case(harness, make_case(harness, name, args), args)
        result["cases"][name] = entry
        print_case(harness, name, entry)
    path = args.json or harness.default_json("step_time")
    harness.write_json(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
