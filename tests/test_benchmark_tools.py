"""The benchmark scripts' own arithmetic, without timing anything: the epoch
calibration of step_time.py and report.py's comparison of two runs."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _import(name):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


class _FakeRun:
    """A variant whose epochs of `steps` steps take `step_s` each."""

    def __init__(self, steps, step_s):
        self.steps_per_epoch, self.step_s, self.epoch_times = steps, step_s, []

    def fit(self, epochs, timed):
        if timed:
            self.epoch_times += [self.steps_per_epoch * self.step_s] * epochs


class _FakeHarness:
    def __init__(self, step_s):
        self.step_s, self.built = step_s, []

    def demo_case(self, steps, **kwargs):
        return steps

    def build_variant(self, steps, name, jit):
        self.built.append((steps, name, jit))
        return _FakeRun(steps, self.step_s)


def test_step_time_calibrates_epochs_to_the_asked_length():
    step_time = _import("step_time")
    args = step_time.parse_args(["--cases", "demo", "--epoch-s", "0.5"])
    harness = _FakeHarness(step_s=0.002)  # 2 ms steps: 250 make 0.5 s
    assert step_time.case_steps(harness, "demo", args, True) == 250
    assert harness.built == [(step_time.STEPS["demo"], "a", True)]
    slow = _FakeHarness(step_s=0.5)  # never fewer than the case's minimum
    assert step_time.case_steps(slow, "demo", args, True) == step_time.STEPS["demo"]
    fixed = step_time.parse_args(["--cases", "demo", "--steps", "7"])
    assert step_time.case_steps(harness, "demo", fixed, True) == 7


def _step_time_file(a_ms, ratios, epochs):
    """A minimal step_time result: one backend, one setting, the demo case;
    `epochs` maps a variant to its epoch times."""
    variants = {"a": {"median_step_ms": a_ms, "ratio_to_a": 1.0}}
    variants.update({k: {"ratio_to_a": r} for k, r in ratios.items()})
    for key, times in epochs.items():
        variants[key]["epoch_times_s"] = times
    return {
        "machine": {"backend": "jax"},
        "settings": {"jit_compile": "true"},
        "cases": {"demo": {"variants": variants}},
    }


def test_report_compares_two_runs(tmp_path):
    report = _import("report")
    epochs = {"a": [1.0, 0.9], "d": [1.9, 1.8], "e": [1.2, 1.08]}  # 2.0, 1.2
    first = {"jax": _step_time_file(5.0, {"d": 2.00, "e": 1.20}, epochs)}
    epochs = {"a": [1.1, 1.0], "d": [2.1, 2.02], "e": [1.26, 1.4]}  # 2.02, 1.26
    second = {"jax": _step_time_file(5.5, {"d": 2.02, "e": 1.32}, epochs)}
    table = report.agreement_table(first, second).splitlines()
    assert len(table) == 3  # header, rule, one row
    # Median ratios: e |1.20 - 1.32| / 1.26 = 9.5 %, larger than d's 1.0 %.
    # Fastest epochs: e |1.2 - 1.26| / 1.23 = 4.9 %, d again 1.0 %.
    row = "| jax | true | demo | 5.00, 5.50 | 9.5 % (e) | no | 4.9 % (e) | yes |"
    assert table[2] == row
    without_epochs = {"jax": _step_time_file(5.5, {"d": 2.02, "e": 1.32}, {})}
    row = report.agreement_table(first, without_epochs).splitlines()[2]
    assert row.endswith("| 9.5 % (e) | no | – | – |")
    for run, data in (("1", first), ("2", second)):
        (tmp_path / run).mkdir()
        (tmp_path / run / "step_time-jax.json").write_text(json.dumps(data["jax"]))
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "report.py"), str(tmp_path / "1")]
        + ["--compare", str(tmp_path / "2")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert table[2] in done.stdout
