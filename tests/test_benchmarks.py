"""The benchmarks run in --quick mode, so that they never rot (no timing checks),
and benchmarks/gpu.sh runs its --dry-run on the CPU."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benchmarks' quick runs

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
VARIANTS = ("a", "b", "c", "d", "e", "kd_only", "stack_only", "gram_raw")
COUNTS = (
    "student_forwards_traced",
    "teacher_forwards_traced",
    "student_forwards_executed",
    "teacher_forwards_executed",
)


def _run(script, tmp_path, *extra):
    """Runs benchmarks/<script> --quick under this backend; returns its JSON."""
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    out = tmp_path / f"{script}.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--threads", "1"]
        + ["--backend", backend, "--json", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["machine"]["backend"] == backend
    assert data["settings"]["quick"] is True
    return data


def _positive(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def step_time(tmp_path_factory):
    # Two repeats of one round: the spreads over repeats are computed.
    return _run(
        "step_time.py",
        tmp_path_factory.mktemp("step_time"),
        *("--rounds", "1", "--repeats", "2"),
    )


def _cases(step_time):
    """The demo case measured with each jit_compile setting."""
    assert step_time["settings"]["jit_compile"] == ["false", "true"]
    assert list(step_time["jit_compile"]) == ["false", "true"]
    return [step_time["jit_compile"][s]["cases"]["demo"] for s in ("false", "true")]


def test_step_time_reports_every_variant(step_time):
    for case in _cases(step_time):
        _check_variants(case)


def test_step_time_reports_the_spread_of_repeats(step_time):
    for case in _cases(step_time):
        for name, variant in case["variants"].items():
            if not variant["available"]:
                continue
            assert len(variant["repeat_median_epoch_s"]) == 2, name
            assert variant["repeat_spread"] >= 0, name
            assert variant["ratio_spread"] >= 0, name
        for target in case["targets"]:
            assert target["spread"] is None or target["spread"] >= 0
        assert case["largest_repeat_spread"] >= 0


def test_step_time_compiles_each_jit_setting(step_time):
    off, on = _cases(step_time)
    assert all(v["jit_compile"] is False for v in off["variants"].values())
    # True everywhere it is available (Keras may turn it off for a model).
    assert any(v.get("jit_compile") for v in on["variants"].values())


def _check_variants(case):
    assert list(case["variants"]) == list(VARIANTS)
    for name, variant in case["variants"].items():
        if not variant["available"]:  # only the teacher cache may be missing
            assert name == "e" and variant["note"].startswith("not available")
            continue
        assert _positive(variant["ratio_to_a"]), name
        assert _positive(variant["cpu_ratio_to_a"]), name
        assert all(_positive(t) for t in variant["epoch_times_s"]), name
        assert all(isinstance(variant[key], int) for key in COUNTS), name
    assert case["variants"]["a"]["ratio_to_a"] == 1.0


def test_step_time_counts_forward_passes(step_time):
    for case in _cases(step_time):
        _check_forward_passes(case["variants"])


def _check_forward_passes(variants):
    for name, variant in variants.items():
        if variant["available"]:
            double = name == "c"  # FeatureDistillation runs the student again
            assert variant["student_forwards_executed"] == 1 + double, name
            assert variant["student_forwards_traced"] == 1 + double, name
            teacher = 0 if name in ("a", "e") else 1
            assert variant["teacher_forwards_executed"] == teacher, name
    trainable = {v["trainable_variables"] for v in variants.values() if v["available"]}
    assert len(trainable) == 1  # every variant trains the whole student


def test_step_time_targets_and_gram_cost(step_time):
    for case in _cases(step_time):
        _check_targets(case)


def _check_targets(case):
    assert len(case["targets"]) == 3
    for target in case["targets"]:
        assert target["ratio"] is None or _positive(target["ratio"])
        assert target["met"] in (True, False, None)
    assert all(_positive(cost["ratio"]) for cost in case["gram_cost"].values())
    # A difference of two timings (Gram loss minus a trivial loss): at the quick
    # sizes it is within timing noise and may come out negative under load.
    assert math.isfinite(case["gram_term_alone_ms"])


def test_scaling_reports_every_point(tmp_path):
    data = _run("scaling.py", tmp_path)
    points = data["points"]
    assert [p["axis"] for p in points] == ["middle", "M"]
    assert [p["M"] for p in points] == [2, 4]
    for point in points:
        assert point["batch_M2_d"] == point["batch"] * point["M"] ** 2 * point["d"]
        for key in ("kd_gram_step_ms", "kd_only_step_ms"):
            assert _positive(point[key]), key
        assert math.isfinite(point["gram_term_alone_ms"])  # a difference of timings
        assert _positive(point["peak_rss_mib"])
        assert point["peak_rss_over_build_mib"] >= 0
        assert point["student_forwards_executed"] == 1


def test_gram_ops_compares_both_forms(tmp_path):
    data = _run("gram_ops.py", tmp_path)
    (point,) = data["points"]
    assert (point["batch"], point["M"], point["d"]) == (16, 3, 8)
    assert _positive(point["textbook_ms"]) and _positive(point["library_ms"])
    assert point["ratio"] == pytest.approx(point["library_ms"] / point["textbook_ms"])
    assert point["value_difference"] < 1e-6  # the two forms agree


def test_shard_read_compares_storages_pipelines_fit_and_memory(tmp_path):
    data = _run("shard_read.py", tmp_path)
    backend = data["machine"]["backend"]
    rates = data["reads"]["rows_per_s"]
    pipes = {"pydataset"} | {
        "tensorflow": {"tf_data"},
        "torch": {"torch_dataloader"},
    }.get(backend, set())
    storages = {"npy_mmap", "npz_shard", "array_record", "in_memory"}
    assert set(rates) == storages | ({"tfrecord"} if backend == "tensorflow" else set())
    for storage in storages:
        assert set(rates[storage]) == pipes
    assert all(_positive(r) for by_pipe in rates.values() for r in by_pipe.values())
    assert data["reads"]["settings"]["cache_mib"] == pytest.approx(
        2048 * 100 * 4 / 2**20
    )
    assert set(data["fit"]) == {"synthetic", "demo", "teacher-sized"}
    for case in data["fit"].values():
        epochs = case["median_epoch_s"]
        assert case["ratio"] == pytest.approx(epochs["sharded"] / epochs["in_memory"])
        assert case["ratio_read_ahead"] == pytest.approx(
            epochs["sharded_read_ahead"] / epochs["in_memory"]
        )
        if backend == "tensorflow":  # ShardedTeacherCache.tf_dataset
            assert case["ratio_tf_data"] == pytest.approx(
                epochs["sharded_tf_data"] / epochs["in_memory"]
            )
        else:
            assert "sharded_tf_data" not in epochs
    memory = data["memory"]
    assert [(p["scale"], p["storage"]) for p in memory] == [
        (1, "in_memory"),
        (1, "sharded"),
        (4, "in_memory"),
        (4, "sharded"),
    ]
    for point in memory:
        assert point["targets_mib"] == pytest.approx(point["samples"] * 100 * 4 / 2**20)
    # the in-memory cache holds every target; the sharded one none
    assert [p["in_memory_cache_mib"] > 0 for p in memory] == [True, False] * 2


def test_step_ops_counts_the_guard(tmp_path):
    """benchmarks/step_ops.py: the unchecked step dispatches fewer operations
    than the guarded one, and both more than the student alone."""
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    out = tmp_path / "step_ops.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "step_ops.py"), "--backend", backend]
        + ["--variants", "a,e,e_unchecked", "--views", "pix,fou", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    variants = json.loads(out.read_text())["variants"]
    totals = {name: variants[name]["total"] for name in ("a", "e", "e_unchecked")}
    assert totals["a"] < totals["e_unchecked"] < totals["e"], totals
    for variant in variants.values():
        assert variant["total"] == sum(variant["pieces"].values())
    if backend == "torch":  # each operation attributed to where it came from
        assert {"backward", "optimizer"} <= set(variants["e"]["pieces"])
        assert any(p.startswith("bad_samples.py") for p in variants["e"]["pieces"])
        assert not any(
            p.startswith("bad_samples.py") for p in variants["e_unchecked"]["pieces"]
        )


def test_gpu_script_dry_run(tmp_path):
    """benchmarks/gpu.sh --dry-run: the GPU pipeline on the CPU at tiny sizes."""
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu.sh"), "--dry-run", "--backends", backend]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    step = json.loads((tmp_path / f"step_time-{backend}.json").read_text())
    case = step["jit_compile"]["false"]["cases"]["demo"]
    assert list(case["variants"]) == ["a", "d", "e"]
    assert all(_positive(v["median_step_ms"]) for v in case["variants"].values())
    scaling = json.loads((tmp_path / f"scaling-{backend}.json").read_text())
    assert [p["axis"] for p in scaling["points"]] == ["middle"]
    assert _positive(scaling["points"][0]["kd_gram_step_ms"])
