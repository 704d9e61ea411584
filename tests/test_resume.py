"""Resume without loss: BackupAndRestore, ModelCheckpoint, atomic saves.

The kill tests run real child processes (tests/scripts/) on the backend of the
suite and kill them with SIGKILL.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from helpers import make_data, make_net, modality_map, sparse_ce
from keras.src.saving import saving_lib

from keras_gramkd import Distiller
from keras_gramkd.saving import AtomicBackupAndRestore, stray_temporary_files

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
TIMEOUT = 240

pytestmark = [
    pytest.mark.slow,  # real child processes killed and resumed
    pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals"),
]


def _child_env():
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def _start(script, *args):
    return subprocess.Popen(
        [sys.executable, os.path.join(SCRIPTS, script), *map(str, args)],
        env=_child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(path, proc):
    """Waits until `proc` creates `path`; fails if it exits first."""
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(path):
        if proc.poll() is not None:
            pytest.fail(f"child exited ({proc.returncode}):\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"child did not write {path} in {TIMEOUT} s")
        time.sleep(0.1)


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _run(script, *args):
    proc = _start(script, *args)
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, out


def _events(workdir):
    with open(os.path.join(workdir, "events.jsonl")) as f:
        return [json.loads(line) for line in f]


def _npz(path):
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _child_module():
    spec = importlib.util.spec_from_file_location(
        "resume_child", os.path.join(SCRIPTS, "resume_child.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fit_killed_mid_epoch_resumes_from_last_backup(tmp_path):
    """SIGKILL in epoch 2 after batch 5; the rerun resumes from the batch-3 backup."""
    child = _child_module()
    workdir = tmp_path / "run"
    proc = _start("resume_child.py", workdir, "--block-at", 2, 5)
    try:
        _wait_for(workdir / "blocked", proc)
        with open(workdir / "backup" / "training_metadata.json") as f:
            assert json.load(f) == {"epoch": 2, "batch": 3}
        _kill(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = _events(workdir)
    assert [e["epoch"] for e in first if e["event"] == "epoch_end"] == [0, 1]
    assert sorted(os.listdir(workdir / "checkpoints")) == [
        "epoch01.keras",
        "epoch02.keras",
    ]

    _run("resume_child.py", workdir)
    second = [e for e in _events(workdir)[len(first) :]]
    assert second[0]["event"] == "train_begin"
    # Weights and optimizer state of the backup: 2 epochs + 4 batches of steps.
    backup_steps = 2 * child.STEPS + 4
    assert second[0]["iterations"] == backup_steps
    ended = [e["epoch"] for e in second if e["event"] == "epoch_end"]
    assert ended == list(range(2, child.EPOCHS))  # restarts the interrupted epoch
    done = second[-1]
    assert done["event"] == "done" and done["epochs"] == child.EPOCHS - 2
    # Keras replays epoch 2 from its first batch on the restored weights.
    assert done["iterations"] == backup_steps + (child.EPOCHS - 2) * child.STEPS
    assert not (workdir / "backup").exists()  # removed once fit completes
    assert sorted(os.listdir(workdir / "checkpoints")) == [
        f"epoch{e:02d}.keras" for e in range(1, child.EPOCHS + 1)
    ]
    assert stray_temporary_files(workdir / "checkpoints") == []

    before = _npz(workdir / "teacher_before.npz")
    after = _npz(workdir / "teacher_after.npz")
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)

    last = keras.saving.load_model(
        workdir / "checkpoints" / f"epoch{child.EPOCHS:02d}.keras"
    )
    assert isinstance(last, Distiller)
    for key, value in child.weights(last.teacher).items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    student = _npz(workdir / "student_after.npz")
    for key, value in child.weights(last.student).items():
        np.testing.assert_array_equal(value, student[key], err_msg=key)

    # An uninterrupted run ends after the same number of epochs.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    history = child.main(str(fresh))
    assert len(history.history["loss"]) == child.EPOCHS == 2 + len(ended)
    assert _events(fresh)[-1]["iterations"] == child.EPOCHS * child.STEPS


def test_kill_during_save_weights_keeps_the_previous_file(tmp_path):
    """SIGKILL while the new weights are half-written: the old file still loads."""
    proc = _start("save_child.py", tmp_path)
    try:
        _wait_for(tmp_path / "writing", proc)
        strays = stray_temporary_files(tmp_path)
        assert len(strays) == 1 and strays[0].endswith(".weights.h5")
        _kill(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    child = _child_module()
    distiller = Distiller(
        child.net("t", 8),
        child.net("s", 4),
        teacher_modalities={m: f"t_{m}" for m in child.WIDTHS},
        student_modalities={m: f"s_{m}" for m in child.WIDTHS},
    )
    distiller.load_weights(tmp_path / "model.weights.h5")
    good = _npz(tmp_path / "good.npz")
    assert len(good) == len(distiller.weights)
    for i, w in enumerate(distiller.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(w), good[str(i)])
    assert np.any(keras.ops.convert_to_numpy(distiller.student.weights[0]) != 0)


def _distiller():
    distiller = Distiller(
        make_net("t", 8), make_net("s", 4), modality_map("t"), modality_map("s")
    )
    distiller.compile(optimizer="adam", loss=sparse_ce())
    return distiller


def _values(model):
    return [keras.ops.convert_to_numpy(w) for w in model.weights]


def _failing_save_state(*args, **kwargs):
    raise RuntimeError("injected failure while writing")


@pytest.mark.parametrize("kind", ["weights", "model"])
def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch, kind):
    """An error mid-save leaves the old file intact, loadable, and no temp file."""
    distiller = _distiller()
    x, y = make_data(16)
    distiller.fit(x, y, epochs=1, verbose=0)
    good = _values(distiller)
    path = tmp_path / ("d.weights.h5" if kind == "weights" else "d.keras")
    save = distiller.save_weights if kind == "weights" else distiller.save
    save(path)
    distiller.fit(x, y, epochs=1, verbose=0)  # new weights, not saved
    monkeypatch.setattr(saving_lib, "_save_state", _failing_save_state)
    with pytest.raises(RuntimeError, match="injected"):
        save(path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == [path.name]
    if kind == "weights":
        restored = _distiller()
        restored.load_weights(path)
    else:
        restored = keras.saving.load_model(path)
    for value, expected in zip(_values(restored), good, strict=True):
        np.testing.assert_array_equal(value, expected)


def test_plain_keras_save_is_not_atomic(tmp_path, monkeypatch):
    """The control: keras.Model.save_weights truncates the file it replaces."""
    distiller = _distiller()
    path = tmp_path / "d.weights.h5"
    keras.Model.save_weights(distiller, path)
    size = os.path.getsize(path)
    monkeypatch.setattr(saving_lib, "_save_state", _failing_save_state)
    with pytest.raises(RuntimeError, match="injected"):
        keras.Model.save_weights(distiller, path)
    monkeypatch.undo()
    assert os.path.getsize(path) < size
    with pytest.raises(ValueError):
        _distiller().load_weights(path)


def test_atomic_saves_of_a_distiller_round_trip(tmp_path):
    """save/save_weights still write normal Keras files, and nothing else."""
    distiller = _distiller()
    distiller.save(tmp_path / "d.keras")
    distiller.save_weights(tmp_path / "d.weights.h5")
    assert sorted(os.listdir(tmp_path)) == ["d.keras", "d.weights.h5"]
    loaded = keras.saving.load_model(tmp_path / "d.keras")
    for value, expected in zip(_values(loaded), _values(distiller), strict=True):
        np.testing.assert_array_equal(value, expected)
    with pytest.raises(ValueError, match=".weights.h5"):
        distiller.save_weights(tmp_path / "d.h5")
    with pytest.raises(ValueError, match="extension"):
        distiller.save(tmp_path / "d.bin")


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("interrupted")


def _fit_interrupted(callback):
    distiller = _distiller()
    x, y = make_data(16)
    with pytest.raises(RuntimeError, match="interrupted"):
        distiller.fit(
            x, y, epochs=4, batch_size=8, callbacks=[callback, _Interrupt()], verbose=0
        )
    return distiller, x, y


@pytest.mark.parametrize(
    "callback_class", [keras.callbacks.BackupAndRestore, AtomicBackupAndRestore]
)
def test_backup_metadata_write_interrupted(tmp_path, monkeypatch, callback_class):
    """A failure while the epoch JSON is written: Keras' callback is left with
    an empty JSON it cannot resume from; AtomicBackupAndRestore keeps the old one.
    """
    backup = tmp_path / "backup"
    distiller, x, y = _fit_interrupted(callback_class(backup))
    metadata = backup / "training_metadata.json"
    assert json.loads(metadata.read_text()) == {"epoch": 2, "batch": 0}

    dumps = json.dumps

    def failing_dumps(obj, *args, **kwargs):
        if isinstance(obj, dict) and "epoch" in obj:
            raise KeyboardInterrupt  # as if killed while writing the JSON
        return dumps(obj, *args, **kwargs)

    callback = callback_class(backup)
    callback.set_model(distiller)
    monkeypatch.setattr(json, "dumps", failing_dumps)
    with pytest.raises(KeyboardInterrupt):
        callback._save_model()
    monkeypatch.undo()

    resumed = callback_class(backup)
    if callback_class is keras.callbacks.BackupAndRestore:
        assert metadata.read_text() == ""
        with pytest.raises(json.JSONDecodeError):
            _distiller().fit(
                x, y, epochs=4, batch_size=8, callbacks=[resumed], verbose=0
            )
        return
    assert json.loads(metadata.read_text()) == {"epoch": 2, "batch": 0}
    assert stray_temporary_files(backup) == []
    history = _distiller().fit(
        x, y, epochs=4, batch_size=8, callbacks=[resumed], verbose=0
    )
    assert len(history.history["loss"]) == 2  # epochs 2 and 3


def test_atomic_backup_and_restore_double_checkpoint(tmp_path):
    """With double_checkpoint, the previous state is kept as .bkp files."""
    backup = tmp_path / "backup"
    callback = AtomicBackupAndRestore(
        backup, save_freq=1, double_checkpoint=True, delete_checkpoint=False
    )
    distiller = _distiller()
    x, y = make_data(16)
    distiller.fit(x, y, epochs=2, batch_size=8, callbacks=[callback], verbose=0)
    assert sorted(os.listdir(backup)) == [
        "latest.weights.h5",
        "latest.weights.h5.bkp",
        "training_metadata.json",
        "training_metadata.json.bkp",
    ]
    assert json.loads((backup / "training_metadata.json").read_text()) == {
        "epoch": 1,
        "batch": 1,
    }
    previous = json.loads((backup / "training_metadata.json.bkp").read_text())
    assert previous == {"epoch": 1, "batch": 0}
