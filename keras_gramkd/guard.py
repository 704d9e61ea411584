"""The step's guard: which rows of a batch a training step can use.

A row is bad when anything it feeds a loss is not a number the step can use:
an input a network reads, its label or weight, a `modality_mask` value, a
network's output or feature, a cached teacher target, or its task loss (see
`keras_gramkd.distiller`). `StepGuard` decides this once per step, in two
phases around the networks' forward passes:

1. `clean_inputs` (in `call`, before the student's forward pass): the rows
   whose inputs are finite, and the batch with the others zeroed, so that no
   NaN reaches the student's gradient;
2. `data_rows`, `teacher_batch` and `output_rows` (in `compute_loss`): the
   rows the labels, weights and mask allow, the teacher's inputs with the bad
   rows zeroed, and the rows whose outputs came out finite.

The primitives it combines (`finite_samples`, `where_samples`, ...) are in
`keras_gramkd.bad_samples`.
"""

from keras_gramkd.bad_samples import (
    MODALITY_MASK_KEY,
    both,
    finite_rows,
    finite_samples,
    is_float_tensor,
    mask_values_ok,
    valid_labels,
    where_samples,
    zero_bad_samples,
)


class StepGuard:
    """Decides the good rows of a Distiller's step and cleans its batch.

    Args:
        teacher, student: the `keras_gramkd.network.Network`s.
        checks_mask: True when the step reads a `modality_mask` (some term
            uses it), whose values must then be 0 or 1.
    """

    def __init__(self, teacher, student, checks_mask):
        self.teacher, self.student = teacher, student
        self.checks_mask = checks_mask

    def clean_inputs(self, x):
        """(ok, x): the rows whose student inputs are finite (None: no float
        input), and `x` with the student's float inputs of the other rows
        zeroed (the rest of a dict batch is cleaned in `compute_loss`, once
        the good rows are known)."""
        ok = finite_samples(self.student.select_inputs(x))
        if ok is None:
            return ok, x
        keys = self.student.input_keys(x)
        if keys is None:
            return ok, zero_bad_samples(x, ok)
        return ok, {**x, **zero_bad_samples({key: x[key] for key in keys}, ok)}

    def data_rows(self, x, y, y_pred, sample_weight, task, teacher_runs, inputs_ok):
        """(batch,) bool (or None: nothing to check) from the batch's data: the
        inputs the networks read, the mask values, the labels, the weights,
        the student's logits.

        `task`: the `TaskLoss` when the task loss is on, else None.
        `inputs_ok`: the rows `clean_inputs` kept (None where it did not run);
        then only the inputs the teacher alone reads are checked here.
        """
        student_keys = self.student.input_keys(x)
        if inputs_ok is None or student_keys is None:
            ok = finite_samples(self.student.select_inputs(x))
        else:
            ok = inputs_ok
        if teacher_runs:
            teacher_x = self.teacher.select_inputs(x)
            teacher_keys = self.teacher.input_keys(x)
            if inputs_ok is not None and None not in (student_keys, teacher_keys):
                teacher_x = [x[k] for k in teacher_keys if k not in student_keys]
            ok = both(ok, finite_samples(teacher_x))
        mask = x.get(MODALITY_MASK_KEY) if isinstance(x, dict) else None
        if mask is not None and self.checks_mask:
            ok = both(ok, mask_values_ok(mask))
        if task is not None and y is not None:
            is_sparse, ignore_class = task.class_range()
            n_classes = y_pred.shape[-1] if is_sparse else None
            ok = both(ok, valid_labels(y, n_classes, ignore_class))
        if sample_weight is not None:
            ok = both(ok, finite_rows(sample_weight))
        return both(ok, finite_rows(y_pred))

    def teacher_batch(self, x, ok, inputs_ok, cleaned):
        """The teacher's inputs with the bad rows zeroed; where it reads the
        student's keys, the inputs `clean_inputs` cleaned (`cleaned`)."""
        t_keys, s_keys = (n.input_keys(x) for n in (self.teacher, self.student))
        if inputs_ok is None or t_keys is None or s_keys is None:
            return zero_bad_samples(self.teacher.select_inputs(x), ok)
        batch = {}
        for key in t_keys:
            if key in s_keys:
                batch[key] = cleaned[key]
            elif is_float_tensor(x[key]):
                batch[key] = where_samples(ok, x[key])
            else:
                batch[key] = x[key]
        return self.teacher.select_inputs(batch)

    @staticmethod
    def output_rows(ok, student_features, teacher, cached):
        """`ok` and'ed with "the student's features, and the teacher's outputs
        or the cached targets, are finite"."""
        ok = both(ok, finite_samples(student_features))
        return both(ok, finite_samples(teacher if cached is None else cached))
