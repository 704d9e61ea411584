"""Child process for tests/test_distribution.py: data parallel against one device.

    python distribution_child.py OUT.json
    python distribution_child.py --ddp RANK WORLD RENDEZVOUS OUT.json [CACHE]
    python distribution_child.py --worker INDEX PORT,PORT OUT.json
    python distribution_child.py --worker-loop INDEX PORT,PORT CACHE OUT.json
    python distribution_child.py --jax-process INDEX PORT CACHE OUT.json

--ddp is for torch, --worker and --worker-loop for tensorflow, --jax-process
for jax.

On the backend of KERAS_BACKEND: `jax` (run with
XLA_FLAGS=--xla_force_host_platform_device_count=2) trains under
`keras.distribution.DataParallel`, `tensorflow` under
`tf.distribute.MirroredStrategy` over 2 logical CPU devices. From the same
initial weights, on one fixed batch of 32, it records `evaluate` and one
`fit` step on a single device and under the distribution, and the student's
weights after that step, and writes them to OUT.json.

The other modes run one process of a group of 2 (one CPU each, over
localhost). Those given CACHE, a sharded teacher cache of `data(STEPS *
BATCH)` in shards of BATCH // 2 rows, train STEPS steps from it: at step k,
process i reads shard 2k + i, so that the 2 processes together take the k-th
global batch of BATCH rows (`shard_batches`). Process 0 writes the results.

With --worker the child is one worker of a `MultiWorkerMirroredStrategy`
cluster (TF_CONFIG); worker 0 writes the errors of `fit` and `evaluate`, for
the Distiller and for a plain `keras.Model`. With --worker-loop it trains
instead in a custom loop under that strategy (`worker_loop`), which Keras'
own `fit` cannot do.

With --jax-process the child is one of 2 JAX processes (gloo collectives)
under `keras.distribution.initialize`, training with `fit`.

`torch` has no Keras distribution API; with --ddp the child is one process
of a PyTorch DistributedDataParallel group (gloo, CPU) that takes plain torch
training steps: one on its share of the batch of 32, or with CACHE STEPS
steps on its shards; rank 0 writes each step's loss averaged over the group
and the student's weights after the last step. The group meets through
RENDEZVOUS, a file that does not exist yet (a `file://` rendezvous: no port
to pick, so none to race for), talks over the loopback interface
(GLOO_SOCKET_IFNAME=lo), and gives up after DDP_TIMEOUT seconds instead of
gloo's default 30 minutes.

SIGUSR1 dumps every thread's Python stack to stderr (the test sends it to a
child that overruns, before killing it). Every multi-process child ends with
os._exit(0) once its output is flushed: nothing is left to check, and the
collectives' threads are a hazard in interpreter finalisation.

Teardown order matters for DDP. DDP's C++ Reducer holds the process group,
and the Reducer's Python binding frees it with the GIL held. Left to be freed
when ddp_train returns, after destroy_process_group(), the Reducer is the
group's last owner, so ~ProcessGroupGloo joins gloo's worker threads with the
GIL held, while a worker may still need the GIL to free a finished all-reduce
(its work holds a Python object backward() put in thread-local state): an
occasional deadlock, likelier under load. So `model` goes first and
destroy_process_group() frees the group, with the GIL released.
"""

import faulthandler
import json
import os
import signal
import sys

if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)

BACKEND = os.environ.get("KERAS_BACKEND")
# One process of a multi-worker group: one CPU device, not two. Imported by a
# test (for its helpers) nothing is configured: TensorFlow's devices cannot
# change once a test before it has run an operation.
WORKER = sys.argv[1:2] in (["--worker"], ["--worker-loop"])
if BACKEND == "tensorflow" and not WORKER and __name__ == "__main__":
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
STEPS = 3  # steps of the runs from the sharded cache, one global batch each
PROCESSES = 2  # in every multi-process group
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


def data(rows=BATCH):
    rng = np.random.default_rng(0)
    x = {m: rng.normal(size=(rows, d)).astype("float32") for m, d in WIDTHS.items()}
    return x, rng.integers(0, 3, size=rows).astype("int32")


def shard_batches(cache_dir, distiller, index):
    """Process `index`'s batches of the sharded cache in `cache_dir`: at step
    k, shard PROCESSES * k + index, its BATCH // PROCESSES rows of the k-th
    global batch (a `keras.utils.PyDataset` of (x with targets, y))."""
    from keras_gramkd.cache import ShardedTeacherCache

    x, y = data(STEPS * BATCH)
    return ShardedTeacherCache.open(cache_dir).dataset(
        x,
        y,
        batch_size=BATCH // PROCESSES,
        shuffle=False,
        distiller=distiller,
        shards=[PROCESSES * step + index for step in range(STEPS)],
    )


def student_weights(distiller):
    return [
        keras.ops.convert_to_numpy(w).ravel().tolist()
        for w in distiller.student.weights
    ]


def write(out, result):
    with open(out, "w") as f:
        json.dump(result, f)


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


def ddp_train(rank, world, rendezvous, out, cache_dir=None):
    """DistributedDataParallel steps: one on this rank's slice of the batch
    of `data()`, or with `cache_dir` STEPS steps on this rank's shards."""
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
    initial = student_weights(distiller)
    if cache_dir is None:
        x, y = data()
        share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        batches = [({k: v[share] for k, v in x.items()}, y[share])]
    else:
        assert world == PROCESSES, world
        batches = shard_batches(cache_dir, distiller, rank)
    model = torch.nn.parallel.DistributedDataParallel(distiller)
    trainable = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)  # as build()'s Keras SGD
    losses = []
    for step in range(len(batches)):
        x, y = batches[step]
        x = {k: torch.as_tensor(v) for k, v in x.items()}
        y = torch.as_tensor(y)
        y_pred = model(x, training=True)
        loss = distiller.compute_loss(x, y, y_pred, training=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses.append(float(mean_loss / world))
    if rank == 0:
        weights = student_weights(distiller)
        write(out, {"losses": losses, "initial": initial, "weights": weights})
    del model  # the Reducer first, so it is not the group's last owner
    dist.destroy_process_group()


def multi_worker_strategy(index, ports):
    """This process as worker `index` of a `MultiWorkerMirroredStrategy`
    cluster of one worker per port on localhost (one CPU each)."""
    import tensorflow as tf

    workers = [f"localhost:{port}" for port in ports]
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    )
    return tf.distribute.MultiWorkerMirroredStrategy()


def worker_step(index, ports, out):
    """The errors of `fit` and `evaluate` under `MultiWorkerMirroredStrategy`,
    of the Distiller and of a plain `keras.Model`, which Keras 3 cannot run
    under this strategy either."""
    strategy = multi_worker_strategy(index, ports)
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
        write(out, {"replicas": strategy.num_replicas_in_sync, "errors": errors})


def worker_loop(index, ports, cache_dir, out):
    """STEPS steps of a custom training loop under `MultiWorkerMirroredStrategy`,
    this worker (one replica) reading its own shards of the cache. The
    Distiller's `compute_loss` divides the loss by the replicas in sync and
    Keras' optimizer sums the replicas' gradients: the update is the global
    batch's."""
    import tensorflow as tf

    strategy = multi_worker_strategy(index, ports)
    with strategy.scope():
        distiller = build()  # its optimizer too, by compile
        distiller.optimizer.build(distiller.trainable_variables)
    initial = student_weights(distiller)
    batches = shard_batches(cache_dir, distiller, index)

    @tf.function(autograph=False)  # plain Python control flow, as on JAX
    def train_step(x, y):
        def step(x, y):
            with tf.GradientTape() as tape:
                y_pred = distiller(x, training=True)
                loss = distiller.compute_loss(x, y, y_pred, training=True)
            variables = distiller.trainable_variables
            distiller.optimizer.apply(tape.gradient(loss, variables), variables)
            return loss

        # The loss is divided by the replicas in sync: their sum is the mean.
        loss = strategy.run(step, args=(x, y))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)

    losses = []
    for step in range(len(batches)):
        x, y = batches[step]  # this worker's rows: its replica's share
        x, y = tf.nest.map_structure(tf.convert_to_tensor, (x, y))
        losses.append(float(train_step(x, y)))
    # Every worker reads the metrics: their variables are summed over the
    # workers on reading, a collective that needs them all.
    terms = {k: float(v) for k, v in distiller.step_metrics.result().items()}
    if index == 0:
        write(
            out,
            {
                "replicas": strategy.num_replicas_in_sync,
                "losses": losses,
                "terms": terms,
                "initial": initial,
                "weights": student_weights(distiller),
            },
        )


def jax_process_step(index, port, cache_dir, out):
    """This process as one of 2 JAX processes (one CPU each) under
    `keras.distribution.initialize` and `DataParallel`: `fit` for STEPS steps
    from the sharded teacher cache in `cache_dir`, reading its own shards."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(
        f"localhost:{port}", num_processes=PROCESSES, process_id=index
    )
    parallel = keras.distribution.DataParallel(devices=jax.devices())
    parallel.auto_shard_dataset = False  # each process reads its own shards
    keras.distribution.set_distribution(parallel)
    distiller = build()
    initial = student_weights(distiller)
    stream = shard_batches(cache_dir, distiller, index)
    history = distiller.fit(stream, epochs=1, shuffle=False, verbose=0)
    if index == 0:
        write(
            out,
            {
                "devices": [str(d) for d in jax.devices()],
                "local": [str(d) for d in jax.local_devices()],
                "steps": len(stream),
                "initial": initial,
                "fit": {k: float(v[0]) for k, v in history.history.items()},
                "weights": student_weights(distiller),
            },
        )
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
    write(out, result)


def _ports(text):
    return [int(port) for port in text.split(",")]


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "--worker":
        worker_step(int(args[0]), _ports(args[1]), args[2])
    elif mode == "--worker-loop":
        worker_loop(int(args[0]), _ports(args[1]), *args[2:4])
    elif mode == "--jax-process":
        jax_process_step(int(args[0]), int(args[1]), *args[2:4])
    elif mode == "--ddp":
        ddp_train(int(args[0]), int(args[1]), *args[2:5])
    else:
        main(mode)
        sys.exit(0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip finalisation (see the docstring)
