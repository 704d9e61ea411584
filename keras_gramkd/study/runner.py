"""`compare_methods`: train each method on each seed, paired, and measure it."""

import time

import keras
import numpy as np

from keras_gramkd.distiller import Distiller
from keras_gramkd.robustness import evaluate_robustness
from keras_gramkd.study.batches import SeededBatches
from keras_gramkd.study.grams import modality_grams
from keras_gramkd.study.result import MethodResult, StudyResult
from keras_gramkd.terms import DistillationTerm


def _check_methods(methods, reference):
    if not isinstance(methods, dict) or not methods:
        raise ValueError(
            "methods must be a non-empty dict name -> list of DistillationTerms "
            '(e.g. {"kd": [KDTerm()], "kd+gram": [KDTerm(), GramTerm(...)]}); '
            f"got {methods!r}."
        )
    for name, terms in methods.items():
        if callable(terms):
            continue
        if not isinstance(terms, (list, tuple)) or not all(
            isinstance(t, DistillationTerm) for t in terms
        ):
            raise ValueError(
                f"methods[{name!r}] must be a list of DistillationTerms ([] for "
                "labels only) or a callable (teacher, student) -> keras.Model; "
                f"got {terms!r}."
            )
    if reference is None:
        return next(iter(methods))
    if reference not in methods:
        raise ValueError(
            f"reference {reference!r} is not one of the methods {list(methods)}."
        )
    return reference


def _fresh_terms(terms):
    """New term objects from each term's config: no weights shared between runs."""
    return [type(term).from_config(term.get_config()) for term in terms]


def _seeds(seeds):
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1; got {seeds}.")
        return list(range(seeds))
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and non-empty; got {seeds}.")
    return seeds


def _check_split(name, split):
    if not (isinstance(split, (tuple, list)) and len(split) == 2):
        raise ValueError(f"{name} must be a pair (x, y); got {type(split).__name__}.")
    x, y = split
    if not isinstance(x, dict):
        raise ValueError(f"{name}'s x must be a dict input name -> array.")
    return x, np.asarray(y)


def _check_validation(validation):
    """`validation` as `(x, y)` with one row per label in every input, or None."""
    if validation is None:
        return None
    x, y = _check_split("validation", validation)
    labels = len(y) if y.ndim else None
    rows = {k: (np.shape(v)[0] if np.ndim(v) else None) for k, v in x.items()}
    if not x or labels is None or any(n != labels for n in rows.values()):
        raise ValueError(
            "validation's x and y must have the same number of rows: y has "
            f"{labels} labels, x has rows {rows}."
        )
    return x, y


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
    """Scores the teacher once, then each student: accuracy with every
    modality and with each one dropped, and |ΔG| where addresses are given."""

    def __init__(self, teacher, test, teacher_test, modalities, addresses, normalize):
        self.test, self.modalities, self.normalize = test, modalities, normalize
        self.teacher = evaluate_robustness(
            teacher, *teacher_test, modalities=modalities, pairs=False
        )
        teacher_modalities, self.student_modalities = addresses
        self.teacher_grams = None
        if teacher_modalities is not None:
            self.teacher_grams = modality_grams(
                teacher, teacher_modalities, teacher_test[0], normalize
            )

    def __call__(self, student):
        """The student's robustness report on `test`, and its |ΔG| (or None)."""
        report = evaluate_robustness(
            student, *self.test, modalities=self.modalities, pairs=False
        )
        if self.teacher_grams is None:
            return report, None
        grams = modality_grams(
            student, self.student_modalities, self.test[0], self.normalize
        )
        return report, float(np.mean(np.abs(self.teacher_grams - grams)))


def compare_methods(
    teacher,
    build_student,
    train,
    test,
    methods,
    seeds=3,
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
    (`SeededBatches`), so the per-seed differences between methods are paired.

    Args:
        teacher: the trained teacher (`keras.Model`, logits).
        build_student: callable `() -> keras.Model`: a fresh student, whose
            layers have the same names on every call (feature addresses name
            them).
        train: `(x, y)`, x a dict of arrays, y integer labels (unlabelled rows
            carry the `ignore_class` of your `loss`).
        test: `(x, y)` for the students' scores.
        methods: dict name -> list of `DistillationTerm`s (`[]`: labels only;
            the terms are copied from their config for each run), or name ->
            callable `(teacher, student) -> keras.Model` for another trainer
            (e.g. a `keras.distillation.Distiller`), compiled and fit the same
            way.
        seeds: a number of seeds (0..n-1) or a list of seeds.
        reference: the method the others are paired against (default: the
            first).
        epochs, batch_size: training length; an epoch is one pass over
            `train`, or `steps_per_epoch` batches if given.
        optimizer: callable `() -> keras.optimizers.Optimizer` (default Adam
            1e-3).
        loss: callable `() -> keras.losses.Loss` for the task (default sparse
            categorical cross-entropy on logits).
        modalities: which inputs of `test` form each modality, for the
            accuracies with one modality dropped (as `evaluate_robustness`
            takes it; default: each input key is a modality).
        teacher_modalities, student_modalities: feature addresses (as the
            `Distiller` takes them) for the |ΔG| column: the mean absolute
            difference between the teacher's and the student's modality Gram
            matrices on `test`. Without them |ΔG| is not measured.
        gram_normalize: the Gram normalisation of the |ΔG| column.
        teacher_test: `(x, y)` the teacher is scored on, row for row the same
            samples as `test` (default `test`); e.g. clean inputs where the
            students are scored on noisy ones.
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
    reference = _check_methods(methods, reference)
    seeds = _seeds(seeds)
    (x, y), (x_test, y_test) = _check_split("train", train), _check_split("test", test)
    x_teacher, y_teacher = _check_split(
        "teacher_test", teacher_test or (x_test, y_test)
    )
    validation = _check_validation(validation)
    optimizer = optimizer or (lambda: keras.optimizers.Adam(1e-3))
    loss = loss or (
        lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )

    score = _Scoring(
        teacher,
        (x_test, y_test),
        (x_teacher, y_teacher),
        modalities,
        (teacher_modalities, student_modalities),
        gram_normalize,
    )
    runs = {name: MethodResult(name) for name in methods}
    students = {}
    for seed in seeds:
        keras.utils.set_random_seed(seed)
        initial = build_student().get_weights()
        for name, method in methods.items():
            keras.utils.set_random_seed(seed)
            student = build_student()
            student.set_weights(initial)
            trainer = _trainer(teacher, student, method, distiller_kwargs)
            task_loss = loss()
            metrics = None
            if validation is not None:
                ignore = getattr(task_loss, "ignore_class", None)
                metrics = [_LabelledAccuracy(ignore)]
            trainer.compile(
                optimizer(), task_loss, metrics=metrics, jit_compile=jit_compile
            )
            batches = SeededBatches(x, y, batch_size, steps_per_epoch, seed=seed)
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
            report, gap = score(student)
            runs[name].add(seed, report, gap, seconds, student.count_params(), history)
            if keep_students:
                students[(name, seed)] = student
            if on_run_end is not None:
                on_run_end(name, seed, report.accuracy)
    return StudyResult(
        methods=runs,
        reference=reference,
        teacher_accuracy=score.teacher.accuracy,
        teacher_dropped=dict(score.teacher.dropped),
        teacher_params=teacher.count_params(),
        config={
            "seeds": seeds,
            "epochs": epochs,
            "batch_size": batch_size,
            "steps_per_epoch": len(SeededBatches(x, y, batch_size, steps_per_epoch)),
            "n_train": len(y),
            "n_test": len(y_test),
            "gram_normalize": gram_normalize,
            "backend": keras.backend.backend(),
        },
        students=students,
    )
