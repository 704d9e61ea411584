"""Markdown tables of the benchmark results, for the README.

    python benchmarks/report.py [RESULTS_DIR]   (default benchmarks/results)
    python benchmarks/report.py RUN1_DIR --compare RUN2_DIR

Reads the `step_time-*.json`, `scaling-*.json` and `gram_ops-*.json` files the
benchmarks wrote and prints one table per benchmark, a row per backend (and
case or point), so that the README's numbers are copied from the files, not
retyped. With `--compare`, it prints how far two whole runs of `step_time.py`
(the same configuration, run one after the other) agree.
"""

import glob
import json
import os
import sys

BACKENDS = ("tensorflow", "jax", "torch")
STEP_VARIANTS = ("b", "c", "d", "e", "kd_only")


def _load(directory, script):
    """{backend: result} for the files of `script` in `directory`."""
    found = {}
    for path in sorted(glob.glob(os.path.join(directory, f"{script}-*.json"))):
        with open(path) as f:
            data = json.load(f)
        found[data["machine"]["backend"]] = data
    return {b: found[b] for b in BACKENDS if b in found}


def _table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _x(value):
    return "–" if value is None else f"{value:.2f}×"


def _spread(value):
    return "" if value is None else f" ({100 * value:.0f} %)"


def _rx(ratio, spread=None):
    """`1.23×`, with the spread over repeats in parentheses when measured."""
    return _x(ratio) + ("" if ratio is None else _spread(spread))


def _by_jit(data):
    """{jit_compile setting: {case: entry}}, for old (one setting) files too."""
    if "jit_compile" in data and isinstance(data["jit_compile"], dict):
        return {k: v.get("cases", v) for k, v in data["jit_compile"].items()}
    return {data["settings"].get("jit_compile", "auto"): data["cases"]}


def step_time_table(results):
    """A row per backend, jit_compile setting and case: ratios to (a), each
    with its spread over repeats ((max - min) / median) in parentheses."""
    headers = ["backend", "jit_compile", "case", "(a) ms/step"]
    headers += [f"({v})" if len(v) == 1 else v for v in STEP_VARIANTS]
    headers += ["Gram: (d) / KD-only", "targets met", "largest ms spread"]
    rows = []
    for backend, data in results.items():
        for setting, cases in _by_jit(data).items():
            for name, case in cases.items():
                variants = case["variants"]
                met = sum(bool(t["met"]) for t in case["targets"])
                cells = []
                for v in STEP_VARIANTS:
                    entry = variants.get(v) or {}
                    cells.append(
                        _rx(entry.get("ratio_to_a"), entry.get("ratio_spread"))
                    )
                gram = case["gram_cost"]["d"]
                rows.append(
                    [backend, setting, name, f"{variants['a']['median_step_ms']:.2f}"]
                    + cells
                    + [
                        _rx(gram["ratio"], gram.get("spread")),
                        f"{met} of 3",
                        _spread(case.get("largest_repeat_spread")).strip(" ()") or "–",
                    ]
                )
    return _table(headers, rows)


def step_time_cpu_table(results):
    """As `step_time_table`, with the ratios of CPU time (all threads of the
    process), which other processes on a shared machine disturb less."""
    headers = ["backend", "jit_compile", "case", "(a) CPU ms/step"]
    headers += [f"({v})" if len(v) == 1 else v for v in STEP_VARIANTS]
    rows = []
    for backend, data in results.items():
        for setting, cases in _by_jit(data).items():
            for name, case in cases.items():
                variants = case["variants"]
                a = variants["a"]
                cpu_ms = 1e3 * a["median_epoch_cpu_s"] / case["steps_per_epoch"]
                cells = []
                for v in STEP_VARIANTS:
                    entry = variants.get(v) or {}
                    cells.append(
                        _rx(entry.get("cpu_ratio_to_a"), entry.get("cpu_ratio_spread"))
                    )
                rows.append([backend, setting, name, f"{cpu_ms:.2f}"] + cells)
    return _table(headers, rows)


def targets_table(results):
    """Each target per backend and case: wall and CPU time ratios, with
    their spreads over repeats, and whether each is within the limit."""
    headers = ["backend", "jit_compile", "case", "target", "limit"]
    headers += ["wall ratio (spread)", "", "CPU ratio (spread)", ""]
    rows = []
    for backend, data in results.items():
        for setting, cases in _by_jit(data).items():
            for name, case in cases.items():
                for t in case["targets"]:
                    verdicts = [
                        "–" if r is None else ("met" if r <= t["limit"] else "missed")
                        for r in (t["ratio"], t.get("cpu_ratio"))
                    ]
                    rows.append(
                        [backend, setting, name, t["target"], t["limit"]]
                        + [_rx(t["ratio"], t.get("spread")), verdicts[0]]
                        + [_rx(t.get("cpu_ratio"), t.get("cpu_spread")), verdicts[1]]
                    )
    return _table(headers, rows)


def scaling_table(results):
    """A row per point, a column per backend: KD-only ms, Gram %, Gram alone ms."""
    headers = ["axis", "M / d / batch", "B·M²·d"]
    headers += [f"{b}: KD only ms · Gram % · alone ms" for b in results]
    by_point = {}
    for data in results.values():
        for p in data["points"]:
            key = (p["axis"], p["M"], p["d"], p["batch"], p["batch_M2_d"])
            by_point.setdefault(key, []).append(
                f"{p['kd_only_step_ms']:.2f} · "
                f"{100 * (p['gram_overhead_ratio'] - 1):+.0f} % · "
                f"{p['gram_term_alone_ms']:.2f}"
            )
    rows = [
        [axis, f"{m} / {d} / {batch}", f"{product:,}", *cells]
        for (axis, m, d, batch, product), cells in by_point.items()
    ]
    return _table(headers, rows)


def gram_ops_table(results):
    headers = ["backend", "batch / M / d", "textbook ms", "gram_matrix ms", "ratio"]
    rows = [
        [
            backend,
            f"{p['batch']} / {p['M']} / {p['d']}",
            f"{p['textbook_ms']:.3f}",
            f"{p['library_ms']:.3f}",
            _x(p["ratio"]),
        ]
        for backend, data in results.items()
        for p in data["points"]
    ]
    return _table(headers, rows)


def _relative_difference(a, b):
    return None if a is None or b is None else abs(a - b) / ((a + b) / 2)


def _median_ratio(variant, alone):
    return variant.get("ratio_to_a")


def _fastest_epoch_ratio(variant, alone):
    """The variant's fastest epoch over (a)'s: the usual estimator on a noisy
    machine (noise only ever adds time). Epochs of one case have the same
    number of steps, so this is a ratio of step times."""
    times = [entry.get("epoch_times_s") for entry in (variant, alone)]
    return None if None in times else min(times[0]) / min(times[1])


def _largest_difference(case, twin, ratio):
    """`"9.5 % (e)", "no"`: the variant whose `ratio` differs most between
    two runs of one case, relatively (`|r1 - r2| / mean`)."""
    diffs = {}
    for key, entry in case["variants"].items():
        other = twin["variants"].get(key)
        if key != "a" and other is not None:
            diffs[key] = _relative_difference(
                ratio(entry, case["variants"]["a"]),
                ratio(other, twin["variants"]["a"]),
            )
    diffs = {k: v for k, v in diffs.items() if v is not None}
    if not diffs:
        return ["–", "–"]
    worst = max(diffs, key=diffs.get)
    return [
        f"{100 * diffs[worst]:.1f} % ({worst})",
        "yes" if diffs[worst] <= 0.05 else "no",
    ]


def agreement_table(first, second):
    """How far two whole `step_time` runs agree, per backend, setting and case:
    (a)'s ms per step in each, and the largest relative difference between
    the runs' ratios to (a) over the variants both measured, with the variant
    it is for: for the reported ratios (medians over repeats), and for the
    ratios of each variant's fastest epoch."""
    headers = ["backend", "jit_compile", "case", "(a) ms/step: run 1, run 2"]
    headers += ["median ratios: largest difference", "within 5 %"]
    headers += ["fastest epochs: largest difference", "within 5 %"]
    rows = []
    for backend, data in first.items():
        if backend not in second:
            continue
        other = _by_jit(second[backend])
        for setting, cases in _by_jit(data).items():
            for name, case in cases.items():
                twin = other.get(setting, {}).get(name)
                if twin is None:
                    continue
                ms = [c["variants"]["a"]["median_step_ms"] for c in (case, twin)]
                rows.append(
                    [backend, setting, name, f"{ms[0]:.2f}, {ms[1]:.2f}"]
                    + _largest_difference(case, twin, _median_ratio)
                    + _largest_difference(case, twin, _fastest_epoch_ratio)
                )
    return _table(headers, rows)


TABLES = {
    "step_time": step_time_table,
    "step_time (CPU time)": step_time_cpu_table,
    "step_time (targets)": targets_table,
    "scaling": scaling_table,
    "gram_ops": gram_ops_table,
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--compare" in argv:
        first, _, second = argv[:3]
        runs = [_load(d, "step_time") for d in (first, second)]
        print(f"### step_time: run 1 against run 2\n\n{agreement_table(*runs)}\n")
        return
    directory = argv[0] if argv else os.path.join(os.path.dirname(__file__), "results")
    for script, table in TABLES.items():
        results = _load(directory, script.split(" ")[0])
        if results:
            print(f"### {script}\n\n{table(results)}\n")


if __name__ == "__main__":
    main()
