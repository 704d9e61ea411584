"""`gramkd tune --terms`: which term pays for the demo's student, per setting.

Runs `search_terms` on one of the demo's settings (`keras_gramkd.demo.settings`):
the teacher trains on the clean views (or is reused from the folder), every
family is searched with the same trial budget on a validation split taken from
the student's labelled training rows, and the best of each is confirmed against
the best KD on fresh paired seeds, scored on the setting's test split. Writes
``terms.json`` and ``terms.md`` to the folder.
"""

import os

import keras
import numpy as np

from keras_gramkd import zoo
from keras_gramkd.datasets.mfeat import stratified_split
from keras_gramkd.demo.settings import (
    TEST_NOISE_SEED,
    UNLABELLED,
    add_fixed_noise,
    load_setting,
)
from keras_gramkd.tuning.families import FAMILIES
from keras_gramkd.tuning.term_search import search_terms

VALIDATION_FRACTION = 0.2


def term_search_data(setting, views, seed):
    """The setting's splits, with a validation split of its labelled rows.

    Returns (data, train, validation): `data` is the `SettingData`, `train`
    its student rows less the validation rows (unlabelled rows stay there).
    Where the student's test split is noisy, so is the validation split
    (fixed noise of another seed).
    """
    data = load_setting(setting, views=views)
    x, y = data.student_train
    labelled = np.flatnonzero(y != UNLABELLED)
    rng = np.random.default_rng(seed)
    _, val = stratified_split(y[labelled], VALIDATION_FRACTION, rng)
    val = labelled[val]
    train = np.setdiff1d(np.arange(len(y)), val)
    train = rng.permutation(train)
    x_val = {k: v[val] for k, v in x.items()}
    if data.student_noise:
        x_val = add_fixed_noise(x_val, TEST_NOISE_SEED + 1)
    return data, ({k: v[train] for k, v in x.items()}, y[train]), (x_val, y[val])


def demo_candidates(views, fusion):
    """(features, modalities): the demo networks' candidate addresses."""
    t, s = zoo.FEATURES["teacher"], zoo.FEATURES["student"]
    features = {"pooled": (t["pooled"], s["pooled"])}
    modalities = {
        "views": (zoo.view_addresses("t", views), zoo.view_addresses("s", views))
    }
    if fusion == "attention":
        modalities["fused"] = (t["fused"], s["fused"])
    return features, modalities


def families_of(names):
    """The `--terms` values as families ("all": every one)."""
    return list(FAMILIES) if "all" in names else list(names)


def run_term_search(args, views, directory, teacher_for, console):
    """`gramkd tune --terms`: searches, confirms, writes terms.json and terms.md.

    `teacher_for(data)` returns the trained teacher for the setting's data.
    """
    keras.utils.set_random_seed(args.seed)
    data, train, validation = term_search_data(args.setting, views, args.seed)
    teacher = teacher_for(
        {"teacher_train": data.teacher_train, "teacher_test": data.teacher_test}
    )
    dims = {v: train[0][v].shape[1] for v in views}
    features, modalities = demo_candidates(views, data.fusion)
    result = search_terms(
        teacher,
        lambda: data.build_student(dims),
        train,
        validation,
        data.student_test,
        features=features,
        modalities=modalities,
        families=families_of(args.terms),
        trials=args.trials,
        epochs=args.epochs,
        batch_size=zoo.BATCH_SIZE,
        seeds=args.confirm_seeds,
        search_seed=args.seed,
        tuner=args.tuner,
        optimizer=lambda: keras.optimizers.Adam(zoo.STUDENT_LEARNING_RATE),
        loss=data.task_loss,
        teacher_test=data.teacher_test,
        distiller_kwargs=data.distiller_kwargs,
        directory=os.path.join(directory, "terms"),
        overwrite=args.overwrite,
        jit_compile=False if keras.backend.backend() == "tensorflow" else "auto",
    )
    result.config.update(setting=args.setting, views=list(views))
    text = f"Setting {args.setting}, views {', '.join(views)}.\n\n"
    text += result.to_markdown()
    result.to_json(os.path.join(directory, "terms.json"))
    with open(os.path.join(directory, "terms.md"), "w") as f:
        f.write(text)
    console.print(text, markup=False, highlight=False)
    return 0
