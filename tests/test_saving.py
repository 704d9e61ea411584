"""The private Keras names `keras_gramkd.saving` relies on still exist.

`AtomicBackupAndRestore` overrides and reads private attributes of
`keras.callbacks.BackupAndRestore` (no public API exists). A Keras release that
renames one fails here, naming it, before any resume test fails obscurely.
"""

import json

import keras
import numpy as np
import pytest

from keras_gramkd import saving


@pytest.mark.parametrize("name", sorted(saving.BACKUP_AND_RESTORE_PRIVATE_NAMES))
def test_backup_and_restore_still_has_the_private_name(tmp_path, name):
    callback = keras.callbacks.BackupAndRestore(tmp_path, double_checkpoint=True)
    assert hasattr(callback, name), (
        f"Keras {keras.__version__} renamed or removed "
        f"BackupAndRestore.{name} ({saving.BACKUP_AND_RESTORE_PRIVATE_NAMES[name]}); "
        "update the private-names section of keras_gramkd/saving.py."
    )


def test_backup_and_restore_paths_are_the_files_it_writes(tmp_path):
    callback = keras.callbacks.BackupAndRestore(tmp_path, double_checkpoint=True)
    assert callback._weights_path.endswith("latest.weights.h5")
    assert callback._prev_weights_path == callback._weights_path + ".bkp"
    assert callback._training_metadata_path.endswith("training_metadata.json")
    assert callback._prev_training_metadata_path.endswith(".json.bkp")
    assert (callback._current_epoch, callback._last_batch_seen) == (0, 0)


def test_keras_calls_the_overridden_save_and_resumes_from_it(tmp_path):
    """Keras' `fit` calls `_save_model`, and resumes from what the override wrote."""
    saves = []

    class Recording(saving.AtomicBackupAndRestore):
        def _save_model(self):
            saves.append((self._current_epoch, self._last_batch_seen))
            return super()._save_model()

    def model():
        keras.utils.set_random_seed(0)
        net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        net.compile("sgd", "mse")
        return net

    x, y = np.ones((8, 3), "float32"), np.zeros((8, 1), "float32")
    callback = Recording(tmp_path, delete_checkpoint=False)
    model().fit(x, y, epochs=2, callbacks=[callback], verbose=0)
    assert saves == [(1, 0), (2, 0)]
    metadata = json.loads((tmp_path / "training_metadata.json").read_text())
    assert metadata == {"epoch": 2, "batch": 0}
    history = model().fit(x, y, epochs=3, callbacks=[Recording(tmp_path)], verbose=0)
    assert len(history.history["loss"]) == 1  # epoch 3 only
