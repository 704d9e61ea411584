"""Tune the distillation loss weights with KerasTuner on the embedded digits.

A frozen teacher is trained once on four views of the UCI multiple-features
digits; a random search then tunes kd_weight, gram_weight (including
gram_weight = 0), the temperature and the learning rate of a small student,
ranking trials by the student's validation accuracy. Finishes in a couple of
minutes on a laptop CPU:

    pip install "keras-gramkd[tune]"
    KERAS_BACKEND=jax python examples/tune_weights.py

Run it again with the same directory and it resumes: finished trials are not
redone.
"""

import keras
import keras_tuner as kt
import numpy as np

from keras_gramkd.datasets import load_mfeat
from keras_gramkd.tuning import (
    DistillerHyperModel,
    best_with_and_without_gram,
    completed_trials,
)

VIEWS = ["fac", "fou", "kar", "pix"]
DIRECTORY = "runs/tune_weights_example"


def encoders(inputs, prefix, width, embed):
    """One Dense encoder per view; view v's embedding is layer f"{prefix}_{v}"."""
    return [
        keras.layers.Dense(embed, name=f"{prefix}_{v}")(
            keras.layers.Dense(width, activation="relu")(x)
        )
        for v, x in inputs.items()
    ]


def build_teacher(dims):
    inputs = {v: keras.Input((d,), name=v) for v, d in dims.items()}
    x = keras.layers.Concatenate()(encoders(inputs, "t", 128, 32))
    logits = keras.layers.Dense(10)(keras.layers.Dense(64, activation="relu")(x))
    return keras.Model(inputs, logits, name="teacher")


def make_build_student(dims):
    def build_student(hp):
        # The student's size can be searched too.
        width = hp.Choice("student_width", [8, 16])
        inputs = {v: keras.Input((d,), name=v) for v, d in dims.items()}
        x = keras.layers.Concatenate()(encoders(inputs, "s", width, 8))
        return keras.Model(inputs, keras.layers.Dense(10)(x), name="student")

    return build_student


def main():
    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = load_mfeat(views=VIEWS)
    # Hold out a validation split for the tuner; the test split stays unseen.
    order = np.random.default_rng(0).permutation(len(y_train))
    val, train = order[:200], order[200:]
    x_val, y_val = {k: v[val] for k, v in x_train.items()}, y_train[val]
    x_fit, y_fit = {k: v[train] for k, v in x_train.items()}, y_train[train]
    dims = {v: x_train[v].shape[1] for v in VIEWS}

    teacher = build_teacher(dims)
    teacher.compile(
        "adam",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    teacher.fit(x_fit, y_fit, epochs=15, batch_size=64, verbose=0)
    print("teacher test accuracy:", teacher.evaluate(x_test, y_test, verbose=0)[1])

    hypermodel = DistillerHyperModel(
        teacher=teacher,
        build_student=make_build_student(dims),
        teacher_modalities={v: f"t_{v}" for v in VIEWS},
        student_modalities={v: f"s_{v}" for v in VIEWS},
        search_space={"temperature": [2, 4, 8]},  # fix or narrow any entry
    )
    tuner = kt.RandomSearch(
        hypermodel,
        objective="val_accuracy",  # the student's metric, never val_loss
        max_trials=6,
        directory=DIRECTORY,
        project_name="mfeat",
        seed=0,
    )
    tuner.search(
        x_fit, y_fit, validation_data=(x_val, y_val), epochs=8, batch_size=64, verbose=0
    )

    for trial in completed_trials(tuner):
        config = hypermodel.distiller_config(trial.hyperparameters)
        print(f"trial {trial.trial_id}: val_accuracy {trial.score:.3f}  {config}")

    best = tuner.get_best_models(1)[0]  # a Distiller around the shared teacher
    student = best.student  # the best trained student
    scores = best.evaluate(x_test, y_test, verbose=0, return_dict=True)
    print("best student test accuracy:", scores["accuracy"])
    with_gram, without_gram = best_with_and_without_gram(tuner, hypermodel)
    for label, trial in (("with Gram", with_gram), ("without Gram", without_gram)):
        if trial is not None:
            print(f"best {label}: val_accuracy {trial.score:.3f}")

    # Rebuild (untrained) from the best hyperparameters, e.g. to train longer.
    distiller = hypermodel.build(tuner.get_best_hyperparameters(1)[0])
    print(
        "rebuilt:", {k: distiller.get_config()[k] for k in ("kd_weight", "gram_weight")}
    )
    student.save(f"{DIRECTORY}/best_student.keras")


if __name__ == "__main__":
    main()
