"""How the step time and memory of KD + Gram grow with M, d and the batch size.

    python benchmarks/scaling.py [--backend tensorflow|jax|torch] [--quick]
        [--sizes cpu|gpu] [--json PATH] [--axes M,d,batch|middle] [--rounds N]
        [--steps N] [--jit-compile auto|true|false] [--threads N]

The synthetic case (M modalities, embeddings d wide, concatenation fusion in
teacher and student) is swept one axis at a time around a middle point
(`--axes middle`: the middle point alone). `--sizes gpu` sweeps GPU sizes:
M 2-32, d 128-2048, batch 256-4096 around M = 8, d = 512, batch 1024. Each
point runs in a fresh process: variant (d) of step_time.py (KD + Gram) and
KD-only are compiled, warmed up and timed in interleaved epochs; the Gram
term alone is timed in isolation; and the process's peak RSS is read after
(d)'s first epoch. The Gram term costs O(batch * M^2 * d): the table shows
its overhead next to that product.
"""

import argparse
import json
import os
import subprocess
import sys

from step_time import comma_choices, common_parser, configure

MIDDLE = {"M": 8, "d": 128, "batch": 256}
SWEEPS = {
    "M": (2, 4, 8, 16, 32),
    "d": (8, 32, 128, 512, 1024),
    "batch": (32, 64, 128, 256, 512, 1024),
}
GPU_MIDDLE = {"M": 8, "d": 512, "batch": 1024}
GPU_SWEEPS = {"M": (2, 8, 32), "d": (128, 512, 2048), "batch": (256, 1024, 4096)}
QUICK_MIDDLE = {"M": 2, "d": 8, "batch": 16}
QUICK_SWEEPS = {"M": (2, 4), "d": (8, 16), "batch": (16, 32)}
RESULT_PREFIX = "SCALING_POINT "


def parse_args(argv=None):
    parser = common_parser(__doc__, "tiny sweeps of M only")
    parser.add_argument(
        "--axes",
        help="comma-separated (default M,d,batch; M with --quick); "
        "'middle': the middle point only",
    )
    parser.add_argument("--sizes", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # M,d,batch: one point
    args = parser.parse_args(argv)
    default = "M" if args.quick else ",".join(SWEEPS)
    args.axes = comma_choices(parser, args.axes, default, (*SWEEPS, "middle"), "axes")
    args.steps = args.steps or (2 if args.quick else 8)
    return args


def points(args):
    """(axis, {M, d, batch}) for every point of the sweeps, middle point first."""
    middle, sweeps = _sizes(args)
    out = [("middle", dict(middle))]
    for axis in (a for a in args.axes if a in sweeps):
        out += [(axis, {**middle, axis: v}) for v in sweeps[axis] if v != middle[axis]]
    return out


def _sizes(args):
    """(middle point, sweeps) of the run."""
    if args.quick:
        return QUICK_MIDDLE, QUICK_SWEEPS
    return (GPU_MIDDLE, GPU_SWEEPS) if args.sizes == "gpu" else (MIDDLE, SWEEPS)


def measure_point(args):
    """Child process: times (d) and KD-only at one point; prints a JSON line."""
    import harness

    m, d, batch = (int(v) for v in args.point.split(","))
    jit = {"true": True, "false": False}.get(args.jit_compile, "auto")
    case = harness.synthetic_case(m, d, batch, args.steps, attention=False)
    gram, kd_only = (
        harness.build_variant(case, name, jit) for name in ("d", "kd_only")
    )
    rss_built = harness.peak_rss_mib()
    gram.fit(1, timed=False)
    rss_peak = harness.peak_rss_mib()
    kd_only.fit(1, timed=False)
    harness.measure([gram, kd_only], warmup=0, rounds=args.rounds)
    gram_ms, kd_ms = (r.result()["median_step_ms"] for r in (gram, kd_only))
    result = {
        "M": m,
        "d": d,
        "batch": batch,
        "batch_M2_d": batch * m * m * d,
        "kd_gram_step_ms": gram_ms,
        "kd_only_step_ms": kd_ms,
        "gram_overhead_ms": gram_ms - kd_ms,
        "gram_overhead_ratio": gram_ms / kd_ms,
        "gram_term_alone_ms": harness.gram_term_ms(
            batch, m, d, d, gram.model.jit_compile
        ),
        "kd_gram_epoch_times_s": gram.epoch_times,
        "kd_only_epoch_times_s": kd_only.epoch_times,
        "student_forwards_executed": gram.result()["student_forwards_executed"],
        "rss_after_build_mib": rss_built,
        "peak_rss_mib": rss_peak,
        "peak_rss_over_build_mib": rss_peak - rss_built,
        "jit_compile": gram.model.jit_compile,
    }
    print(RESULT_PREFIX + json.dumps(result))


def run_point(args, point):
    """Runs one point in a fresh process; returns its result dict."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--backend",
        args.backend,
        "--point",
        f"{point['M']},{point['d']},{point['batch']}",
        "--rounds",
        str(args.rounds),
        "--steps",
        str(args.steps),
        "--jit-compile",
        args.jit_compile,
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [
        line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)
    ]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"scaling point {point} failed (exit {done.returncode}):\n"
            f"{done.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def main(argv=None):
    args = parse_args(argv)
    configure(args)
    if args.point:
        measure_point(args)
        return
    import harness

    machine = harness.machine_info()
    results = []
    for axis, point in points(args):
        print(f"{axis}: M={point['M']} d={point['d']} batch={point['batch']}")
        results.append({"axis": axis, **run_point(args, point)})
    rows = [
        [
            r["axis"],
            f"{r['M']} / {r['d']} / {r['batch']}",
            f"{r['batch_M2_d']:,}",
            f"{r['kd_only_step_ms']:.2f}",
            f"{r['kd_gram_step_ms']:.2f}",
            f"{r['gram_overhead_ms']:+.2f}",
            f"{100 * (r['gram_overhead_ratio'] - 1):+.1f}%",
            f"{r['gram_term_alone_ms']:.3f}",
            f"{1e6 * r['gram_term_alone_ms'] / r['batch_M2_d']:.2f}",
            f"{r['peak_rss_mib']:.0f} (+{r['peak_rss_over_build_mib']:.0f})",
        ]
        for r in results
    ]
    headers = [
        "axis",
        "M / d / batch",
        "B*M^2*d",
        "KD only ms",
        "KD+Gram ms",
        "Gram ms",
        "Gram %",
        "Gram alone ms",
        "alone ns per B*M^2*d",
        "peak RSS MiB",
    ]
    harness.print_table(
        f"scaling of KD + Gram ({args.backend}; step ms = median over "
        f"{args.rounds} epochs of {args.steps} steps)",
        headers,
        rows,
    )
    path = args.json or harness.default_json("scaling")
    harness.write_json(
        path,
        {
            "benchmark": "scaling",
            "machine": machine,
            "settings": {
                "quick": args.quick,
                "axes": args.axes,
                "sizes": args.sizes,
                "middle": _sizes(args)[0],
                "timed_epochs": args.rounds,
                "steps_per_epoch": args.steps,
                "jit_compile": args.jit_compile,
                "threads": args.threads,
                "memory": "ru_maxrss of a fresh process per point, read after "
                "compiling and fitting one epoch of (d); +: over the RSS "
                "after imports and model building",
            },
            "points": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
