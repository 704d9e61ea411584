"""compare_methods: wrong arguments fail before anything trains, a failed run
keeps the finished seeds, and the caller's global state is left as it was."""

import random

import keras
import numpy as np
import pytest
from helpers import make_data, make_net, sparse_ce

from keras_gramkd import Distiller, KDTerm
from keras_gramkd.study import StudyError, compare_methods


@pytest.fixture
def teacher():
    return make_net("t", 8)


def _student():
    return make_net("s", 3)


def _args(teacher, **kwargs):
    args = dict(
        teacher=teacher,
        build_student=_student,
        train=make_data(8),
        test=make_data(8),
        methods={"kd": [KDTerm()]},
    )
    return {**args, **kwargs}


def _rows_times(x, key, times):
    """`x` with input `key` repeated `times` times along the rows (or cut to
    a fraction of them for times < 1)."""
    rows = len(x[key])
    tiled = np.concatenate([x[key]] * max(1, int(times)))
    return {**x, key: tiled[: int(rows * times)]}


def _split(n, key=None, times=1, seed=0):
    x, y = make_data(n, seed=seed)
    return (_rows_times(x, key, times) if key else x), y


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"train": _split(32, "b", 3)},
            r"train's x and y must have the same number of rows: y has 32 labels, "
            r"but x\['b'\] has 96 rows\. Give every input of x one row per label",
        ),
        (
            {"train": _split(32, "a", 0.5)},
            r"train's x and y .* y has 32 labels, but x\['a'\] has 16 rows",
        ),
        (
            {"test": _split(8, "c", 2)},
            r"test's x and y .* y has 8 labels, but x\['c'\] has 16 rows",
        ),
        (
            {"validation": _split(6, "a", 0.5)},
            r"validation's x and y .* y has 6 labels, but x\['a'\] has 3 rows",
        ),
        (
            {"teacher_test": _split(8, "b", 2)},
            r"teacher_test's x and y .* y has 8 labels, but x\['b'\] has 16 rows",
        ),
        (
            {"teacher_test": make_data(5)},
            r"teacher_test must hold the same samples as test, row for row: test "
            r"has 8 rows, teacher_test has 5",
        ),
        ({"train": (make_data(4)[0], np.zeros((0,)))}, r"train's y must be an array"),
    ],
)
def test_rows_of_x_must_match_the_labels(teacher, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compare_methods(**_args(teacher, **kwargs))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": 0}, r"epochs must be a positive whole number .*got 0\. .*=10"),
        ({"epochs": -1}, r"epochs must be a positive whole number .*got -1\."),
        ({"epochs": True}, r"epochs must be a positive whole number .*got True\."),
        ({"epochs": 2.0}, r"epochs must be a positive whole number .*got 2\.0\."),
        ({"batch_size": 0}, r"batch_size must be a positive .*got 0\. .*=64"),
        ({"batch_size": "64"}, r"batch_size must be a positive .*got '64'\."),
        ({"steps_per_epoch": 0}, r"steps_per_epoch must be a positive .*got 0\."),
        ({"seeds": 2.5}, r"seeds must be a number of seeds .*got 2\.5\. .*seeds=3"),
        ({"seeds": True}, r"seeds must be a number of seeds .*got True\."),
        ({"seeds": [0, 1.5]}, r"seeds must be a number of seeds .*got \[0, 1\.5\]"),
        ({"seeds": [-1]}, r"seeds must be .*in \[0, 2\*\*32\); got \[-1\]"),
        ({"seeds": "01"}, r"seeds must be a number of seeds .*got '01'"),
        ({"seeds": []}, r"seeds must be distinct and non-empty; got \[\]"),
    ],
)
def test_counts_must_be_positive_whole_numbers(teacher, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compare_methods(**_args(teacher, **kwargs))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"methods": {"kd": KDTerm()}},
            r"methods\['kd'\] must be a list of DistillationTerms; got the single "
            r"term KDTerm\. Wrap it in a list: \{'kd': \[KDTerm\(\.\.\.\)\]\}",
        ),
        ({"methods": {}}, r"methods must be a non-empty dict"),
        ({"methods": {1: []}}, r"Method names must be non-empty strings.* got 1\."),
        (
            {"reference": ["kd"]},
            r"reference \['kd'\] is not one of the methods \['kd'\]\. Give the name",
        ),
        (
            {"optimizer": keras.optimizers.Adam()},
            r"optimizer must be a callable \(\) -> Optimizer .*lambda: keras",
        ),
        ({"loss": sparse_ce()}, r"loss must be a callable \(\) -> Loss .*lambda: "),
    ],
)
def test_methods_and_factories_are_checked(teacher, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compare_methods(**_args(teacher, **kwargs))


def _freeze_one_layer(teacher):
    teacher.get_layer("t_a").trainable = False
    return {layer.name: layer.trainable for layer in teacher.layers}


def _next_draws():
    """The next draws of `random` and `numpy.random`, state left unchanged."""
    state = random.getstate(), np.random.get_state()
    draws = random.random(), np.random.random()
    random.setstate(state[0])
    np.random.set_state(state[1])
    return draws


def _after_call_is_unchanged(teacher, call):
    flags, draws = _freeze_one_layer(teacher), _next_draws()
    call()
    assert teacher.trainable
    assert {layer.name: layer.trainable for layer in teacher.layers} == flags
    assert len(teacher.trainable_weights) == len(teacher.weights) - 2  # t_a's
    assert (random.random(), np.random.random()) == draws


def test_random_state_and_teacher_trainable_are_restored(teacher):
    _after_call_is_unchanged(
        teacher,
        lambda: compare_methods(
            **_args(teacher, seeds=[3], epochs=1, batch_size=8, jit_compile=False)
        ),
    )


def test_failed_first_run_restores_state_and_has_no_partial(teacher):
    def broken(t, s):
        Distiller(t, s, terms=[KDTerm()])  # freezes the teacher
        raise RuntimeError("boom")

    def call():
        with pytest.raises(StudyError) as info:
            compare_methods(**_args(teacher, methods={"broken": broken}, seeds=[7]))
        assert info.value.partial is None
        assert (info.value.method, info.value.seed) == ("broken", 7)

    _after_call_is_unchanged(teacher, call)


def test_failed_run_keeps_the_seeds_every_method_finished(teacher):
    calls = []

    def flaky(t, s):
        calls.append(s)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return Distiller(t, s, terms=[KDTerm()])

    x_test, y_test = make_data(16, seed=3)
    with pytest.raises(
        StudyError,
        match=r"method 'flaky' failed on seed 1 \(RuntimeError: out of memory\)\. "
        r"The 1 seed\(s\) every method finished \(\[0\]\) are in this error's "
        r"`\.partial`",
    ) as info:
        compare_methods(
            **_args(
                teacher,
                train=make_data(16, seed=2),
                test=(x_test, y_test),
                methods={"kd": [KDTerm()], "flaky": flaky},
                seeds=[0, 1],
                epochs=1,
                batch_size=8,
                keep_students=True,
                jit_compile=False,
            )
        )
    error = info.value
    assert isinstance(error, RuntimeError)
    assert isinstance(error.__cause__, RuntimeError)
    assert str(error.__cause__) == "out of memory"
    partial = error.partial
    assert partial.config["seeds"] == [0]
    assert sorted(partial.students) == [("flaky", 0), ("kd", 0)]
    for name in ("kd", "flaky"):
        run = partial.methods[name]
        assert run.seeds == [0] and len(run.histories) == 1
        logits = keras.ops.convert_to_numpy(partial.students[(name, 0)](x_test))
        assert run.accuracy == [pytest.approx(np.mean(logits.argmax(-1) == y_test))]
    assert "| flaky |" in partial.to_markdown()
