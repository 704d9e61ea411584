"""An error inside `fit`, `evaluate` or `predict` leaves the teacher and the
student usable with the values they had (on JAX, Keras detaches variable
values while a loop runs), and a term whose loss is not finite stops `fit`
before its gradient reaches the student."""

import keras
import numpy as np
import pytest
from helpers import make_data, make_net, modality_map, sparse_ce, to_np, value_and_grad
from keras import ops

from keras_gramkd import DistillationTerm, Distiller, KDTerm
from keras_gramkd import ops as kd_ops


class BrokenTerm(DistillationTerm):
    """A user's term with a bug in its loss."""

    def loss(self, targets, student, sample_weight=None, mask=None):
        raise RuntimeError("a bug in the user's term")


def _short_form(teacher, student, **kwargs):
    return Distiller(teacher, student, modality_map("t"), modality_map("s"), **kwargs)


def _nan_in_second_batch(x):
    x = {key: value.copy() for key, value in x.items()}
    x["a"][10] = np.nan
    return x


CASES = {
    # first step: the step is traced after Keras detached the values on JAX
    "a bug in a user's term": (
        lambda t, s: Distiller(t, s, terms=[KDTerm(), BrokenTerm(name="broken")]),
        lambda d, x, y: d.fit(x, y, batch_size=8, verbose=0),
        RuntimeError,
        "a bug in the user's term",
    ),
    "a modality mask of the wrong width": (
        _short_form,
        lambda d, x, y: d.fit(
            {**x, "modality_mask": np.ones((len(y), 2), "float32")}, y, verbose=0
        ),
        ValueError,
        r"'modality_mask'.*\(batch, 3\)",
    ),
    "evaluate with a bug in a user's term": (
        lambda t, s: Distiller(t, s, terms=[BrokenTerm(name="broken")]),
        lambda d, x, y: d.evaluate(x, y, batch_size=8, verbose=0),
        RuntimeError,
        "a bug in the user's term",
    ),
    # a later step: a NaN input in the second batch stops fit
    "a NaN input in the second batch": (
        _short_form,
        lambda d, x, y: d.fit(
            _nan_in_second_batch(x), y, batch_size=8, shuffle=False, verbose=0
        ),
        ValueError,
        "have NaN or inf inputs",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_networks_survive_an_error(case):
    build, call, error, message = CASES[case]
    keras.utils.set_random_seed(0)
    x, y = make_data(32)
    teacher, student = make_net("t", 8), make_net("s", 4)
    teacher_before = teacher.predict(x, verbose=0)
    distiller = build(teacher, student)
    distiller.compile(optimizer="adam", loss=sparse_ce())
    with pytest.raises(error, match=message):
        call(distiller, x, y)
    np.testing.assert_array_equal(teacher.predict(x, verbose=0), teacher_before)
    assert all(np.all(np.isfinite(to_np(w))) for w in student.weights)
    # The distiller, and a new one on the same teacher, still train.
    clean = _short_form(teacher, make_net("s", 4))
    for model in (distiller, clean):
        model.compile(optimizer="adam", loss=sparse_ce())
    clean.fit(x, y, batch_size=16, verbose=0)
    assert np.isfinite(distiller.predict(x, verbose=0)).all()


def test_a_first_step_error_leaves_the_student_as_it_was():
    x, y = make_data(16)
    teacher, student = make_net("t", 8), make_net("s", 4)
    before = [to_np(w) for w in student.weights]
    distiller = Distiller(teacher, student, terms=[BrokenTerm(name="broken")])
    distiller.compile(optimizer="adam", loss=sparse_ce())
    with pytest.raises(RuntimeError):
        distiller.fit(x, y, verbose=0)
    for old, new in zip(before, student.weights, strict=True):
        np.testing.assert_array_equal(to_np(new), old)


def test_predict_with_a_missing_input_keeps_the_networks():
    x, _ = make_data(8)
    teacher, student = make_net("t", 8), make_net("s", 4)
    distiller = _short_form(teacher, student)
    expected = student.predict(x, verbose=0)
    with pytest.raises(ValueError, match=r"The student expects input\(s\) \['c'\]"):
        distiller.predict({"a": x["a"], "b": x["b"]}, verbose=0)
    np.testing.assert_allclose(distiller.predict(x, verbose=0), expected, atol=1e-6)


class NaNTerm(DistillationTerm):
    """A user's term whose loss is NaN for finite inputs."""

    def loss(self, targets, student, sample_weight=None, mask=None):
        return ops.mean(student.logits) * np.float32("nan")


class OverflowTerm(DistillationTerm):
    """A user's term whose loss overflows float32 (inf) for finite inputs."""

    def loss(self, targets, student, sample_weight=None, mask=None):
        return self.reduce(ops.square(student.logits * 1e30), sample_weight)


@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize(
    "term, name",
    [
        (lambda: NaNTerm(name="nan_term"), "nan_term"),
        (lambda: OverflowTerm(name="overflow"), "overflow"),
    ],
)
def test_a_term_with_a_non_finite_loss_stops_fit_and_the_student_stays_finite(
    policy, term, name
):
    x, y = make_data(32)
    teacher, student = make_net("t", 8), make_net("s", 4)
    terms = [KDTerm(), term()]
    distiller = Distiller(teacher, student, terms=terms, on_bad_sample=policy)
    distiller.compile(optimizer="adam", loss=sparse_ce())
    with pytest.raises(ValueError, match=rf"Term\(s\) \['{name}'\] gave a NaN or inf"):
        distiller.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert all(np.all(np.isfinite(to_np(w))) for w in student.weights)


def test_finite_gradient_zeroes_a_non_finite_gradient_only():
    x = np.array([1.0, 2.0], "float32")
    _, grad = value_and_grad(lambda v: ops.sum(kd_ops.finite_gradient(v) * 3.0), x)
    np.testing.assert_array_equal(grad, [3.0, 3.0])
    _, grad = value_and_grad(
        lambda v: ops.sum(kd_ops.finite_gradient(v) * np.float32("nan")), x
    )
    np.testing.assert_array_equal(grad, [0.0, 0.0])
    value, _ = value_and_grad(lambda v: ops.sum(kd_ops.finite_gradient(v)), x)
    assert float(value) == 3.0
