"""Checks of `compare_methods`' arguments, made before anything trains.

>>> check_count("epochs", 3), check_seeds(2), check_seeds((4, 7))
(3, [0, 1], [4, 7])
>>> check_batch_seeds(None, [4, 7]), check_batch_seeds([0, 0], [4, 7])
([4, 7], [0, 0])
"""

import numbers

import keras
import numpy as np

from keras_gramkd.terms import DistillationTerm

_MAX_SEED = 2**32  # numpy's global generator takes seeds in [0, 2**32)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_count(name, value, example=10):
    """`value` as an int; raises unless it is an int >= 1 (a bool is not)."""
    if not _is_int(value) or value < 1:
        raise ValueError(
            f"{name} must be a positive whole number (an int >= 1, not a bool); "
            f"got {value!r}. Give e.g. {name}={example}."
        )
    return int(value)


def check_seeds(seeds):
    """The list of seeds: `range(seeds)` for an int, else the distinct ints."""
    if _is_int(seeds):
        if seeds < 1:
            raise ValueError(
                f"seeds must be >= 1 (a number of seeds) or a list of seeds; "
                f"got {seeds!r}. Give e.g. seeds=3 or seeds=[0, 1, 2]."
            )
        return list(range(int(seeds)))
    if not isinstance(seeds, (list, tuple, range, np.ndarray)) or not all(
        _is_int(s) and 0 <= s < _MAX_SEED for s in seeds
    ):
        raise ValueError(
            "seeds must be a number of seeds (an int >= 1) or a list of whole "
            f"numbers in [0, 2**32); got {seeds!r}. Give e.g. seeds=3 or "
            "seeds=[0, 1, 2]."
        )
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(
            f"seeds must be distinct and non-empty; got {seeds}. Give each seed "
            "once, e.g. seeds=[0, 1, 2]."
        )
    return seeds


def check_batch_seeds(batch_seeds, seeds):
    """The seed of each run's batch order: `seeds` for None, else one whole
    number in [0, 2**32) per seed (repeats allowed: the same order for
    several initial weights)."""
    if batch_seeds is None:
        return list(seeds)
    if not isinstance(batch_seeds, (list, tuple, range, np.ndarray)) or not all(
        _is_int(s) and 0 <= s < _MAX_SEED for s in batch_seeds
    ):
        raise ValueError(
            "batch_seeds must be a list of whole numbers in [0, 2**32), one per "
            f"seed; got {batch_seeds!r}. Give e.g. batch_seeds=[0] * {len(seeds)} "
            "(one batch order for every seed), or leave it out (each seed's "
            "batches follow the seed)."
        )
    if len(batch_seeds) != len(seeds):
        raise ValueError(
            f"batch_seeds must give one batch-order seed per seed: there are "
            f"{len(seeds)} seeds ({list(seeds)}) but {len(batch_seeds)} batch "
            f"seeds ({list(batch_seeds)}). Give {len(seeds)} of them, or leave "
            "batch_seeds out."
        )
    return [int(s) for s in batch_seeds]


def check_methods(methods, reference):
    """The reference method's name (default: the first method)."""
    example = '{"kd": [KDTerm()], "kd+gram": [KDTerm(), GramTerm(...)]}'
    if not isinstance(methods, dict) or not methods:
        raise ValueError(
            "methods must be a non-empty dict name -> list of DistillationTerms "
            f"(e.g. {example}); got {methods!r}."
        )
    for name, terms in methods.items():
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"Method names must be non-empty strings (they name the table "
                f"rows and JSON keys); got {name!r}. E.g. {example}."
            )
        if isinstance(terms, DistillationTerm):
            raise ValueError(
                f"methods[{name!r}] must be a list of DistillationTerms; got the "
                f"single term {type(terms).__name__}. Wrap it in a list: "
                f"{{{name!r}: [{type(terms).__name__}(...)]}}."
            )
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
    if not isinstance(reference, str) or reference not in methods:
        raise ValueError(
            f"reference {reference!r} is not one of the methods {list(methods)}. "
            "Give the name of one of them (default: the first)."
        )
    return reference


def check_factory(name, value, kind, example):
    """Raises unless `value` is None or a callable that builds a `kind`, not
    a built `kind` (a built loss is callable, but with other arguments)."""
    if value is None:
        return
    if isinstance(value, kind) or not callable(value):
        raise ValueError(
            f"{name} must be a callable () -> {kind.__name__} that builds a "
            f"fresh one for each run; got {value!r}. Give e.g. {name}={example}."
        )


def _rows(array):
    shape = getattr(array, "shape", None)
    shape = np.shape(array) if shape is None else tuple(shape)
    return int(shape[0]) if len(shape) else None


def check_split(name, split):
    """`split` as `(x, np.asarray(y))`, each input of x with one row per label."""
    if not (isinstance(split, (tuple, list)) and len(split) == 2):
        raise ValueError(f"{name} must be a pair (x, y); got {type(split).__name__}.")
    x, y = split
    if not isinstance(x, dict) or not x:
        raise ValueError(
            f"{name}'s x must be a non-empty dict input name -> array; "
            f"got {type(x).__name__}."
        )
    y = np.asarray(y)
    labels = _rows(y)
    if not labels:
        raise ValueError(
            f"{name}'s y must be an array of labels with at least one row; "
            f"got shape {y.shape}."
        )
    for key, array in x.items():
        rows = _rows(array)
        if rows != labels:
            raise ValueError(
                f"{name}'s x and y must have the same number of rows: y has "
                f"{labels} labels, but x[{key!r}] has {rows} rows. Give every "
                "input of x one row per label (row i of each input is sample i)."
            )
    return x, y


def check_teacher_test(teacher_test, test_labels, name="teacher_test", test="test"):
    """`teacher_test` checked as a split with as many rows as `test`."""
    x, y = check_split(name, teacher_test)
    if len(y) != test_labels:
        raise ValueError(
            f"{name} must hold the same samples as {test}, row for row: {test} "
            f"has {test_labels} rows, {name} has {len(y)}. Give the "
            "teacher's version of every test sample, in the same order."
        )
    return x, y


def _is_split(value):
    return isinstance(value, (tuple, list)) and len(value) == 2


def check_tests(test, teacher_test):
    """The test sets as dict name -> (students' split, teacher's split), and
    whether `test` named them (a dict name -> (x, y)) or was one (x, y).

    With named sets, `teacher_test` is None or a dict whose names are among
    the test sets'; a set it leaves out scores the teacher on the set itself.
    """
    if not isinstance(test, dict) or not test:
        split = check_split("test", test)
        teacher = split
        if teacher_test is not None:
            teacher = check_teacher_test(teacher_test, len(split[1]))
        return {"test": (split, teacher)}, False
    example = 'test={"clean": (x, y), "noisy": (x_noisy, y)}'
    for name, value in test.items():
        if not isinstance(name, str) or not name or not _is_split(value):
            raise ValueError(
                "test must be one (x, y) or a dict name -> (x, y) of named test "
                f"sets (e.g. {example}); test[{name!r}] is "
                f"{type(value).__name__}, not a pair (x, y), or its name is not a "
                "non-empty string."
            )
    if teacher_test is not None and (
        not isinstance(teacher_test, dict) or set(teacher_test) - set(test)
    ):
        raise ValueError(
            "With named test sets, teacher_test must be a dict test set name -> "
            f"(x, y) with names among {list(test)} (a set it leaves out scores "
            f"the teacher on the set itself); got {_describe(teacher_test)}."
        )
    tests = {}
    for name, value in test.items():
        split = check_split(f"test[{name!r}]", value)
        teacher = split
        if teacher_test is not None and name in teacher_test:
            teacher = check_teacher_test(
                teacher_test[name],
                len(split[1]),
                f"teacher_test[{name!r}]",
                f"test[{name!r}]",
            )
        tests[name] = (split, teacher)
    return tests, True


def _describe(value):
    """A dict by its keys, anything else by its type."""
    if isinstance(value, dict):
        return f"a dict with keys {list(value)}"
    return type(value).__name__


def check_optimizer_and_loss(optimizer, loss):
    check_factory(
        "optimizer",
        optimizer,
        keras.optimizers.Optimizer,
        "lambda: keras.optimizers.Adam(1e-3)",
    )
    check_factory(
        "loss",
        loss,
        keras.losses.Loss,
        "lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True)",
    )
