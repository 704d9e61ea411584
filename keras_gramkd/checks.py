"""Checks of arguments: one message for each kind of wrong setting.

The checks of data inside a training step (NaN inputs, labels that are not
classes) are in `keras_gramkd.bad_samples`; these are for the settings a user
passes to a constructor or a command-line flag.

>>> check_number("kd_weight", 2, minimum=0)
2.0
>>> check_number("temperature", 0, minimum=0, strict=True)
Traceback (most recent call last):
...
ValueError: temperature must be a finite number > 0; got 0.
>>> check_choice("policy", "skip", ("raise", "skip"))
"""

import math
import numbers


def check_number(name, value, minimum=None, strict=False, hint=""):
    """`value` as a float; raises unless it is a finite real number (a bool is
    not) that is >= `minimum` (> with `strict`), naming `name` and adding `hint`.
    """
    bound = ""
    if minimum is not None:
        bound = f" {'>' if strict else '>='} {minimum:g}"
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or (minimum is not None and (value < minimum or strict and value == minimum))
    ):
        raise ValueError(
            f"{name} must be a finite number{bound}; got {value!r}."
            + (f" {hint}" if hint else "")
        )
    return float(value)


def check_choice(what, value, choices):
    """Raises a `ValueError` naming the valid choices unless `value` is one."""
    if value not in choices:
        raise ValueError(
            f"Unknown {what} {value!r}. Use one of "
            f"{', '.join(repr(choice) for choice in choices)}."
        )
