"""Child process for tests/test_distribution.py: one batch, 1 vs 2 devices.

    python distribution_child.py OUT.json
    python distribution_child.py --ddp RANK WORLD RENDEZVOUS OUT.json   (torch)
    python distribution_child.py --worker INDEX PORT,PORT OUT.json   (tensorflow)
    python distribution_child.py --jax-process INDEX PORT CACHE OUT.json   (jax)

On the backend of KERAS_BACKEND: `jax` (run with
XLA_FLAGS=--xla_force_host_platform_device_count=2) trains under
`keras.distribution.DataParallel`, `tensorflow` under
`tf.distribute.MirroredStrategy` over 2 logical CPU devices. From the same
initial weights, on one fixed batch of 32, it records `evaluate` and one
`fit` step on a single device and under the distribution, and the student's
weights after that step, and writes them to OUT.json.

With --worker the child is one worker of a `MultiWorkerMirroredStrategy`
cluster on localhost (TF_CONFIG, one CPU each); worker 0 writes the errors of
`fit` and `evaluate`, for the Distiller and for a plain `keras.Model`.

With --jax-process the child is one of 2 JAX processes (one CPU each, gloo
collectives) under `keras.distribution.initialize`; it trains one step from
the sharded teacher cache CACHE, reading its own shard.

`torch` has no Keras distribution API; with --ddp the child is one process
of a PyTorch DistributedDataParallel group (gloo, CPU) that takes one plain
torch training step on its share of the batch; rank 0 writes the loss
averaged over the group and the student's weights after the step. The group
meets through RENDEZVOUS, a file that does not exist yet (a `file://`
rendezvous: no port to pick, so none to race for), talks over the loopback
interface (GLOO_SOCKET_IFNAME=lo), and gives up after DDP_TIMEOUT seconds
instead of gloo's default 30 minutes. SIGUSR1 dumps every thread's Python
stack to stderr (the test sends it to a child that overruns, before killing it).

Teardown order matters. DDP's C++ Reducer holds the process group, and the
Reducer's Python binding frees it with the GIL held. Left to be freed when
ddp_step returns, after destroy_process_group(), the Reducer is the group's
last owner, so ~ProcessGroupGloo joins gloo's worker threads with the GIL
held, while a worker may still need the GIL to free a finished all-reduce
(its work holds a Python object backward() put in thread-local state): an
occasional deadlock, likelier under load. So `model` goes first and
destroy_process_group() frees the group, with the GIL released. The child
then ends with os._exit(0): nothing is left to check, and gloo's threads
are a hazard in interpreter finalisation too.
"""

import faulthandler
import json
import os
import signal
import sys

if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)

BACKEND = os.environ.get("KERAS_BACKEND")
WORKER = sys.argv[1:2] == ["--worker"]  # one process of a multi-worker group
if BACKEND == "tensorflow" and not WORKER:
    import tensorflow as tf

    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_gramkd import Distiller  # noqa: E402

WIDTHS = {"a": 4, "b": 6, "c": 5}
BATCH = 32
DDP_TIMEOUT = 60  # seconds, for the rendezvous and every collective


def net(prefix, width, regularizer=None):
    inputs = {m: keras.Input((d,), name=m) for m, d in WIDTHS.items()}
    embeds = [
        keras.layers.Dense(width, activation="tanh", name=f"{prefix}_{m}")(inputs[m])
        for m in WIDTHS
    ]
    h = keras.layers.Concatenate()(embeds)
    logits = keras.layers.Dense(
        3, kernel_regularizer=regularizer, name=f"{prefix}_logits"
    )(h)
    return keras.Model(inputs, logits, name=f"{prefix}_net")


def build():
    keras.utils.set_random_seed(0)
    distiller = Distiller(
        net("t", 8),
        net("s", 4, keras.regularizers.L2(0.1)),
        teacher_modalities={m: f"t_{m}" for m in WIDTHS},
        student_modalities={m: f"s_{m}" for m in WIDTHS},
    )
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False if BACKEND == "tensorflow" else "auto",
    )
    return distiller


def data():
    rng = np.random.default_rng(0)
    x = {m: rng.normal(size=(BATCH, d)).astype("float32") for m, d in WIDTHS.items()}
    return x, rng.integers(0, 3, size=BATCH).astype("int32")


def student_weights(distiller):
    return [
        keras.ops.convert_to_numpy(w).ravel().tolist()
        for w in distiller.student.weights
    ]


def run(distiller, initial):
    distiller.set_weights(initial)
    before = student_weights(distiller)
    x, y = data()
    evaluated = distiller.evaluate(x, y, batch_size=BATCH, verbose=0, return_dict=True)
    history = distiller.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return {
        "evaluate": {k: float(v) for k, v in evaluated.items()},
        "fit": {k: float(v[0]) for k, v in history.history.items()},
        "initial": before,
        "weights": student_weights(distiller),
    }


def distributed_build():
    if BACKEND == "jax":
        import jax

        devices = jax.devices()
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=devices)
        )
        return build(), [str(d) for d in devices]
    if BACKEND == "tensorflow":
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            distiller = build()
        assert distiller.distribute_strategy is strategy
        return distiller, list(strategy.extended.worker_devices)
    raise SystemExit(f"no data-parallel API for KERAS_BACKEND={BACKEND}")


def ddp_step(rank, world, rendezvous, out):
    """One DistributedDataParallel step on this rank's slice of the batch."""
    import datetime

    import torch
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.abspath(rendezvous)}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=DDP_TIMEOUT),
    )
    distiller = build()
    x, y = data()
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    x = {k: torch.as_tensor(v[share]) for k, v in x.items()}
    y = torch.as_tensor(y[share])
    model = torch.nn.parallel.DistributedDataParallel(distiller)
    trainable = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)  # as build()'s Keras SGD
    y_pred = model(x, training=True)
    loss = distiller.compute_loss(x, y, y_pred, training=True)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    if rank == 0:
        result = {
            "backend": BACKEND,
            "world": world,
            "loss": float(mean_loss),
            "weights": student_weights(distiller),
        }
        with open(out, "w") as f:
            json.dump(result, f)
    del model  # the Reducer first, so it is not the group's last owner
    dist.destroy_process_group()


def worker_step(index, ports, out):
    """This process as one of ``len(ports)`` workers of a
    `tf.distribute.MultiWorkerMirroredStrategy` cluster on localhost (one CPU
    each): the errors of `fit` and `evaluate` of the Distiller and of a plain
    `keras.Model`, which Keras 3 cannot run under this strategy either."""
    import tensorflow as tf

    workers = [f"localhost:{port}" for port in ports]
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    )
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        distiller = build()
        plain = net("p", 4)
        plain.compile(
            keras.optimizers.SGD(0.5),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
        )
    x, y = data()
    errors = {}
    for name, model in (("distiller", distiller), ("plain", plain)):
        for method in ("fit", "evaluate"):
            try:
                getattr(model, method)(x, y, batch_size=BATCH, verbose=0)
                errors[f"{name}_{method}"] = None
            except ValueError as error:
                errors[f"{name}_{method}"] = str(error)
    if index == 0:
        result = {"replicas": strategy.num_replicas_in_sync, "errors": errors}
        with open(out, "w") as f:
            json.dump(result, f)


def jax_process_step(index, port, cache_dir, out):
    """This process as one of 2 JAX processes (one CPU each) under
    `keras.distribution.initialize` and `DataParallel`: one `fit` step on the
    batch of 32, streamed from the sharded teacher cache in `cache_dir`, this
    process reading its own shard (its 16 rows of the batch)."""
    import jax

    from keras_gramkd.cache import ShardedTeacherCache

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(
        f"localhost:{port}", num_processes=2, process_id=index
    )
    parallel = keras.distribution.DataParallel(devices=jax.devices())
    parallel.auto_shard_dataset = False  # each process reads its own shard
    keras.distribution.set_distribution(parallel)
    distiller = build()
    x, y = data()
    stream = ShardedTeacherCache.open(cache_dir).dataset(
        x, y, batch_size=BATCH // 2, shuffle=False, distiller=distiller, shards=[index]
    )
    history = distiller.fit(stream, epochs=1, shuffle=False, verbose=0)
    if index == 0:
        result = {
            "devices": [str(d) for d in jax.devices()],
            "local": [str(d) for d in jax.local_devices()],
            "fit": {k: float(v[0]) for k, v in history.history.items()},
            "weights": student_weights(distiller),
        }
        with open(out, "w") as f:
            json.dump(result, f)
    # Every process leaves together: a process whose coordinator (process 0)
    # is gone aborts.
    jax.distributed.shutdown()


def main(out):
    single = build()
    initial = single.get_weights()
    result = {"backend": BACKEND, "single": run(single, initial)}
    distributed, devices = distributed_build()
    result["devices"] = devices
    result["distributed"] = run(distributed, initial)
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if WORKER:
        index, ports, out = sys.argv[2:5]
        worker_step(int(index), [int(p) for p in ports.split(",")], out)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skip finalisation: the collective's threads may linger
    elif sys.argv[1] == "--jax-process":
        index, port, cache_dir, out = sys.argv[2:6]
        jax_process_step(int(index), int(port), cache_dir, out)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skip finalisation: gloo's threads may linger
    elif sys.argv[1] == "--ddp":
        rank, world, rendezvous, out = sys.argv[2:6]
        ddp_step(int(rank), int(world), rendezvous, out)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skip finalisation (see the docstring)
    else:
        main(sys.argv[1])
