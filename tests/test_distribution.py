"""Data-parallel training: 2 CPU devices or 2 processes give the single-device numbers.

Each test runs tests/scripts/distribution_child.py in child processes, since
the device count must be set before the backend initialises: JAX with
`keras.distribution.DataParallel` over 2 virtual CPU devices, TensorFlow with
`tf.distribute.MirroredStrategy` over 2 logical CPU devices, and PyTorch,
which has no Keras distribution API, with a plain `DistributedDataParallel`
step in 2 processes. Across processes (one CPU each, over localhost), each
process streaming its own shards of the sharded teacher cache for 3 steps:
JAX with `keras.distribution.initialize` and `fit`, PyTorch with a DDP loop,
and TensorFlow with a custom loop under `MultiWorkerMirroredStrategy`, whose
`fit` and `evaluate` Keras 3 cannot run (refused).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # multi-device and multi-process training

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
CHILD = os.path.join(SCRIPTS, "distribution_child.py")
TOLERANCE = 1e-5
TIMEOUT = 300
DDP_WAIT = 180  # s for a group of children, imports included; gloo gives up at 60
BACKEND = keras.backend.backend()


def _env():
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="3")
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=2".strip()
    return env


def _run_child(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, CHILD, str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def _max_difference(a, b):
    assert len(a) == len(b)
    return max(np.abs(np.subtract(x, y)).max() for x, y in zip(a, b, strict=True))


def _check(result):
    assert len(result["devices"]) == 2
    single, distributed = result["single"], result["distributed"]
    for kind in ("evaluate", "fit"):
        assert set(single[kind]) >= {"loss", "task_loss", "kd_loss", "gram_loss"}
        assert single[kind].keys() == distributed[kind].keys()
        for name, value in single[kind].items():
            other = distributed[kind][name]
            assert abs(other - value) <= TOLERANCE, f"{kind} {name}: {other} != {value}"
    assert _max_difference(single["initial"], distributed["initial"]) == 0
    assert _max_difference(single["weights"], single["initial"]) > 1e-3
    assert _max_difference(distributed["weights"], single["weights"]) <= TOLERANCE


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution.DataParallel: JAX")
def test_jax_data_parallel_matches_single_device(tmp_path):
    """Loss, terms and updated weights within 1e-5 of one device."""
    result = _run_child(tmp_path)
    assert result["devices"] == ["cpu:0", "cpu:1"]
    _check(result)


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution.initialize: JAX")
def test_two_jax_processes_match_single_device_from_the_sharded_cache(tmp_path):
    """Two JAX processes (one CPU each, gloo) under keras.distribution.initialize
    and DataParallel, each streaming its own shards of the sharded teacher
    cache (KD and the Gram term) to `fit`: every loss of the history (the mean
    over 3 steps) and the student's weights after the 3 steps are within 1e-5
    of one process's `fit` on the whole batches."""
    child = _import_child()
    folder, reference = _sharded_reference(child, tmp_path)
    out = tmp_path / "processes.json"
    (port,) = _free_ports(1)
    args = [["--jax-process", str(i), str(port), folder, str(out)] for i in range(2)]
    env = {k: v for k, v in _env().items() if k != "XLA_FLAGS"}  # one CPU each
    result = _run_group(tmp_path, args, env, out)
    assert len(result["devices"]) == 2 and len(result["local"]) == 1
    assert result["steps"] == child.STEPS
    history = reference["history"]
    assert set(history) >= {"loss", "task_loss", "kd_loss", "gram_loss"}
    assert result["fit"].keys() == history.keys()
    losses = {name: abs(result["fit"][name] - history[name]) for name in history}
    _check_against(reference, result, losses)


def _import_child():
    sys.path.insert(0, SCRIPTS)
    try:
        import distribution_child
    finally:
        sys.path.remove(SCRIPTS)
    return distribution_child


def _single_process_fit(child, x, y):
    """One process's one-epoch `fit` on `x`, `y` in batches of `child.BATCH`
    with the live teacher: the Distiller, and its history (each value the
    mean over the steps) and the student's weights before and after."""
    distiller = child.build()
    before = child.student_weights(distiller)
    history = distiller.fit(
        x, y, batch_size=child.BATCH, shuffle=False, verbose=0
    ).history
    after = child.student_weights(distiller)
    assert _max_difference(after, before) > 1e-3
    return distiller, {
        "history": {name: values[0] for name, values in history.items()},
        "initial": before,
        "weights": after,
    }


def _sharded_reference(child, tmp_path):
    """The sharded cache of the multi-process tests (`child.STEPS` global
    batches of `child.BATCH` rows, in shards of a process's share of one),
    and `_single_process_fit` over the same rows."""
    from keras_gramkd.cache import ShardedTeacherCache

    x, y = child.data(child.STEPS * child.BATCH)
    distiller, reference = _single_process_fit(child, x, y)
    folder = str(tmp_path / "cache")
    shard_size = child.BATCH // child.PROCESSES
    ShardedTeacherCache.write(distiller, x, folder, shard_size=shard_size)
    return folder, reference


def _check_against(reference, result, losses):
    """The processes' `result` against one process's `reference`, from the
    same initial weights; `losses`: name -> absolute difference of a loss.
    Prints the largest differences (the guide records them)."""
    assert _max_difference(result["initial"], reference["initial"]) == 0
    weights = _max_difference(result["weights"], reference["weights"])
    found = ", ".join(f"{name} {value:.1e}" for name, value in losses.items())
    print(f"max |difference|: {found}, weights {weights:.1e}")
    for name, difference in losses.items():
        assert difference <= TOLERANCE, f"{name}: {difference}"
    assert weights <= TOLERANCE


@pytest.mark.skipif(
    BACKEND != "tensorflow", reason="tf.distribute.MirroredStrategy: TensorFlow"
)
def test_tf_mirrored_strategy_matches_single_device(tmp_path):
    """Loss, terms and updated weights within 1e-5 of one device.

    Needs every term, and the student's regularisation loss, scaled by the
    replica count the way Keras scales its own losses (see
    docs/guide/precision-resume-devices.md).
    """
    result = _run_child(tmp_path)
    assert [d.rsplit(":", 2)[-2:] for d in result["devices"]] == [
        ["CPU", "0"],
        ["CPU", "1"],
    ]
    _check(result)


@pytest.mark.skipif(
    BACKEND != "tensorflow", reason="tf.distribute.MultiWorkerMirroredStrategy"
)
def test_tf_multi_worker_strategy_is_refused_as_keras_fails_under_it(tmp_path):
    """Two worker processes on localhost: Keras 3's own fit and evaluate fail
    under MultiWorkerMirroredStrategy for a plain keras.Model
    (keras-team/keras#20585), and the Distiller says so in its own error.
    When Keras fixes it, the plain model's check fails: lift the refusal."""
    from keras_gramkd.replicas import MULTI_WORKER_MESSAGE

    out = tmp_path / "workers.json"
    ports = ",".join(map(str, _free_ports(2)))
    args = [["--worker", str(index), ports, str(out)] for index in range(2)]
    result = _run_group(tmp_path, args, _env(), out)
    assert result["replicas"] == 2
    errors = result["errors"]
    for method in ("fit", "evaluate"):
        assert errors[f"distiller_{method}"] == MULTI_WORKER_MESSAGE
        plain = errors[f"plain_{method}"]
        assert plain is not None, f"Keras now runs {method} under the strategy"
        assert (
            plain.startswith("Attempt to convert a value (") and "PerReplica" in plain
        )


@pytest.mark.skipif(
    BACKEND != "tensorflow", reason="tf.distribute.MultiWorkerMirroredStrategy"
)
def test_tf_multi_worker_custom_loop_matches_single_device(tmp_path):
    """Two worker processes on localhost: a custom training loop under
    MultiWorkerMirroredStrategy (the Distiller's call and compute_loss in
    strategy.run, Keras' optimizer's apply), each worker feeding its own
    shards of the sharded cache for 3 steps: the losses and the student's
    weights are within 1e-5 of one process's `fit` on the whole batches."""
    child = _import_child()
    folder, reference = _sharded_reference(child, tmp_path)
    out = tmp_path / "workers.json"
    ports = ",".join(map(str, _free_ports(2)))
    args = [["--worker-loop", str(i), ports, folder, str(out)] for i in range(2)]
    result = _run_group(tmp_path, args, _env(), out)
    assert result["replicas"] == 2
    assert len(result["losses"]) == child.STEPS
    history = reference["history"]
    losses = {"loss": abs(np.mean(result["losses"]) - history["loss"])}
    for name in ("task_loss", "kd_loss", "gram_loss"):  # the workers' metrics
        losses[name] = abs(result["terms"][name] - history[name])
    _check_against(reference, result, losses)


@pytest.mark.skipif(BACKEND != "torch", reason="Keras' distribution API on torch")
def test_torch_has_no_keras_distribution_api():
    """Keras' torch backend has no distribution backend: say so, loudly."""
    from keras.src import backend

    assert backend.distribution_lib is None
    with pytest.raises(AttributeError):
        keras.distribution.list_devices()


def _ddp_env():
    # gloo over loopback only: with no interface named, gloo picks the one
    # the hostname resolves to, which on some hosts is not reachable.
    return dict(_env(), GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")


def _run_ddp_children(tmp_path, cache=None, world=2):
    """Start `world` DDP children (training from `cache` if given); wait for
    all, or kill all and say why."""
    out, rendezvous = tmp_path / "ddp.json", tmp_path / "rendezvous"
    args = [
        ["--ddp", str(rank), str(world), str(rendezvous), str(out)]
        + ([cache] if cache else [])
        for rank in range(world)
    ]
    return _run_group(tmp_path, args, _ddp_env(), out)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _run_group(tmp_path, args, env, out):
    """Start one child per list of `args`; wait for all, or kill all and say why."""
    world = len(args)
    logs = [tmp_path / f"rank{rank}.log" for rank in range(world)]
    procs = []
    for rank, log in enumerate(logs):
        with open(log, "w") as f:  # a file, not a pipe: no child blocks on it
            procs.append(
                subprocess.Popen(
                    [sys.executable, CHILD, *args[rank]],
                    env=env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            )
    start = time.monotonic()
    try:
        while time.monotonic() - start < DDP_WAIT:
            codes = [p.poll() for p in procs]
            if None not in codes or any(c not in (None, 0) for c in codes):
                break  # all done, or one failed: the others would only wait
            time.sleep(0.1)
    finally:
        hung = [p for p in procs if p.poll() is None]
        for p in hung:
            p.send_signal(signal.SIGUSR1)  # the child dumps its threads' stacks
        time.sleep(2 if hung else 0)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    elapsed, codes = time.monotonic() - start, [p.returncode for p in procs]
    report = [f"Children: exit codes {codes} after {elapsed:.0f} s"]
    report += [f"--- rank {r} ---\n{log.read_text()}" for r, log in enumerate(logs)]
    assert codes == [0] * world, "\n".join(report)
    return json.loads(out.read_text())


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch DistributedDataParallel")
def test_torch_ddp_step_matches_single_device(tmp_path):
    """A plain DDP step in 2 processes matches a single-device Keras fit step."""
    child = _import_child()
    result = _run_ddp_children(tmp_path)
    _, reference = _single_process_fit(child, *child.data())
    assert len(result["losses"]) == 1
    loss = abs(result["losses"][0] - reference["history"]["loss"])
    _check_against(reference, result, {"loss": loss})


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch DistributedDataParallel")
def test_torch_ddp_from_the_sharded_cache_matches_single_device(tmp_path):
    """The DDP loop in 2 processes, each rank streaming its own shards of the
    sharded teacher cache for 3 steps: the mean of the steps' losses (averaged
    over the ranks) and the student's weights are within 1e-5 of one
    process's `fit` on the whole batches."""
    child = _import_child()
    folder, reference = _sharded_reference(child, tmp_path)
    result = _run_ddp_children(tmp_path, cache=folder)
    assert len(result["losses"]) == child.STEPS
    loss = abs(np.mean(result["losses"]) - reference["history"]["loss"])
    _check_against(reference, result, {"loss": loss})
