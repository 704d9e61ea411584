"""Quickstart: train a multi-modal teacher on the embedded digits, distil a student.

Run (any backend):

    KERAS_BACKEND=jax python examples/quickstart.py

It trains a teacher with one encoder per view, then a student with tiny
encoders through task loss + logit KD + modality Gram, and prints both test
accuracies. Under 2 minutes on 2 CPU cores.
"""

import argparse

import keras

from keras_gramkd import Distiller
from keras_gramkd.datasets import load_mfeat

VIEWS = ("pix", "fou", "zer")


def build_net(prefix, x_train, width, hidden):
    """One Dense encoder per view (named f"{prefix}_{view}_embed"), then a head."""
    inputs = {v: keras.Input(x_train[v].shape[1:], name=v) for v in VIEWS}
    embeds = [
        keras.layers.Dense(width, activation="relu", name=f"{prefix}_{v}_embed")(
            keras.layers.Dense(hidden, activation="relu")(inputs[v])
        )
        for v in VIEWS
    ]
    fused = keras.layers.Concatenate()(embeds)
    logits = keras.layers.Dense(10, name=f"{prefix}_logits")(fused)
    return keras.Model(inputs, logits, name=f"{prefix}_net")


def main(epochs=30):
    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = load_mfeat(views=VIEWS)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    teacher = build_net("t", x_train, width=128, hidden=256)
    teacher.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
    teacher.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0)

    student = build_net("s", x_train, width=4, hidden=8)
    distiller = Distiller(
        teacher=teacher,
        student=student,
        teacher_modalities={v: f"t_{v}_embed" for v in VIEWS},
        student_modalities={v: f"s_{v}_embed" for v in VIEWS},
        task_weight=1.0,
        kd_weight=1.0,
        gram_weight=1.0,
        temperature=4.0,
    )
    distiller.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
    distiller.fit(
        x_train,
        y_train,
        validation_data=(x_test, y_test),
        epochs=epochs,
        batch_size=64,
        verbose=2,
    )
    _, teacher_accuracy = teacher.evaluate(x_test, y_test, verbose=0)
    student.compile(loss=loss, metrics=["accuracy"])
    _, student_accuracy = student.evaluate(x_test, y_test, verbose=0)
    print(f"backend: {keras.backend.backend()}")
    print(f"teacher test accuracy: {teacher_accuracy:.4f}")
    print(f"student test accuracy: {student_accuracy:.4f}")
    return teacher_accuracy, student_accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    main(parser.parse_args().epochs)
