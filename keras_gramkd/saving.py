"""Atomic saving: a half-written file never replaces a good one; a corrupt
`.keras` file is named as such when read (`check_keras_archive`).

Keras writes `.keras` and `.weights.h5` files in place: `open(path, "wb")` or
`h5py.File(path, "w")` truncates the old file first, so a process killed (or
an exception raised) during the write leaves a truncated file where the last
good checkpoint was. `atomic_save` writes to a temporary file in the same
directory, flushes it to disk (`fsync`) and only then renames it over the
target with `os.replace`, which is atomic on POSIX and Windows: a reader sees
the old file or the new one, never a mix.

`Distiller.save` and `Distiller.save_weights` go through `atomic_save`, so
`keras.callbacks.ModelCheckpoint` and `keras.callbacks.BackupAndRestore` write
the Distiller's files atomically. `AtomicBackupAndRestore` also writes the
callback's small JSON of epoch and batch atomically, and its weights for any
model. It relies on private `BackupAndRestore` attributes (listed in
`BACKUP_AND_RESTORE_PRIVATE_NAMES`; no public API exists), kept in the last
section of this module; `keras_gramkd.replicas` holds the package's only other
reach inside Keras.

Example:

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
>>> def write(tmp):
...     with open(tmp, "w") as f:
...         f.write("good")
>>> atomic_save(path, write)
>>> def fail(tmp):
...     with open(tmp, "w") as f:
...         f.write("ha")
...     raise OSError("disk full")
>>> try:
...     atomic_save(path, fail)
... except OSError:
...     pass
>>> open(path).read(), sorted(os.listdir(os.path.dirname(path)))
('good', ['notes.txt'])
"""

import json
import os
import shutil
import uuid
import zipfile

import keras

# Keras checks file names by suffix, so the temporary file keeps the suffix.
_SUFFIXES = (".weights.h5", ".keras", ".hdf5", ".h5")
# The path prefixes keras.src.utils.file_utils.is_remote_path sends to gfile.
_REMOTE_PREFIXES = ("/cns", "/cfs", "/gcs", "/hdfs", "/readahead", "/placer", "/tfhub")
TEMP_MARKER = ".tmp-"
"""Part of every temporary file name, as in `.NAME.tmp-<pid>-<hex>SUFFIX`."""


def check_keras_archive(path):
    """Raises a clear error unless the local `.keras` file `path` is a zip
    archive, as Keras writes them (Keras reports a corrupt file as "File not
    found")."""
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a readable .keras file: it is not a zip archive "
            "(truncated or corrupt, or another format with a .keras name). "
            "Save the model again with model.save(path)."
        )


def is_local_file_path(filepath):
    """True for a str or os.PathLike local path (not a URL, GCS or HDFS path)."""
    if not isinstance(filepath, (str, os.PathLike)):
        return False
    path = os.fspath(filepath)
    if not isinstance(path, str) or "://" in path:
        return False
    return not path.startswith(_REMOTE_PREFIXES)


def can_save_atomically(filepath, overwrite=True, suffix=None):
    """Whether `atomic_save` applies to `filepath`.

    True for a local path (ending in `suffix`, a string or a tuple, if given)
    that may be written without asking: `overwrite`, or no file there yet.
    """
    if not is_local_file_path(filepath):
        return False
    path = os.fspath(filepath)
    if suffix is not None and not path.endswith(suffix):
        return False
    return bool(overwrite) or not os.path.exists(path)


def temporary_path(filepath):
    """A fresh hidden path next to `filepath`, with the same Keras suffix."""
    path = os.fspath(filepath)
    directory, name = os.path.split(os.path.abspath(path))
    suffix = next((s for s in _SUFFIXES if name.endswith(s)), "")
    stem = name[: len(name) - len(suffix)] if suffix else name
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return os.path.join(directory, f".{stem}{TEMP_MARKER}{token}{suffix}")


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_directory(directory):
    if os.name != "posix":  # Windows cannot open a directory for fsync
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(filepath, write):
    """Calls `write(tmp_path)`, then atomically moves `tmp_path` to `filepath`.

    `tmp_path` is in the directory of `filepath` (created if missing), so the
    final `os.replace` never crosses file systems. If `write` raises, the
    temporary file is removed, `filepath` is left as it was and the error
    propagates. A process killed during `write` leaves `filepath` intact and a
    stray `.NAME.tmp-*` file next to it (safe to delete).

    Args:
        filepath: local destination path.
        write: callable that writes the complete file at the path it is given.

    Returns:
        Whatever `write` returns.
    """
    path = os.path.abspath(os.fspath(filepath))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = temporary_path(path)
    try:
        result = write(tmp)
        if not os.path.isfile(tmp):
            raise OSError(
                f"Nothing was written to the temporary file {tmp!r} for {path!r}."
            )
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(directory)
    return result


def atomic_write_text(filepath, text):
    """Writes `text` to `filepath` atomically (UTF-8)."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_save(filepath, write)


def atomic_copy(source, destination):
    """Copies `source` over `destination` atomically."""
    atomic_save(destination, lambda tmp: shutil.copyfile(source, tmp))


def stray_temporary_files(directory):
    """The temporary files a killed save left in `directory` (sorted paths)."""
    return sorted(
        os.path.join(directory, name)
        for name in os.listdir(directory)
        if name.startswith(".") and TEMP_MARKER in name
    )


# ----------------------------------------------------------------------------
# Private Keras names: every private BackupAndRestore name used is in this section.
#
# `AtomicBackupAndRestore` must change how `keras.callbacks.BackupAndRestore`
# writes its files, and Keras offers no public way to: the callback takes no
# writer or file-system argument, its file paths and its epoch/batch counters are
# private attributes, and its one writing method is the private `_save_model`.
# Rewriting the callback instead would need the private `model._initial_epoch`
# to resume, so the subclass overrides `_save_model` and reads the names below.
# `tests/test_saving.py` fails, naming the attribute, if a Keras release renames
# one of them.

BACKUP_AND_RESTORE_PRIVATE_NAMES = {
    "_save_model": "the method Keras calls to write a backup (overridden)",
    "_weights_path": "path of latest.weights.h5",
    "_prev_weights_path": "path of latest.weights.h5.bkp (double_checkpoint)",
    "_training_metadata_path": "path of training_metadata.json",
    "_prev_training_metadata_path": "path of training_metadata.json.bkp",
    "_current_epoch": "the epoch written to the JSON",
    "_last_batch_seen": "the batch written to the JSON",
}
"""Private `BackupAndRestore` names `AtomicBackupAndRestore` relies on, and why."""


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` whose every file is written atomically.

    Keras' callback writes the weights with `model.save_weights` (atomic for a
    `Distiller`, in place for other models), then its `training_metadata.json`
    (epoch and batch) in place, and copies the `.bkp` files of
    `double_checkpoint=True` in place. A kill during the JSON write leaves an
    empty JSON that the next `fit` cannot parse. This subclass writes all of
    them with `atomic_save`, for any model; arguments and behaviour are
    otherwise Keras' own. It relies on the private names listed in
    `BACKUP_AND_RESTORE_PRIVATE_NAMES` (no public API exists for this).
    """

    def _save_model(self):
        if not is_local_file_path(self.backup_dir):
            return super()._save_model()
        os.makedirs(self.backup_dir, exist_ok=True)
        if self.double_checkpoint:
            for path, previous in (
                (self._weights_path, self._prev_weights_path),
                (self._training_metadata_path, self._prev_training_metadata_path),
            ):
                if os.path.exists(path):
                    atomic_copy(path, previous)
        atomic_save(
            self._weights_path,
            lambda tmp: self.model.save_weights(filepath=tmp, overwrite=True),
        )
        metadata = {"epoch": self._current_epoch, "batch": self._last_batch_seen}
        atomic_write_text(self._training_metadata_path, json.dumps(metadata))
