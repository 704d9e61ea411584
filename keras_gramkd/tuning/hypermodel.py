"""The hypermodels: Distillers sharing a teacher, built for KerasTuner.

`DistillerHyperModel` searches the short form's weights; `TermFamilyHyperModel`
one term family's settings (`search_terms`).

This module imports keras_tuner (`import_keras_tuner` names the extra to install
when it is missing); `keras_gramkd.tuning` imports it on first use of
`DistillerHyperModel`, so importing the package stays cheap.
"""

import time

import keras

from keras_gramkd.study.batches import SeededBatches
from keras_gramkd.tuning.search import (
    StudentCheckpointDistiller,
    check_objective,
    import_keras_tuner,
    objective_name,
)
from keras_gramkd.tuning.space import (
    declare_loss_hyperparameters,
    resolve_search_space,
)

kt = import_keras_tuner()


def _fresh(metric):
    """A new metric object with `metric`'s config (each trial needs its own)."""
    if isinstance(metric, str):
        return metric
    return metric.__class__.from_config(metric.get_config())


class DistillerHyperModel(kt.HyperModel):
    """A `keras_tuner.HyperModel` of Distillers sharing a frozen teacher.

    Each trial builds a student with `build_student(hp)` and a compiled
    `StudentCheckpointDistiller` around the same `teacher` object (never retrained,
    copied or checkpointed). See `keras_gramkd.tuning` for the default space.

    Args:
        teacher: trained `keras.Model` (class logits), shared by all trials.
        build_student: callable ``hp -> keras.Model``; may declare its own
            hyperparameters (for example the student's width).
        teacher_modalities, student_modalities: as in `Distiller`; needed unless
            the space fixes ``gram_weight`` to 0.
        search_space: dict overriding `DEFAULT_SEARCH_SPACE` entries: a number
            fixes a value, ``(low, high)`` or ``(low, high, "log"|"linear")`` sets
            a range, a list gives choices. Unknown names raise ValueError.
        loss: task loss; default ``SparseCategoricalCrossentropy(from_logits=True)``.
        metrics: compiled metrics; ``"accuracy"`` gives the default objective.
        objective: the student metric the tuner should rank by (pass the same to
            the tuner, or use `make_tuner`); ``"loss"``/``"val_loss"`` are refused
            because the weights being tuned set the loss's scale.
        gram_loss: the Gram loss, as in `Distiller`.
        jit_compile: passed to `compile` (False is faster for tiny CPU models).

    Example:

    >>> import keras, keras_tuner as kt, numpy as np, tempfile
    >>> def net(prefix, width):
    ...     a, b = keras.Input((4,), name="a"), keras.Input((6,), name="b")
    ...     ea = keras.layers.Dense(width, name=f"{prefix}_a")(a)
    ...     eb = keras.layers.Dense(width, name=f"{prefix}_b")(b)
    ...     logits = keras.layers.Dense(3)(keras.layers.Concatenate()([ea, eb]))
    ...     return keras.Model({"a": a, "b": b}, logits, name=f"{prefix}_net")
    >>> hypermodel = DistillerHyperModel(
    ...     teacher=net("t", 16),
    ...     build_student=lambda hp: net("s", hp.Choice("width", [2, 4])),
    ...     teacher_modalities={"a": "t_a", "b": "t_b"},
    ...     student_modalities={"a": "s_a", "b": "s_b"},
    ...     search_space={"temperature": [2, 4]},
    ... )
    >>> tuner = kt.RandomSearch(hypermodel, objective="val_accuracy",
    ...     max_trials=2, directory=tempfile.mkdtemp(), seed=0)
    >>> x = {"a": np.ones((16, 4), "float32"), "b": np.ones((16, 6), "float32")}
    >>> y = np.zeros(16, "int32")
    >>> tuner.search(x, y, validation_data=(x, y), epochs=1, verbose=0)
    >>> best = tuner.get_best_models(1)[0]
    >>> best.teacher is hypermodel.teacher, best.student.name
    (True, 's_net')
    """

    def __init__(
        self,
        teacher,
        build_student,
        teacher_modalities=None,
        student_modalities=None,
        search_space=None,
        loss=None,
        metrics=("accuracy",),
        objective="val_accuracy",
        gram_loss=None,
        jit_compile="auto",
        name=None,
        tunable=True,
    ):
        super().__init__(name=name, tunable=tunable)
        if not isinstance(teacher, keras.Model):
            raise TypeError(
                f"teacher must be a keras.Model; got {type(teacher).__name__}."
            )
        if not callable(build_student):
            raise TypeError(
                "build_student must be a callable hp -> keras.Model (the student); "
                f"got {build_student!r}."
            )
        self.teacher = teacher
        self.build_student = build_student
        self.teacher_modalities = teacher_modalities
        self.student_modalities = student_modalities
        self.search_space = resolve_search_space(search_space)
        self.loss = loss
        self.metrics = list(metrics or [])
        self.objective = check_objective(objective)
        self.gram_loss = gram_loss
        self.jit_compile = jit_compile
        if self.search_space["use_gram"] != ("fixed", False) and (
            teacher_modalities is None or student_modalities is None
        ):
            raise ValueError(
                "The search space allows gram_weight > 0, which needs "
                "teacher_modalities and student_modalities; pass them, or use "
                "search_space={'gram_weight': 0}."
            )

    def distiller_config(self, hp):
        """The Distiller settings that the hyperparameters `hp` stand for.

        Declares the loss hyperparameters on a copy of `hp` (so it works on a
        trial's ``trial.hyperparameters`` and on a fresh ``HyperParameters()``,
        which gives the defaults). ``gram_weight`` is 0 when ``use_gram`` is off.

        Returns:
            dict with task_weight, kd_weight, gram_weight, temperature, learning_rate.
        """
        return declare_loss_hyperparameters(hp.copy(), self.search_space)

    def declare_hyperparameters(self, hp):
        """Declares the loss hyperparameters on `hp` (KerasTuner's hook)."""
        declare_loss_hyperparameters(hp, self.search_space)

    def build(self, hp):
        """A compiled `StudentCheckpointDistiller` around the shared teacher."""
        config = declare_loss_hyperparameters(hp, self.search_space)
        student = self.build_student(hp)
        if not isinstance(student, keras.Model):
            raise kt.errors.FatalTypeError(
                f"build_student(hp) must return a keras.Model; got {type(student)}."
            )
        learning_rate = config.pop("learning_rate")
        distiller = StudentCheckpointDistiller(
            teacher=self.teacher,
            student=student,
            teacher_modalities=self.teacher_modalities,
            student_modalities=self.student_modalities,
            gram_loss=self.gram_loss,
            **config,
        )
        loss = self.loss
        if loss is None:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        distiller.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=loss,
            metrics=[_fresh(m) for m in self.metrics],
            jit_compile=self.jit_compile,
        )
        return distiller

    def fit(self, hp, model, *args, **kwargs):
        """`model.fit`, refusing a loss objective and a search without validation."""
        for callback in kwargs.get("callbacks") or []:
            objective = getattr(callback, "objective", None)
            if objective is not None:
                try:
                    check_objective(objective)
                except ValueError as error:
                    raise kt.errors.FatalValueError(str(error)) from None
        name = objective_name(self.objective) or ""
        has_validation = kwargs.get("validation_data") is not None or kwargs.get(
            "validation_split"
        )
        if name.startswith("val_") and not has_validation:
            raise kt.errors.FatalValueError(
                f"The objective {name!r} needs validation data: pass "
                "validation_data=(x_val, y_val) (or validation_split) to search()."
            )
        return model.fit(*args, **kwargs)


class TermFamilyHyperModel(kt.HyperModel):
    """A `keras_tuner.HyperModel` of one term family's Distillers (`search_terms`).

    Every trial starts from the same initial student weights (built under
    `seed`) and trains on the same batches in the same order, so two trials
    differ only in their hyperparameters.

    Args:
        teacher: the trained teacher, shared by every trial.
        build_student: callable ``() -> keras.Model``.
        space: the family's `FamilySpace`.
        seed: the seed of the initial weights and of the batch order.
        batch_size: rows per batch.
        optimizer: callable ``() -> keras.optimizers.Optimizer``.
        loss: callable ``() -> keras.losses.Loss`` (the task loss).
        distiller_kwargs: more `Distiller` arguments.
        jit_compile: passed to `compile`.
        on_trial_end: optional callable ``(settings, history, seconds)`` after
            each trial's training.
    """

    def __init__(
        self,
        teacher,
        build_student,
        space,
        seed,
        batch_size,
        optimizer,
        loss,
        distiller_kwargs=None,
        jit_compile="auto",
        on_trial_end=None,
    ):
        super().__init__(name=space.family)
        self.teacher, self.build_student, self.space = teacher, build_student, space
        self.seed, self.batch_size = seed, batch_size
        self.optimizer, self.loss = optimizer, loss
        self.distiller_kwargs = dict(distiller_kwargs or {})
        self.jit_compile, self.on_trial_end = jit_compile, on_trial_end

    def build(self, hp):
        """A compiled `StudentCheckpointDistiller` with the family's terms."""
        terms = self.space.terms(hp)
        keras.utils.set_random_seed(self.seed)
        distiller = StudentCheckpointDistiller(
            self.teacher, self.build_student(), terms=terms, **self.distiller_kwargs
        )
        distiller.compile(
            self.optimizer(),
            self.loss(),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
            jit_compile=self.jit_compile,
        )
        return distiller

    def fit(self, hp, model, x, y, **kwargs):
        """Trains on `SeededBatches` of ``(x, y)`` drawn from the search's seed."""
        batches = SeededBatches(x, y, self.batch_size, seed=self.seed)
        start = time.perf_counter()
        history = model.fit(batches, shuffle=False, **kwargs)
        if self.on_trial_end is not None:
            seconds = time.perf_counter() - start
            self.on_trial_end(self.space.settings(hp), history, seconds)
        return history
