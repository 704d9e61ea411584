"""Child process for tests/test_resume.py: killed in the middle of a save.

    python save_child.py WORKDIR

Saves a small Distiller's weights to WORKDIR/model.weights.h5 (the good file,
its arrays also in WORKDIR/good.npz), zeroes the student, and saves again,
but stops half-way: after Keras has written the variables into the file and
before it closes it, the child writes WORKDIR/writing and waits to be killed.
"""

import os
import sys
import time

import keras
import numpy as np
from keras.src.saving import saving_lib

from keras_gramkd import Distiller

sys.path.insert(0, os.path.dirname(__file__))
from resume_child import WIDTHS, net  # noqa: E402


def block_after(save_state, marker):
    parent = os.getppid()

    def blocked(*args, **kwargs):
        save_state(*args, **kwargs)
        open(marker, "w").close()
        while os.getppid() == parent:  # until killed, or orphaned
            time.sleep(0.05)
        os._exit(1)

    return blocked


def main(workdir):
    keras.utils.set_random_seed(3)
    distiller = Distiller(
        net("t", 8),
        net("s", 4),
        teacher_modalities={m: f"t_{m}" for m in WIDTHS},
        student_modalities={m: f"s_{m}" for m in WIDTHS},
    )
    path = os.path.join(workdir, "model.weights.h5")
    distiller.save_weights(path)
    good = {
        str(i): keras.ops.convert_to_numpy(w) for i, w in enumerate(distiller.weights)
    }
    np.savez(os.path.join(workdir, "good.npz"), **good)
    for w in distiller.student.weights:
        w.assign(np.zeros(w.shape, w.dtype))
    saving_lib._save_state = block_after(
        saving_lib._save_state, os.path.join(workdir, "writing")
    )
    distiller.save_weights(path)


if __name__ == "__main__":
    main(sys.argv[1])
