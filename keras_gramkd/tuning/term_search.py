"""`search_terms`: which distillation term pays for your model.

An equal-budget KerasTuner search over the term families (`families`), each
added to logit KD, then a confirmation of each family's best settings against
the best KD alone on fresh paired seeds (`compare_methods`).
"""

import os
import shutil
import tempfile
import time

import keras
import numpy as np

from keras_gramkd.study.arguments import check_count, check_seeds, check_split
from keras_gramkd.study.runner import compare_methods
from keras_gramkd.tuning.families import (
    FAMILIES,
    FamilySpace,
    available_families,
    describe_settings,
)
from keras_gramkd.tuning.search import completed_trials, import_keras_tuner
from keras_gramkd.tuning.term_result import TermSearchResult

SEARCH_TUNERS = ("random", "bayesian")
OBJECTIVE = "val_accuracy"


def _check_families(families, features, modalities):
    allowed = available_families(features, modalities)
    if families is None:
        return allowed
    families = list(dict.fromkeys(families))
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"Unknown term famil(ies) {unknown}; choose from {FAMILIES}.")
    for family in families:  # a family without candidates names what it needs
        FamilySpace(family, features, modalities)
    if "kd" not in families:
        families.insert(0, "kd")  # the control every family is confirmed against
    return families


def _check_validation(validation, loss):
    x, y = check_split("validation", validation)
    ignore = getattr(loss(), "ignore_class", None)
    if ignore is not None and np.any(y == ignore):
        raise ValueError(
            f"validation has {int(np.sum(y == ignore))} unlabelled row(s) (label "
            f"{ignore}, the task loss's ignore_class); the objective needs a "
            "label on every validation row. Take the validation rows from the "
            "labelled ones."
        )
    return x, y


def _confirmation_seeds(seeds, search_seed):
    """Fresh seeds: `seeds` (>= 2 of them) never equal to the search's seed."""
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = check_count("seeds", seeds, example=5)
        seeds = [search_seed + 1 + i for i in range(seeds)]
    seeds = check_seeds(seeds)
    if len(seeds) < 2:
        raise ValueError(
            "The confirmation needs at least 2 seeds for a standard error; give "
            "seeds=5 (the default) or more."
        )
    if search_seed in seeds:
        raise ValueError(
            f"seeds holds the search's seed {search_seed}; the confirmation needs "
            "fresh seeds that the search never trained on."
        )
    return seeds


def _tuner(kt, hypermodel, tuner, trials, seed, directory, overwrite):
    kwargs = dict(
        objective=kt.Objective(OBJECTIVE, "max"),
        max_trials=trials,
        seed=seed,
        directory=directory,
        project_name=hypermodel.name,
        overwrite=overwrite,
    )
    if tuner == "bayesian":
        return kt.BayesianOptimization(
            hypermodel, num_initial_points=max(2, trials // 3), **kwargs
        )
    return kt.RandomSearch(hypermodel, **kwargs)


def _print_trial(family, budget):
    count = [0]

    def report(settings, history, seconds):
        count[0] += 1
        scores = history.history.get(OBJECTIVE) or [float("nan")]
        best = int(np.argmax(scores))
        print(
            f"[{family}] trial {count[0]}/{budget}: {describe_settings(settings)}: "
            f"{OBJECTIVE} {scores[best]:.4f} (epoch {best + 1}) in {seconds:.0f} s",
            flush=True,
        )

    return report


def search_terms(
    teacher,
    build_student,
    train,
    validation,
    test,
    features=None,
    modalities=None,
    families=None,
    trials=8,
    epochs=10,
    batch_size=64,
    seeds=5,
    search_seed=0,
    tuner="random",
    optimizer=None,
    loss=None,
    teacher_test=None,
    distiller_kwargs=None,
    directory=None,
    overwrite=False,
    jit_compile="auto",
    keep_students=False,
    verbose=1,
):
    """Searches each term family with the same budget, then confirms the best.

    1. **Search.** For each family (KD alone, and KD plus one of the Gram,
       per-modality SP, SP, RKD, PKT, FitNet; see `families`), a KerasTuner
       search of `trials` trials over its settings: KD's weight and
       temperature, the family's weight on a log range around its published
       scale, the candidate feature, the Gram's normalisation. Every trial
       starts from the same initial student (`search_seed`) and sees the same
       batches; the objective is ``val_accuracy`` on `validation` at the best
       epoch. Every family gets the same number of trials, so none wins by
       getting more.
    2. **Confirmation.** Each family's best settings and the best KD alone are
       trained again with `compare_methods` on fresh paired `seeds` (never the
       search's seed) on `train` for `epochs` epochs, and scored on `test`,
       which the search never saw.

    Args:
        teacher: the trained teacher (`keras.Model`, logits).
        build_student: callable ``() -> keras.Model``, a fresh student whose
            layers have the same names on every call.
        train: ``(x, y)``; unlabelled rows carry the `loss`'s ``ignore_class``.
        validation: ``(x, y)``, every row labelled: the search's objective.
        test: ``(x, y)`` or named test sets, as `compare_methods` takes them;
            the rows report the first.
        features: dict name -> (teacher address, student address) of vector
            features: the candidates of SP, RKD, PKT and FitNet.
        modalities: dict name -> (teacher modalities, student modalities), as
            a `GramTerm` takes them: the candidates of the Gram and
            per-modality SP.
        families: the families to search (default: every family the
            candidates allow); ``"kd"`` is always searched, as the control.
        trials: trials per family (an int >= 1).
        epochs, batch_size: training length of every trial and confirmation run.
        seeds: the confirmation's seeds: a count (default 5: the seeds after
            `search_seed`) or a list of at least 2 distinct seeds.
        search_seed: the seed of every trial's initial weights and batches.
        tuner: ``"random"`` or ``"bayesian"`` (needs ``keras-tuner[bayesian]``);
            Hyperband is not offered: it gives families different budgets.
        optimizer: callable ``() -> optimizer`` (default Adam 1e-3).
        loss: callable ``() -> keras.losses.Loss`` (default sparse categorical
            cross-entropy on logits).
        teacher_test: as in `compare_methods`.
        distiller_kwargs: more `Distiller` arguments (e.g.
            ``student_mask_layer``).
        directory: the tuners' folder (one project per family); an existing
            search there resumes unless `overwrite`. Default: a temporary
            folder, removed at the end.
        overwrite: start the searches in `directory` over.
        jit_compile: passed to `compile`.
        keep_students: keep the confirmation's trained students in
            ``result.confirmation.students`` (dict (family, seed) -> model).
        verbose: 1 prints a line per trial and per confirmation run; 0 is
            silent.

    Returns:
        A `TermSearchResult`: one row per family, its recommendation,
        `to_markdown()` and `to_json()`.

    Raises:
        ImportError: keras_tuner is missing (the message names the extra).
        ValueError: a malformed argument (the message names it and the fix).

    Example:

    ```python
    result = search_terms(
        teacher, build_student, (x_train, y_train), (x_val, y_val),
        (x_test, y_test),
        features={"pooled": ("t_pool", "s_pool")},
        modalities={"views": (t_views, s_views)},
        trials=8, seeds=5,
    )
    print(result.to_markdown())
    ```
    """
    kt = import_keras_tuner()
    from keras_gramkd.tuning.hypermodel import TermFamilyHyperModel

    if not isinstance(teacher, keras.Model):
        raise TypeError(f"teacher must be a keras.Model; got {type(teacher).__name__}.")
    if not callable(build_student):
        raise TypeError("build_student must be a callable () -> keras.Model.")
    if tuner not in SEARCH_TUNERS:
        raise ValueError(
            f"tuner must be one of {SEARCH_TUNERS}; got {tuner!r} (Hyperband "
            "gives each family a different budget)."
        )
    families = _check_families(families, features, modalities)
    trials = check_count("trials", trials, example=8)
    epochs = check_count("epochs", epochs)
    batch_size = check_count("batch_size", batch_size, example=64)
    seeds = _confirmation_seeds(seeds, search_seed)
    optimizer = optimizer or (lambda: keras.optimizers.Adam(1e-3))
    loss = loss or (
        lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    x, y = check_split("train", train)
    validation = _check_validation(validation, loss)

    temporary = directory is None
    directory = tempfile.mkdtemp(prefix="search_terms-") if temporary else directory
    searched, spaces, start = {}, {}, time.perf_counter()
    try:
        for family in families:
            space = FamilySpace(family, features, modalities)
            hypermodel = TermFamilyHyperModel(
                teacher,
                build_student,
                space,
                search_seed,
                batch_size,
                optimizer,
                loss,
                distiller_kwargs,
                jit_compile,
                on_trial_end=_print_trial(family, trials) if verbose else None,
            )
            family_start = time.perf_counter()
            search = _tuner(
                kt, hypermodel, tuner, trials, search_seed, directory, overwrite
            )
            search.search(x, y, validation_data=validation, epochs=epochs, verbose=0)
            done = completed_trials(search)
            if not done:
                raise RuntimeError(
                    f"search_terms: no trial of the {family!r} family completed; "
                    f"see the tuner's logs in {directory}."
                )
            best = done[0]
            spaces[family] = (space, best.hyperparameters.copy())
            searched[family] = {
                "settings": space.settings(best.hyperparameters),
                "trials": len(done),
                "val": float(best.score),
                "search_seconds": time.perf_counter() - family_start,
            }
    finally:
        if temporary:
            shutil.rmtree(directory, ignore_errors=True)
    search_seconds = time.perf_counter() - start

    methods = {family: space.terms(hp) for family, (space, hp) in spaces.items()}
    start = time.perf_counter()
    confirmation = compare_methods(
        teacher,
        build_student,
        (x, y),
        test,
        methods,
        seeds=seeds,
        reference="kd",
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        loss=loss,
        teacher_test=teacher_test,
        distiller_kwargs=distiller_kwargs,
        jit_compile=jit_compile,
        keep_students=keep_students,
        on_run_end=_print_run if verbose else None,
    )
    config = {
        "families": families,
        "trials": trials,
        "epochs": epochs,
        "batch_size": batch_size,
        "tuner": tuner,
        "objective": OBJECTIVE,
        "search_seed": search_seed,
        "seeds": seeds,
        "search_seconds": search_seconds,
        "confirm_seconds": time.perf_counter() - start,
        "backend": keras.backend.backend(),
        "directory": None if temporary else os.path.abspath(directory),
    }
    return TermSearchResult.from_search(searched, confirmation, config)


def _print_run(method, seed, accuracy):
    print(f"[confirm] {method}, seed {seed}: test accuracy {accuracy:.4f}", flush=True)
