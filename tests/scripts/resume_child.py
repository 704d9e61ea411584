"""Child process for tests/test_resume.py: a Distiller fit that can be killed.

    python resume_child.py WORKDIR [--block-at EPOCH BATCH]

Trains a small Distiller for `EPOCHS` epochs of `STEPS` batches with
`keras.callbacks.BackupAndRestore(save_freq=SAVE_FREQ)` and a per-epoch
`keras.callbacks.ModelCheckpoint`. The teacher is built once and saved to
WORKDIR/teacher.keras; every run loads it from there. Events go to
WORKDIR/events.jsonl, one JSON object a line. With --block-at, after that
batch (and the backup it triggers) the child writes WORKDIR/blocked and waits
to be killed. Uses the backend of KERAS_BACKEND.
"""

import argparse
import json
import os
import sys
import time

import keras
import numpy as np

from keras_gramkd import Distiller
from keras_gramkd.saving import atomic_save

EPOCHS, STEPS, BATCH, SAVE_FREQ = 4, 8, 8, 4
WIDTHS = {"a": 4, "b": 6}


def net(prefix, width):
    inputs = {m: keras.Input((d,), name=m) for m, d in WIDTHS.items()}
    embeds = [
        keras.layers.Dense(width, activation="tanh", name=f"{prefix}_{m}")(inputs[m])
        for m in WIDTHS
    ]
    h = keras.layers.Concatenate()(embeds)
    logits = keras.layers.Dense(3, name=f"{prefix}_logits")(h)
    return keras.Model(inputs, logits, name=f"{prefix}_net")


def data():
    rng = np.random.default_rng(0)
    n = STEPS * BATCH
    x = {m: rng.normal(size=(n, d)).astype("float32") for m, d in WIDTHS.items()}
    return x, rng.integers(0, 3, size=n).astype("int32")


def weights(model):
    return {
        f"{i}:{w.path}": keras.ops.convert_to_numpy(w)
        for i, w in enumerate(model.weights)
    }


def save_npz(path, arrays):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_save(path, write)


class Events(keras.callbacks.Callback):
    """Logs the run to events.jsonl; blocks after one batch if asked."""

    def __init__(self, workdir, block_at):
        super().__init__()
        self.workdir, self.block_at = workdir, block_at
        self.epoch = None

    def log(self, **event):
        with open(os.path.join(self.workdir, "events.jsonl"), "a") as f:
            f.write(json.dumps({"pid": os.getpid(), **event}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def on_train_begin(self, logs=None):
        iterations = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.log(event="train_begin", iterations=iterations)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.log(event="epoch_begin", epoch=epoch)

    def on_epoch_end(self, epoch, logs=None):
        self.log(event="epoch_end", epoch=epoch, loss=float(logs["loss"]))

    def on_train_batch_end(self, batch, logs=None):
        if self.block_at == (self.epoch, batch):
            self.log(event="blocked", epoch=self.epoch, batch=batch)
            open(os.path.join(self.workdir, "blocked"), "w").close()
            parent = os.getppid()
            while os.getppid() == parent:  # until killed, or orphaned
                time.sleep(0.05)
            os._exit(1)


def main(workdir, block_at=None):
    teacher_path = os.path.join(workdir, "teacher.keras")
    if not os.path.exists(teacher_path):
        keras.utils.set_random_seed(1)
        teacher = net("t", 8)
        teacher.save(teacher_path + ".tmp.keras")
        os.replace(teacher_path + ".tmp.keras", teacher_path)
        save_npz(os.path.join(workdir, "teacher_before.npz"), weights(teacher))
    teacher = keras.saving.load_model(teacher_path)
    keras.utils.set_random_seed(2)
    distiller = Distiller(
        teacher,
        net("s", 4),
        teacher_modalities={m: f"t_{m}" for m in WIDTHS},
        student_modalities={m: f"s_{m}" for m in WIDTHS},
    )
    distiller.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # XLA compilation on CPU costs more than it saves on these tiny models.
        jit_compile=False if keras.backend.backend() == "tensorflow" else "auto",
    )
    events = Events(workdir, block_at)
    x, y = data()
    history = distiller.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=EPOCHS,
        verbose=0,
        callbacks=[
            keras.callbacks.BackupAndRestore(
                os.path.join(workdir, "backup"), save_freq=SAVE_FREQ
            ),
            keras.callbacks.ModelCheckpoint(
                os.path.join(workdir, "checkpoints", "epoch{epoch:02d}.keras")
            ),
            events,
        ],
    )
    iterations = int(keras.ops.convert_to_numpy(distiller.optimizer.iterations))
    events.log(event="done", epochs=len(history.history["loss"]), iterations=iterations)
    save_npz(os.path.join(workdir, "teacher_after.npz"), weights(distiller.teacher))
    save_npz(os.path.join(workdir, "student_after.npz"), weights(distiller.student))
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--block-at", nargs=2, type=int, metavar=("EPOCH", "BATCH"))
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    main(args.workdir, tuple(args.block_at) if args.block_at else None)
    sys.exit(0)
