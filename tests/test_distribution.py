"""Data-parallel training: 2 CPU devices give the single-device numbers.

Each test runs tests/scripts/distribution_child.py in a child process, since
the device count must be set before the backend initialises: JAX with
`keras.distribution.DataParallel` over 2 virtual CPU devices, TensorFlow with
`tf.distribute.MirroredStrategy` over 2 logical CPU devices, and PyTorch,
which has no Keras distribution API, with a plain `DistributedDataParallel`
step in 2 processes. Across processes: JAX with `keras.distribution.initialize`
in 2 processes streaming the sharded teacher cache, and TensorFlow's
`MultiWorkerMirroredStrategy`, which Keras 3 cannot train under, refused.
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
    and DataParallel, each streaming its own shard of the sharded teacher cache
    (KD and the Gram term): the losses and the student's weights after one step
    are within 1e-5 of one process on the whole batch."""
    from keras_gramkd.cache import ShardedTeacherCache

    child = _import_child()
    distiller = child.build()
    x, y = child.data()
    folder = str(tmp_path / "cache")
    ShardedTeacherCache.write(distiller, x, folder, shard_size=child.BATCH // 2)
    before = child.student_weights(distiller)
    single = distiller.fit(  # one step on the whole batch, with the live teacher
        x, y, batch_size=child.BATCH, shuffle=False, verbose=0
    ).history

    out = tmp_path / "processes.json"
    (port,) = _free_ports(1)
    args = [["--jax-process", str(i), str(port), folder, str(out)] for i in range(2)]
    env = {k: v for k, v in _env().items() if k != "XLA_FLAGS"}  # one CPU each
    result = _run_group(tmp_path, args, env, out)
    assert len(result["devices"]) == 2 and len(result["local"]) == 1
    assert set(result["fit"]) >= {"loss", "task_loss", "kd_loss", "gram_loss"}
    for name, values in single.items():
        assert abs(result["fit"][name] - values[0]) <= TOLERANCE, name
    after = child.student_weights(distiller)
    assert _max_difference(after, before) > 1e-3
    assert _max_difference(result["weights"], after) <= TOLERANCE


def _import_child():
    sys.path.insert(0, SCRIPTS)
    try:
        import distribution_child
    finally:
        sys.path.remove(SCRIPTS)
    return distribution_child


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


def _run_ddp_children(tmp_path, world=2):
    """Start `world` DDP children; wait for all, or kill all and say why."""
    out, rendezvous = tmp_path / "ddp.json", tmp_path / "rendezvous"
    args = [
        ["--ddp", str(rank), str(world), str(rendezvous), str(out)]
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

    distiller = child.build()
    x, y = child.data()
    before = child.student_weights(distiller)
    history = distiller.fit(
        x, y, batch_size=child.BATCH, epochs=1, shuffle=False, verbose=0
    )
    assert abs(result["loss"] - history.history["loss"][0]) <= TOLERANCE
    after = child.student_weights(distiller)
    assert _max_difference(after, before) > 1e-3
    assert _max_difference(result["weights"], after) <= TOLERANCE
