"""`Distiller`: a `keras.Model` that trains a student from a frozen teacher.

One training step combines the task loss with a list of distillation terms
(`keras_gramkd.terms`), each with its own non-negative weight:

    loss = task_weight · task_loss          (the compiled loss on the labels)
         + Σ term.weight · <term>_loss      (KD, modality Gram at any depth, ...)
         + the student's regularisation losses

The short form (`kd_weight`, `gram_weight`, `temperature`, `gram_loss`) is the
terms `KDTerm` "kd" and `GramTerm` "gram". The combination lives in
`compute_loss`, which the `train_step` and `test_step` of every Keras backend
call, so one implementation serves TensorFlow, JAX and PyTorch. `call` runs
the student once and returns its logits; the features every term reads, from
anywhere in nested encoders, come out of that same call and are handed to
`compute_loss`, so each network runs exactly one forward pass per step.

Besides the networks' inputs, a dict batch may carry these keys:

- `"modality_mask"` (`MODALITY_MASK_KEY`): (batch, M) 0/1, which modalities a
  sample has, in the order of `Distiller.modality_names`. The Gram terms then
  average over present pairs only; the task and KD losses are unaffected.
- `"teacher/<term>/<key>"` (`keras_gramkd.terms.target_key`): teacher targets
  computed once by `keras_gramkd.cache`; when they are in the batch the
  teacher does not run.

A training sample is bad when an input a network reads holds NaN or inf,
its label is not a class (for sparse categorical cross-entropy: not an integer
in [0, classes) nor the loss's `ignore_class`; for any loss: a NaN float
label), its sample or class weight is NaN or inf, a `modality_mask` value is
not 0 or 1, or a network's output, a feature, a teacher target or its task
loss comes out NaN or inf (an overflow inside a network). It is left out of
the step: its inputs are zeroed, every value of it is replaced by 0 with
`where` (so no NaN·0 reaches the gradient) and its weight is 0; it is counted
in the `skipped_samples` metric and, in `evaluate`, left out of the compiled
metrics. With `on_bad_sample="raise"` (the default) `fit` then stops with an
error after that step; with `"skip"` it goes on. (An overflow inside the
student's own layers is counted too, but its backward pass is NaN already: see
docs/guide/bad-input.md.) `on_bad_sample="unchecked"` leaves this guard out of
the step.

Every loss value is Keras' "sum_over_batch_size": sum(w · per-sample loss) /
batch size, for the task loss and every term alike.

This module is the `Distiller` class; its step reads top to bottom in
`compute_loss`. The parts it calls live in `guard` (which rows a step can
use), `bad_samples` (leaving them out), `task_loss` (the compiled loss) and
`term_list` (the terms and their features).
"""

from typing import NamedTuple

import keras
from keras import ops

# Imported for its registrations: a Distiller saved with relational terms
# (SPTerm, ...) loads wherever the Distiller class does.
from keras_gramkd import relational  # noqa: F401
from keras_gramkd.bad_samples import (
    EMPTY_DATA_MESSAGE,
    MODALITY_MASK_KEY,
    DataGuard,
    SkippedRows,
    check_arrays,
    check_mask_values,
    is_empty_source,
    where_samples,
)
from keras_gramkd.checks import check_choice
from keras_gramkd.guard import StepGuard
from keras_gramkd.jax_recovery import VariableKeeper
from keras_gramkd.network import (
    Network,
    check_logits_layer,
    check_separate,
    symbolic_output,
)
from keras_gramkd.replicas import (
    check_strategy,
    scale_for_replicas,
    unscale_for_replicas,
)
from keras_gramkd.task_loss import TaskLoss
from keras_gramkd.term_list import (
    ActiveTerms,
    LeftOutTermsGuard,
    check_terms,
    short_form_terms,
)
from keras_gramkd.terms import check_weight, target_key

__all__ = ["BAD_SAMPLE_POLICIES", "MODALITY_MASK_KEY", "Distiller"]

BAD_SAMPLE_POLICIES = ("raise", "skip", "unchecked")


class _StudentPass(NamedTuple):
    """The student's forward pass of a step, as `call` made it."""

    logits: object
    features: dict
    mask: object
    inputs_ok: object  # the rows `StepGuard.clean_inputs` kept, or None
    inputs: object  # the batch as the student read it


class _StepState:
    """What one step hands on between Keras' hooks, explicitly.

    Keras' train and test steps call `call`, then `compute_loss` on its output,
    then `compute_metrics`, in that order and within one trace, on every
    backend. `call` leaves the student's forward pass here and `compute_loss`
    takes it, so that the features come from the same pass as the logits;
    `compute_loss`, the one hook that knows the good rows, updates the metrics
    and marks them updated, so that `compute_metrics` only reads them. Plain
    Python values: Keras does not track this object.
    """

    def __init__(self):
        self.student = None
        self.metrics_updated = False

    def take_student(self):
        student, self.student = self.student, None
        return student

    def take_metrics_updated(self):
        updated, self.metrics_updated = self.metrics_updated, False
        return updated


class _StepMetrics(keras.metrics.Metric):
    """The Distiller's own metrics as one: the mean of each loss, weighted by
    the batch size as Keras' loss tracker weighs its batches, and the count of
    skipped samples. One update per step for all of them (a metric per value
    costs several operations per update and per result)."""

    def __init__(self, loss_names, counts_skipped=True, name="distiller_metrics"):
        super().__init__(name=name)
        self.loss_names = list(loss_names)
        self.counts_skipped = counts_skipped
        self.totals = self.add_variable(
            shape=(len(self.loss_names),), initializer="zeros", name="totals"
        )
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")
        self.skipped = self.add_variable(
            shape=(), initializer="zeros", name="skipped_samples"
        )

    def update_state(self, losses, batch, skipped):
        """`losses`: the float32 scalars in the order of `loss_names`."""
        if self.loss_names:
            self.totals.assign_add(ops.stack(losses) * batch)
        self.count.assign_add(batch)
        self.skipped.assign_add(skipped)

    def result(self):
        means = self.totals / ops.maximum(self.count, 1.0)  # count: 0 or ≥ 1
        results = {name: means[i] for i, name in enumerate(self.loss_names)}
        if not self.counts_skipped:
            return results
        return {**results, "skipped_samples": ops.cast(self.skipped, self.dtype)}


@keras.saving.register_keras_serializable(package="keras_gramkd")
class Distiller(keras.Model):
    """Distils a frozen multi-modal teacher into a student.

    Args:
        teacher: trained `keras.Model` that outputs class logits. It is frozen
            and runs in inference mode, outside the gradient.
        student: `keras.Model` to train; outputs class logits.
        teacher_modalities: short form: dict modality name -> address of the
            teacher's embedding of that modality (a layer name, a path
            `"pix_encoder/embed"` into nested models, a layer object, or a
            `Feature` with its token pooling), or one address whose output is
            already (batch, M, d). Needed when `gram_weight > 0`.
        student_modalities: the same for the student. Modalities align by name;
            the student may use a subset of the teacher's.
        task_weight: weight of the compiled loss on the labels.
        kd_weight: short form: weight of the logit KD term (default 1).
        gram_weight: short form: weight of the modality Gram term (default 1).
        temperature: short form: KD softening temperature (default 4).
        gram_loss: short form: the Gram loss; default `ModalityGram()`.
        terms: instead of the short form, a list of `DistillationTerm`s
            (`KDTerm`, `GramTerm` at one or more depths, your own), each with
            its own weight and `<name>_loss` metric. The short form is
            `[KDTerm(temperature, kd_weight, name="kd"),
            GramTerm(teacher_modalities, student_modalities, gram_weight,
            gram_loss, name="gram")]`, and the Distiller keeps no copy of
            its settings: `distiller.kd_weight`, `gram_weight` (both
            settable) and `temperature` read the terms named "kd" and
            "gram". A term's weight may change after the build (between
            fits, or in a callback) and the step follows it; a term whose
            weight is 0 at the build is left out of the step, and giving it a
            weight later is an error at the next epoch, `fit` or `evaluate`.
        student_mask_layer: optional address of a student layer that outputs a
            (batch, M) modality mask, such as
            `ModalityDropout(rate, return_mask=True)`: the Gram terms then
            leave out the pairs of the modalities it dropped.
        on_bad_sample: `"raise"` (default) stops `fit` with an error after a
            step that met a bad sample (NaN/inf inputs, weights or outputs,
            a label that is not a class; see the module docstring);
            `"skip"` leaves such samples out and goes on. Either way
            they are counted in the `skipped_samples` metric and never reach
            the weights. `"unchecked"` is the step without this guard, for
            data known to be clean: the fewest operations per step, the same
            values on clean data, no `skipped_samples` metric; a bad sample
            then reaches the loss and the weights, and `fit` stops with an
            error (docs/guide/bad-input.md).
        **kwargs: `keras.Model` arguments (`name`, `dtype`).

    Inputs: a dict of arrays (each network gets the keys its inputs declare,
    plus the optional batch keys of this module's docstring), or whatever both
    networks take. `call` and `predict` return the student's logits. Metrics
    `task_loss` and `<term>_loss` (unweighted) join `loss` in `fit` and
    `evaluate` for every term whose weight is not 0.

    Example:

    >>> import keras, numpy as np
    >>> def net(prefix, width):
    ...     a = keras.Input((4,), name="a")
    ...     b = keras.Input((6,), name="b")
    ...     ea = keras.layers.Dense(width, name=f"{prefix}_a")(a)
    ...     eb = keras.layers.Dense(width, name=f"{prefix}_b")(b)
    ...     logits = keras.layers.Dense(3)(keras.layers.Concatenate()([ea, eb]))
    ...     return keras.Model({"a": a, "b": b}, logits)
    >>> distiller = Distiller(
    ...     teacher=net("t", 16), student=net("s", 4),
    ...     teacher_modalities={"a": "t_a", "b": "t_b"},
    ...     student_modalities={"a": "s_a", "b": "s_b"},
    ... )
    >>> distiller.compile(
    ...     optimizer="adam",
    ...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ... )
    >>> x = {"a": np.ones((8, 4), "float32"), "b": np.ones((8, 6), "float32")}
    >>> history = distiller.fit(x, np.zeros(8, "int32"), epochs=1, verbose=0)
    >>> sorted(history.history)
    ['gram_loss', 'kd_loss', 'loss', 'skipped_samples', 'task_loss']
    """

    def __init__(
        self,
        teacher,
        student,
        teacher_modalities=None,
        student_modalities=None,
        task_weight=1.0,
        kd_weight=None,
        gram_weight=None,
        temperature=None,
        gram_loss=None,
        terms=None,
        student_mask_layer=None,
        on_bad_sample="raise",
        **kwargs,
    ):
        super().__init__(**kwargs)
        for role, model in (("teacher", teacher), ("student", student)):
            if not isinstance(model, keras.Model):
                raise TypeError(
                    f"{role} must be a keras.Model; got {type(model).__name__}."
                )
        self.task_weight = check_weight("task_weight", task_weight)
        check_choice("on_bad_sample policy", on_bad_sample, BAD_SAMPLE_POLICIES)
        self.on_bad_sample = on_bad_sample
        check_separate(teacher, student)
        for role, model in (("teacher", teacher), ("student", student)):
            check_logits_layer(model, role)
        self._check_classes(teacher, student)

        short_form = {
            "teacher_modalities": teacher_modalities,
            "student_modalities": student_modalities,
            "kd_weight": kd_weight,
            "gram_weight": gram_weight,
            "temperature": temperature,
            "gram_loss": gram_loss,
        }
        given = [key for key, value in short_form.items() if value is not None]
        if terms is not None and given:
            raise ValueError(
                f"Pass either terms=[...] or the short form, not both: got "
                f"terms and {given}. Put these settings in the terms, e.g. "
                "KDTerm(temperature=4.0, weight=1.0), GramTerm("
                "teacher_features, student_features, weight=1.0)."
            )
        if terms is None:
            terms = short_form_terms(**short_form)
        self.terms = check_terms(terms)
        self.student_mask_layer = student_mask_layer

        teacher.trainable = False
        self.teacher = teacher
        self.student = student
        self._teacher = Network(teacher, "teacher")
        self._student = Network(student, "student")
        self._active = ActiveTerms(
            self.terms, self._teacher, self._student, student_mask_layer
        )
        self.modality_names = self._active.modality_names

        task_metric = ["task_loss"] if self.task_weight > 0 else []
        checked = on_bad_sample != "unchecked"
        self.step_metrics = _StepMetrics(
            task_metric + [f"{term.name}_loss" for term in self._active],
            counts_skipped=checked,
        )
        self._guard = (
            StepGuard(
                self._teacher, self._student, checks_mask=bool(self.modality_names)
            )
            if checked
            else None
        )
        self._step = _StepState()
        self._task = TaskLoss(None)  # set by compile
        self._compiled_metrics = False
        # One instance: a layer made inside a step breaks torch.compile and
        # costs a layer construction per step.
        self._skipped_rows = SkippedRows(name="skipped_rows")
        if teacher.built and student.built:
            self.built = True

    def _term(self, name, setting):
        for term in self.terms:
            if term.name == name:
                return term
        # Not AttributeError: PyTorch's Module.__getattr__ would replace the
        # message with its own.
        raise ValueError(
            f"This Distiller has no term named {name!r} (its terms: "
            f"{[term.name for term in self.terms]}), so it has no {setting}. "
            "Read or set the term's own value, e.g. distiller.terms[0].weight."
        )

    @property
    def kd_weight(self):
        """The weight of the term named "kd" (the short form's KD term)."""
        return self._term("kd", "kd_weight").weight

    @kd_weight.setter
    def kd_weight(self, value):
        self._term("kd", "kd_weight").weight = value

    @property
    def gram_weight(self):
        """The weight of the term named "gram" (the short form's Gram term)."""
        return self._term("gram", "gram_weight").weight

    @gram_weight.setter
    def gram_weight(self, value):
        self._term("gram", "gram_weight").weight = value

    @property
    def temperature(self):
        """The temperature of the term named "kd", fixed at construction."""
        return self._term("kd", "temperature").temperature

    @temperature.setter
    def temperature(self, value):
        self._term("kd", "temperature").temperature = value  # raises with a fix

    @staticmethod
    def _check_classes(teacher, student):
        t_out, s_out = (
            symbolic_output(m, r)
            for m, r in ((teacher, "teacher"), (student, "student"))
        )
        if t_out is None or s_out is None:
            return
        t_classes, s_classes = t_out.shape[-1], s_out.shape[-1]
        if t_classes is not None and s_classes is not None and t_classes != s_classes:
            raise ValueError(
                f"The teacher outputs {t_classes} classes but the student outputs "
                f"{s_classes}; both must predict the same classes (give the "
                f"student a final Dense({t_classes}))."
            )

    def compile(self, optimizer="rmsprop", loss=None, *args, **kwargs):
        """`keras.Model.compile`; `loss` is the task loss on the student's
        logits (one loss: the student has one output), weighed by
        `task_weight` (so `loss_weights` is refused)."""
        if kwargs.get("loss_weights") is not None:
            raise ValueError(
                "The Distiller weighs its task loss by task_weight; build it with "
                "task_weight=... instead of passing loss_weights to compile."
            )
        self._task = TaskLoss(loss)
        metrics = kwargs.get("metrics", args[1] if len(args) > 1 else None)
        weighted = kwargs.get("weighted_metrics", args[2] if len(args) > 2 else None)
        self._compiled_metrics = bool(metrics or weighted)
        self._check_metric_names(metrics, weighted)
        # Keras itself gets no loss: compute_loss applies the task loss, and a
        # compiled loss Keras never calls would stay unbuilt and cost a
        # symbolic build at every fit.
        super().compile(optimizer, None, *args, **kwargs)

    def _check_metric_names(self, *metric_lists):
        """Refuses a compiled metric named like one of the Distiller's own,
        which would replace it in the history."""
        own = {"loss", "skipped_samples", "task_loss"}
        own.update(f"{term.name}_loss" for term in self._active)
        for metric in keras.tree.flatten([m for m in metric_lists if m]):
            name = getattr(metric, "name", getattr(metric, "__name__", metric))
            if name in own:
                raise ValueError(
                    f"A compiled metric is named {name!r}, like one of the "
                    "Distiller's own metrics, so the history would keep only "
                    f"one of them. Give it another name, e.g. name='my_{name}'."
                )

    def get_compile_config(self):
        """`keras.Model.get_compile_config`, with the task loss given."""
        config = super().get_compile_config()
        if config is not None:
            config["loss"] = keras.saving.serialize_keras_object(self._task.given)
        return config

    def compile_from_config(self, config):
        """Compiles from a saved file's config, as `keras.Model` does for
        models that keep its `compile` (Keras skips models that override it)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        **kwargs,
    ):
        """`keras.Model.fit`, plus the data checks described in the class."""
        check_strategy(self)
        self._active.check_left_out()
        check_arrays(x, y)
        check_mask_values(x)
        if is_empty_source(x):
            raise ValueError(EMPTY_DATA_MESSAGE)
        keeper = VariableKeeper(self)
        guard = DataGuard(self.on_bad_sample, [term.name for term in self._active])
        fit = super().fit
        try:
            return keeper.run(
                lambda extra: fit(
                    x,
                    y,
                    batch_size=batch_size,
                    epochs=epochs,
                    verbose=verbose,
                    callbacks=[
                        *(callbacks or []),
                        guard,
                        LeftOutTermsGuard(self._active),
                        *extra,
                    ],
                    **kwargs,
                )
            )
        except StopIteration:  # JAX's trainer peeks at a first batch
            raise ValueError(EMPTY_DATA_MESSAGE) from None
        except UnboundLocalError:  # JAX's trainer after an epoch of no step
            if guard.epochs_begun and not guard.batches:
                raise ValueError(EMPTY_DATA_MESSAGE) from None
            raise

    def evaluate(
        self,
        x=None,
        y=None,
        batch_size=None,
        verbose="auto",
        sample_weight=None,
        steps=None,
        callbacks=None,
        return_dict=False,
        **kwargs,
    ):
        """`keras.Model.evaluate`, plus the `modality_mask` value check."""
        check_strategy(self)
        self._active.check_left_out()
        check_mask_values(x)
        evaluate = super().evaluate

        def run(callbacks):
            return evaluate(
                x,
                y,
                batch_size=batch_size,
                verbose=verbose,
                sample_weight=sample_weight,
                steps=steps,
                callbacks=callbacks,
                return_dict=return_dict,
                **kwargs,
            )

        if isinstance(callbacks, keras.callbacks.CallbackList):
            return run(callbacks)  # fit's validation, under fit's VariableKeeper
        return VariableKeeper(self).run(lambda extra: run([*(callbacks or []), *extra]))

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
        """`keras.Model.predict`: the student's logits."""
        predict = super().predict
        return VariableKeeper(self).run(
            lambda extra: predict(
                x,
                batch_size=batch_size,
                verbose=verbose,
                steps=steps,
                callbacks=[*(callbacks or []), *extra],
            )
        )

    def call(self, inputs, training=None):
        if inputs is None:  # torch's trainer builds on a missing first batch
            raise ValueError(
                f"The Distiller got no inputs (None). {EMPTY_DATA_MESSAGE}"
            )
        if not self.teacher.built:
            # A subclassed teacher builds on its first call: here, in Keras'
            # symbolic build, not inside a traced step (where on JAX its new
            # variables would have no value).
            self._teacher.forward(inputs, False)
        inputs_ok = None
        if training and self._guard is not None:
            # Cleaned before the forward pass: no NaN reaches the gradient.
            inputs_ok, inputs = self._guard.clean_inputs(inputs)
        logits, features, mask = self._student.forward(inputs, training)
        self._step.student = _StudentPass(logits, features, mask, inputs_ok, inputs)
        self._step.metrics_updated = False
        return logits

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """The step's loss, from the batch to the weighted sum of its parts.

        Keras' steps give the `y_pred` of this Distiller's `call` on `x`, whose
        forward pass (features included) is used here; with `y_pred=None` the
        student runs here. Updates every metric, compiled ones included, with
        the bad rows left out.
        """
        # 1. The student's forward pass, made by call (Keras calls it first).
        student = self._step.take_student()
        if student is None:
            logits = self(x, training=training)
            student = self._step.take_student()
            y_pred = logits if y_pred is None else y_pred
        if y is not None and keras.backend.standardize_dtype(y.dtype) == "bool":
            y = ops.cast(y, "float32")  # as Keras' losses take them
        if sample_weight is not None:
            sample_weight = ops.cast(sample_weight, "float32")

        # 2. The guard: the rows the data allows; the teacher's forward pass
        # (unless its targets are cached) on them; the rows whose outputs and
        # task loss came out finite. Unchecked, every row is kept (ok None).
        task = self._task if self.task_weight > 0 else None
        cached = self._active.cached_targets(x)
        teacher_runs = cached is None and bool(self._active)
        guard, ok, values, teacher = self._guard, None, None, None
        if guard is not None:
            ok = guard.data_rows(
                x, y, y_pred, sample_weight, task, teacher_runs, student.inputs_ok
            )
        if teacher_runs:
            batch = (
                self._teacher.select_inputs(x)
                if guard is None
                else guard.teacher_batch(x, ok, student.inputs_ok, student.inputs)
            )
            teacher = self._teacher.forward(batch, training=False)[:2]
        if guard is not None:
            ok = guard.output_rows(ok, student.features, teacher, cached)
            if task is not None and y is not None:
                ok, values = task.check_rows(y, y_pred, ok)

        # 3. The bad rows left out with where() (never NaN·0) and weight 0.
        def drop(tree):
            if tree is None or ok is None:
                return tree
            return keras.tree.map_structure(lambda v: where_samples(ok, v), tree)

        weight = sample_weight
        if ok is not None:
            if isinstance(x, dict) and x.get(MODALITY_MASK_KEY) is not None:
                # The only key of x read below (inputs went to the networks).
                mask = where_samples(ok, x[MODALITY_MASK_KEY])
                x = {**x, MODALITY_MASK_KEY: mask}
            # 1/C, not 0: a skipped row must give a finite loss even where the
            # task loss takes probabilities (0/0 in a from_logits=False CE).
            y_pred = where_samples(ok, y_pred, fill=1.0 / y_pred.shape[-1])
            weight = (
                ops.cast(ok, "float32")
                if sample_weight is None
                else where_samples(ok, sample_weight)
            )

        # 4. The task loss and each term's, weighted and summed.
        weights, losses = [], []
        if task is not None:
            weights.append(self.task_weight)
            losses.append(task(y, y_pred, weight, ok, values))
        if self._active:
            weights.extend(term.loss_weight.variable for term in self._active)
            losses.extend(
                self._active.losses(
                    x,
                    (y_pred, drop(student.features)),
                    student.mask,
                    weight,
                    drop(teacher),
                    drop(cached),
                    guard_gradients=self._guard is not None,
                )
            )
        losses = [ops.cast(value, "float32") for value in losses]
        weighted = [w * value for w, value in zip(weights, losses, strict=True)]
        total = weighted[0] if weighted else ops.zeros((), dtype="float32")
        for value in weighted[1:]:
            total = total + value
        for extra in self.losses:  # the student's regularisation losses
            # Summed and scaled for replicas, as Keras' TensorFlow trainer does.
            total = total + scale_for_replicas(ops.sum(ops.cast(extra, "float32")))

        # 5. The metrics, on the good rows.
        self._update_step_metrics(losses, ok, y_pred)
        if self._compiled_metrics:
            self._update_compiled_metrics(x, y, y_pred, sample_weight, ok)
        return total

    def _update_step_metrics(self, losses, ok, y_pred):
        """Adds the step's losses and skipped samples to `step_metrics`.

        Every loss is Keras' sum(w · loss) / batch; each batch weighs by its
        size, as in Keras' own loss tracker, so that evaluate's task_loss
        equals student.evaluate's loss. Under tf.distribute every value is
        already divided by the replica count (Keras' convention: summed
        replica gradients are the global batch's); the metrics report the
        undivided values, as Keras' do.
        """
        batch = ops.cast(ops.shape(y_pred)[0], "float32")
        skipped = 0.0 if ok is None else batch - ops.sum(ops.cast(ok, "float32"))
        self.step_metrics.update_state(
            [unscale_for_replicas(value) for value in losses], batch, skipped
        )

    def _update_compiled_metrics(self, x, y, y_pred, sample_weight, ok):
        """Updates Keras' compiled metrics with the skipped rows left out
        (weight 0, and a Keras mask that unweighted metrics honour); every
        row where `ok` is None (the unchecked step)."""
        if ok is not None:
            y_pred = self._skipped_rows((y_pred, ok))
            if y is not None:
                y = keras.tree.map_structure(lambda v: where_samples(ok, v), y)
            sample_weight = (
                ops.cast(ok, "float32")
                if sample_weight is None
                else where_samples(ok, sample_weight)
            )
        super().compute_metrics(x, y, y_pred, sample_weight)
        self._step.metrics_updated = True

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """The metrics' results. In a step they were updated by
        `compute_loss`, which knows the rows it left out; called on its own
        (Keras' symbolic build, or by you), it updates them as Keras does."""
        if self._step.take_metrics_updated() or not self._compiled_metrics:
            return self.get_metrics_result()
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def teacher_targets(self, x):
        """What the terms need from the teacher for the batch `x`.

        Returns a dict batch key (`"teacher/<term>/<key>"`) -> per-sample
        tensor, for every term whose weight is not 0, formed as the terms form
        them (with the batch's `modality_mask`). `keras_gramkd.cache` stores
        these so that training need not run the teacher.
        """
        logits, features, _ = self._teacher.forward(x, training=False)
        mask = self._active.batch_mask(x, None) if self.modality_names else None
        targets = self._active.teacher_targets((logits, features), mask)
        return {
            target_key(name, key): value
            for name, term_targets in targets.items()
            for key, value in term_targets.items()
        }

    def target_settings(self):
        """What cached targets depend on besides the teacher's weights."""
        return {term.name: term.target_settings() for term in self._active}

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        config = {
            **super().get_config(),
            "teacher": serialize(self.teacher),
            "student": serialize(self.student),
            "task_weight": self.task_weight,
            "student_mask_layer": self.student_mask_layer,
            "on_bad_sample": self.on_bad_sample,
        }
        return {**config, "terms": [serialize(term) for term in self.terms]}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("teacher", "student", "gram_loss"):
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects
                )
        if config.get("terms") is not None:
            config["terms"] = [
                keras.saving.deserialize_keras_object(t, custom_objects=custom_objects)
                for t in config["terms"]
            ]
        return cls(**config)

    def save(self, filepath, overwrite=True, zipped=None, **kwargs):
        """`keras.Model.save`, writing a local `.keras` file atomically.

        The file is written to a temporary file in the same directory, synced
        to disk and renamed over `filepath` (`keras_gramkd.saving.atomic_save`),
        so an error or a kill mid-write never replaces a good file with a
        truncated one. Remote paths, `zipped=False` and `overwrite=False` on an
        existing file go to Keras unchanged.
        """
        from keras_gramkd.saving import atomic_save, can_save_atomically

        save = super().save
        if zipped is False or not can_save_atomically(
            filepath, overwrite, suffix=(".keras", ".h5", ".hdf5")
        ):
            return save(filepath, overwrite=overwrite, zipped=zipped, **kwargs)
        return atomic_save(
            filepath, lambda tmp: save(tmp, overwrite=True, zipped=zipped, **kwargs)
        )

    def save_weights(self, filepath, overwrite=True, max_shard_size=None):
        """`keras.Model.save_weights`, writing a local `.weights.h5` atomically.

        As `save`: `ModelCheckpoint(save_weights_only=True)` and
        `BackupAndRestore` call it, so their weight files are never left
        half-written. Sharded saves (`max_shard_size`), remote paths and
        `overwrite=False` on an existing file go to Keras unchanged.
        """
        from keras_gramkd.saving import atomic_save, can_save_atomically

        save_weights = super().save_weights
        if max_shard_size is not None or not can_save_atomically(
            filepath, overwrite, suffix=".weights.h5"
        ):
            return save_weights(
                filepath, overwrite=overwrite, max_shard_size=max_shard_size
            )
        return atomic_save(filepath, lambda tmp: save_weights(tmp, overwrite=True))
