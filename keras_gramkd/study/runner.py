"""`compare_methods`: train each method on each seed, paired, and measure it."""

import hashlib
import random
import time
import warnings

import keras
import numpy as np

from keras_gramkd.distiller import Distiller
from keras_gramkd.robustness import evaluate_robustness
from keras_gramkd.study.arguments import (
    check_batch_seeds,
    check_count,
    check_methods,
    check_optimizer_and_loss,
    check_seeds,
    check_split,
    check_tests,
)
from keras_gramkd.study.batches import SeededBatches
from keras_gramkd.study.grams import gram_specs, modality_grams
from keras_gramkd.study.result import MethodResult, StudyResult


def _fresh_terms(terms):
    """New term objects from each term's config: no weights shared between runs."""
    return [type(term).from_config(term.get_config()) for term in terms]


class StudyError(RuntimeError):
    """A run of `compare_methods` failed; the runs finished before it are kept.

    Attributes:
        method, seed: the run that failed (its error is `__cause__`).
        partial: a `StudyResult` of the seeds every method finished before the
            failure (paired as in a full result), or None if none did.
    """

    def __init__(self, message, method, seed, partial):
        super().__init__(message)
        self.method, self.seed, self.partial = method, seed, partial


def _layers_outer_first(layer):
    """`layer` and the layers of every nested model in it, parents first."""
    yield layer
    for sublayer in getattr(layer, "layers", ()):
        yield from _layers_outer_first(sublayer)


class _GlobalState:
    """Saves Python's and NumPy's global random state and the teacher's
    trainable flags (of the teacher, every nested model's layers, and every
    weight); `restore` puts them back.

    Only public attributes are used: setting a layer's `trainable` also sets
    its sublayers', so layers are restored parents first; a sublayer of a
    custom (non-model) layer is reached only through its parent's flag and
    its weights' flags.
    """

    def __init__(self, teacher):
        self.random, self.numpy = random.getstate(), np.random.get_state()
        self.layers = [
            (layer, layer.trainable) for layer in _layers_outer_first(teacher)
        ]
        self.weights = [(weight, weight.trainable) for weight in teacher.weights]

    def restore(self):
        random.setstate(self.random)
        np.random.set_state(self.numpy)
        for layer, trainable in self.layers:
            layer.trainable = trainable
        for weight, trainable in self.weights:
            weight.trainable = trainable


class _LabelledAccuracy(keras.metrics.SparseCategoricalAccuracy):
    """Accuracy over the labelled rows: labels equal to `ignore_class` (the
    task loss's unlabelled marker) are left out."""

    def __init__(self, ignore_class=None, name="accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.ignore_class = ignore_class

    def update_state(self, y_true, y_pred, sample_weight=None):
        if self.ignore_class is not None:
            labels = keras.ops.reshape(y_true, (-1,))
            keep = keras.ops.cast(
                keras.ops.not_equal(labels, self.ignore_class), "float32"
            )
            if sample_weight is not None:
                weight = keras.ops.reshape(sample_weight, (-1,))
                keep = keep * keras.ops.cast(weight, "float32")
            sample_weight = keep
        return super().update_state(y_true, y_pred, sample_weight)

    def get_config(self):
        return {**super().get_config(), "ignore_class": self.ignore_class}


def _trainer(teacher, student, method, distiller_kwargs):
    """The model that trains `student` by `method` (terms or a callable)."""
    if callable(method):
        return method(teacher, student)
    return Distiller(
        teacher, student, terms=_fresh_terms(method), **(distiller_kwargs or {})
    )


class _Scoring:
    """Scores the teacher once per test set, then each student on each set:
    accuracy with every modality and with each one dropped, and |ΔG| where
    the Gram specs are given.

    Args:
        tests: dict name -> ((x, y) of the students, (x, y) of the teacher).
        specs: (teacher spec, student spec) of `gram_specs`, or None.
    """

    def __init__(self, teacher, tests, modalities, specs, normalize):
        self.tests, self.modalities, self.normalize = tests, modalities, normalize
        self.specs = specs
        self.teacher, self.teacher_grams = {}, {}
        for name, (_, (x, y)) in tests.items():
            self.teacher[name] = evaluate_robustness(
                teacher, x, y, modalities=modalities, pairs=False
            )
            if specs is not None:
                self.teacher_grams[name] = modality_grams(
                    teacher, specs[0], x, normalize
                )

    def __call__(self, student):
        """dict test set name -> (robustness report, |ΔG| or None)."""
        scores = {}
        for name, ((x, y), _) in self.tests.items():
            report = evaluate_robustness(
                student, x, y, modalities=self.modalities, pairs=False
            )
            scores[name] = (report, self.gram_gap(student, name))
        return scores

    def gram_gap(self, student, test, rows=None):
        """Mean |G_teacher - G_student| on test set `test` (its first `rows`
        rows if given), or None without specs; raises when the two Gram
        matrices differ in size."""
        if self.specs is None:
            return None
        x = self.tests[test][0][0]
        if rows is not None:
            x = {key: value[:rows] for key, value in x.items()}
        grams = modality_grams(student, self.specs[1], x, self.normalize)
        teacher = self.teacher_grams[test][: len(grams)]
        if grams.shape != teacher.shape:
            raise ValueError(
                f"The teacher's modality Gram matrices are {teacher.shape[1]}×"
                f"{teacher.shape[1]} but the student's are {grams.shape[1]}×"
                f"{grams.shape[1]}: teacher_modalities and student_modalities "
                "must name as many modalities. Give both as dicts modality name "
                "-> address, which align by name."
            )
        return float(np.mean(np.abs(teacher - grams)))


def _fingerprint(weights):
    """A digest of a model's weights (numpy arrays): equal for equal weights."""
    digest = hashlib.sha256()
    for array in weights:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _warn_if_seen(seed, weights, seen):
    """Warns when `weights` equal the initial weights of a seed in `seen`
    (fingerprint -> seed), else records them."""
    if not weights:
        return
    key = _fingerprint(weights)
    if key in seen:
        warnings.warn(
            f"Seeds {seen[key]} and {seed} give identical initial student "
            "weights, so their runs differ at most by the batch order and the "
            "seeds are not independent. Likely cause: build_student() sets a "
            "seed itself (keras.utils.set_random_seed or a seeded initializer). "
            "Fix: leave the seeding out of build_student(); compare_methods "
            "seeds each run before calling it.",
            UserWarning,
            stacklevel=3,
        )
    else:
        seen[key] = seed


def compare_methods(
    teacher,
    build_student,
    train,
    test,
    methods,
    seeds=3,
    batch_seeds=None,
    reference=None,
    epochs=10,
    batch_size=64,
    steps_per_epoch=None,
    optimizer=None,
    loss=None,
    modalities=None,
    teacher_modalities=None,
    student_modalities=None,
    gram_normalize="l2",
    teacher_test=None,
    distiller_kwargs=None,
    callbacks=None,
    on_run_end=None,
    keep_students=False,
    jit_compile="auto",
    validation=None,
):
    """Trains every method on every seed, paired, and returns a `StudyResult`.

    For each seed, the student `build_student()` returns is built once under
    `keras.utils.set_random_seed(seed)` and its initial weights are given to
    every method's fresh student; all methods then train with the same
    optimizer settings and the same batches in the same order
    (`SeededBatches`, drawn from the seed's batch seed), so the per-seed
    differences between methods are paired. Two seeds whose students start
    from identical weights get a `UserWarning`.
    Python's and NumPy's global random state and the teacher's `trainable`
    flags are restored when it returns or fails (the backend's seed is left
    set by the last run).

    Every argument is checked before anything trains.

    Args:
        teacher: the trained teacher (`keras.Model`, logits).
        build_student: callable `() -> keras.Model`: a fresh student, whose
            layers have the same names on every call (feature addresses name
            them).
        train: `(x, y)`, x a dict of arrays, y integer labels (unlabelled rows
            carry the `ignore_class` of your `loss`); every array of x has one
            row per label (as in `test`, `teacher_test` and `validation`).
        test: `(x, y)` for the students' scores, or a dict name -> `(x, y)`
            of named test sets (e.g. `{"clean": ..., "noisy": ...}`): every
            student is scored on each, and the result reports each
            (`StudyResult.on(name)`, one Markdown table per set, `"tests"`
            in the JSON); the first set gives the headline numbers.
        methods: non-empty dict name (a string) -> list of `DistillationTerm`s
            (`[]`: labels only; a single term must be wrapped in a list;
            the terms are copied from their config for each run), or name ->
            callable `(teacher, student) -> keras.Model` for another trainer
            (e.g. a `keras.distillation.Distiller`), compiled and fit the same
            way.
        seeds: a number of seeds (an int >= 1: seeds 0..n-1) or a non-empty
            list of distinct ints in [0, 2**32). A seed sets the student's
            initial weights and the backend's random stream (dropout).
        batch_seeds: the seed of each seed's batch order, a list of ints in
            [0, 2**32) as long as the seeds (repeats allowed; default: the
            seeds themselves), e.g. `[0] * n` to train every seed on one
            batch order. Both are in `result.config` (`seeds`, `batch_seeds`).
        reference: the name of the method the others are paired against
            (default: the first).
        epochs, batch_size: training length (ints >= 1); an epoch is one pass
            over `train`, or `steps_per_epoch` (an int >= 1) batches if given.
        optimizer: callable `() -> keras.optimizers.Optimizer` (default Adam
            1e-3).
        loss: callable `() -> keras.losses.Loss` for the task (default sparse
            categorical cross-entropy on logits).
        modalities: which inputs of `test` form each modality, for the
            accuracies with one modality dropped (as `evaluate_robustness`
            takes it; default: each input key is a modality).
        teacher_modalities, student_modalities: feature addresses, as a
            `GramTerm` takes them (dicts modality name -> address, aligned by
            name, or one address whose output is the stacked (batch, M, d)
            embeddings, e.g. a fusion block's tokens), for the |ΔG| column:
            the mean absolute difference between the teacher's and the
            student's modality Gram matrices on `test`. Without them |ΔG| is
            not measured.
        gram_normalize: the Gram normalisation of the |ΔG| column.
        teacher_test: `(x, y)` the teacher is scored on, row for row the same
            samples as `test` (default `test`), e.g. clean inputs where the
            students are scored on noisy ones. With named test sets, a dict
            test set name -> `(x, y)`; a set it leaves out scores the teacher
            on the set itself.
        distiller_kwargs: more `Distiller` arguments (e.g.
            `student_mask_layer`, `on_bad_sample`).
        callbacks: callable `(method, seed) -> list of keras callbacks`.
        on_run_end: callable `(method, seed, accuracy)` after each run (for
            progress display).
        keep_students: keep the trained students in `result.students`,
            a dict `(method, seed) -> keras.Model`.
        jit_compile: passed to `compile` (on CPU, small models often train
            faster with False on TensorFlow).
        validation: optional `(x, y)` evaluated after every epoch (fit's
            `validation_data`), for per-epoch curves: each history gets
            `val_*` entries, and each trainer is compiled with an `accuracy`
            metric (labelled rows only: the task loss's `ignore_class` is
            left out). The split is only observed: no model selection uses
            it, and the last epoch's weights are kept and scored.

    Returns:
        A `StudyResult`.

    Raises:
        TypeError: `teacher` is not a `keras.Model`, or `build_student` is
            not callable.
        ValueError: an argument is malformed (the message names it, its value
            and the fix): rows of an x that differ from its y's, counts that
            are not ints >= 1, a term not wrapped in a list, an unknown
            `reference`, a built optimizer or loss instead of a callable, a
            test set that is not a pair (x, y), `batch_seeds` not one whole
            number per seed, modality addresses a `GramTerm` refuses, or
            teacher and student Gram matrices of different sizes.
        StudyError: a run failed; its `partial` holds the seeds every method
            finished, and the run's error is chained as its `__cause__`.

    Example (see the README for a full one):

    ```python
    result = compare_methods(
        teacher, build_student, (x_train, y_train), (x_test, y_test),
        methods={"kd": [KDTerm()], "kd+gram": [KDTerm(), GramTerm(t_mods, s_mods)]},
        seeds=10, teacher_modalities=t_mods, student_modalities=s_mods,
    )
    print(result.to_markdown())
    ```
    """
    if not isinstance(teacher, keras.Model):
        raise TypeError(f"teacher must be a keras.Model; got {type(teacher).__name__}.")
    if not callable(build_student):
        raise TypeError("build_student must be a callable () -> keras.Model.")
    if (teacher_modalities is None) != (student_modalities is None):
        raise ValueError(
            "Give both teacher_modalities and student_modalities for |ΔG|, or neither."
        )
    specs = None
    if teacher_modalities is not None:
        specs = gram_specs(teacher_modalities, student_modalities)
    reference = check_methods(methods, reference)
    seeds = check_seeds(seeds)
    batch_seeds = dict(zip(seeds, check_batch_seeds(batch_seeds, seeds), strict=True))
    epochs = check_count("epochs", epochs)
    batch_size = check_count("batch_size", batch_size, example=64)
    if steps_per_epoch is not None:
        steps_per_epoch = check_count("steps_per_epoch", steps_per_epoch, 100)
    check_optimizer_and_loss(optimizer, loss)
    x, y = check_split("train", train)
    tests, named = check_tests(test, teacher_test)
    if validation is not None:
        validation = check_split("validation", validation)
    optimizer = optimizer or (lambda: keras.optimizers.Adam(1e-3))
    loss = loss or (
        lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )

    score = _Scoring(teacher, tests, modalities, specs, gram_normalize)
    first_test = next(iter(tests))

    def run(name, method, seed, initial):
        """Trains and scores one student: (seed, report, gap, seconds, params,
        history) for `MethodResult.add`, and the student."""
        keras.utils.set_random_seed(seed)
        student = build_student()
        student.set_weights(initial)
        trainer = _trainer(teacher, student, method, distiller_kwargs)
        task_loss = loss()
        metrics = None
        if validation is not None:
            metrics = [_LabelledAccuracy(getattr(task_loss, "ignore_class", None))]
        trainer.compile(
            optimizer(), task_loss, metrics=metrics, jit_compile=jit_compile
        )
        batches = SeededBatches(
            x, y, batch_size, steps_per_epoch, seed=batch_seeds[seed]
        )
        start = time.perf_counter()
        history = trainer.fit(
            batches,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=callbacks(name, seed) if callbacks else None,
            validation_data=validation,
            validation_batch_size=batch_size if validation else None,
        ).history
        seconds = time.perf_counter() - start
        scores = score(student)
        report, gap = scores[first_test]
        if on_run_end is not None:
            on_run_end(name, seed, report.accuracy)
        params = student.count_params()
        added = (seed, report, gap, seconds, params, history, scores if named else None)
        return added, student

    def result(done):
        """The `StudyResult` of the seeds in `done`."""
        teachers = {
            test: {"accuracy": report.accuracy, "dropped": dict(report.dropped)}
            for test, report in score.teacher.items()
        }
        n_test = {test: len(split[1]) for test, (split, _) in tests.items()}
        return StudyResult(
            methods=runs,
            reference=reference,
            teacher_accuracy=teachers[first_test]["accuracy"],
            teacher_dropped=teachers[first_test]["dropped"],
            teacher_params=teacher.count_params(),
            config={
                "seeds": list(done),
                "batch_seeds": [batch_seeds[seed] for seed in done],
                "epochs": epochs,
                "batch_size": batch_size,
                "steps_per_epoch": len(
                    SeededBatches(x, y, batch_size, steps_per_epoch)
                ),
                "n_train": len(y),
                "n_test": n_test if named else n_test[first_test],
                "gram_normalize": gram_normalize,
                "backend": keras.backend.backend(),
            },
            students=students,
            teacher_tests=teachers if named else None,
        )

    def failed(name, seed, err):
        """The `StudyError` of method `name` (None: `build_student`) on `seed`."""
        what = f"method {name!r}" if name else "build_student()"
        return StudyError(
            f"compare_methods: {what} failed on seed {seed} "
            f"({type(err).__name__}: {err}). The {len(done)} seed(s) "
            f"every method finished ({done}) are in this error's "
            "`.partial` StudyResult; fix the failing run and rerun, "
            "e.g. with the remaining seeds.",
            name,
            seed,
            result(done) if done else None,
        )

    runs = {name: MethodResult(name) for name in methods}
    students, done, initial_seeds = {}, [], {}
    saved = _GlobalState(teacher)
    try:
        for seed in seeds:
            try:
                keras.utils.set_random_seed(seed)
                built = build_student()
                initial = built.get_weights()
            except Exception as err:
                raise failed(None, seed, err) from err
            _warn_if_seen(seed, initial, initial_seeds)
            if not done:  # the student's features fail here, before training
                score.gram_gap(built, first_test, rows=1)
            finished, name = {}, None  # a seed counts once every method has run
            try:
                for name, method in methods.items():
                    finished[name] = run(name, method, seed, initial)
            except Exception as err:
                raise failed(name, seed, err) from err
            for name, (added, student) in finished.items():
                runs[name].add(*added)
                if keep_students:
                    students[(name, seed)] = student
            done.append(seed)
    finally:
        saved.restore()
    return result(done)
