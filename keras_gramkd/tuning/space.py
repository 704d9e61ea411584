"""The search space: the defaults, a user's overrides checked, hyperparameters declared.

Nothing here imports keras_tuner; `declare` and `declare_loss_hyperparameters`
take a `keras_tuner.HyperParameters`.
"""

from keras_gramkd.checks import check_number

# name -> default: a number (fixed), a (low, high) range, or a list of choices.
DEFAULT_SEARCH_SPACE = {
    "task_weight": 1.0,
    "kd_weight": (0.0, 4.0),
    "use_gram": [True, False],
    "gram_weight": (1e-2, 1e2),
    "temperature": [1.0, 2.0, 4.0, 8.0],
    "learning_rate": (1e-4, 1e-2),
}
_LOG_SCALE = ("gram_weight", "learning_rate")
_POSITIVE = ("temperature", "learning_rate")  # > 0; the weights are >= 0
# The Distiller settings a trial's hyperparameters stand for, in this order.
CONFIG_NAMES = (
    "task_weight",
    "kd_weight",
    "gram_weight",
    "temperature",
    "learning_rate",
)


def _check_value(name, value):
    if name == "use_gram":
        if not isinstance(value, bool):
            raise ValueError(
                f"search_space['use_gram'] values must be bools; got {value!r}."
            )
        return value
    return check_number(
        f"search_space[{name!r}] values", value, 0, strict=name in _POSITIVE
    )


def _parse_range(name, spec):
    """A `(low, high)` or `(low, high, sampling)` entry as ("range", ...)."""
    if name == "use_gram":
        raise ValueError("search_space['use_gram'] is a bool or a list of bools.")
    sampling = "log" if name in _LOG_SCALE else "linear"
    if len(spec) == 3:
        *spec, sampling = spec
    if len(spec) != 2 or sampling not in ("linear", "log"):
        raise ValueError(
            f"search_space[{name!r}]: a range is (low, high) or (low, high, "
            f"'linear'|'log'); got {spec!r}."
        )
    low, high = (_check_value(name, v) for v in spec)
    if not low < high:
        raise ValueError(f"search_space[{name!r}]: need low < high; got {spec!r}.")
    if sampling == "log" and low <= 0:
        raise ValueError(
            f"search_space[{name!r}]: a log range needs low > 0; got {spec!r}. "
            "Use (low, high, 'linear'), or search use_gram for gram_weight = 0."
        )
    return ("range", low, high, sampling)


def _parse_entry(name, spec):
    """An entry as ("fixed", v), ("choice", values) or ("range", lo, hi, sampling)."""
    if isinstance(spec, list):
        if not spec:
            raise ValueError(f"search_space[{name!r}] is an empty list of choices.")
        values = list(dict.fromkeys(_check_value(name, v) for v in spec))
        return ("fixed", values[0]) if len(values) == 1 else ("choice", values)
    if isinstance(spec, tuple):
        return _parse_range(name, spec)
    return ("fixed", _check_value(name, spec))


def resolve_search_space(search_space=None):
    """The full search space: `DEFAULT_SEARCH_SPACE` updated by `search_space`.

    Each value is a number or bool (fixed), a ``(low, high)`` or ``(low, high,
    "linear" | "log")`` range, or a list of choices. Fixing ``gram_weight`` fixes
    ``use_gram`` (True if the weight is > 0, False if it is 0).

    Returns:
        dict name -> ("fixed", value) | ("choice", values) | ("range", low, high,
        sampling).

    Example:

    >>> space = resolve_search_space({"kd_weight": 1.0, "temperature": [2, 4]})
    >>> space["kd_weight"], space["temperature"]
    (('fixed', 1.0), ('choice', [2.0, 4.0]))
    >>> resolve_search_space({"gram_weight": 0})["use_gram"]
    ('fixed', False)
    """
    search_space = dict(search_space or {})
    unknown = sorted(set(search_space) - set(DEFAULT_SEARCH_SPACE))
    if unknown:
        raise ValueError(
            f"Unknown search_space name(s) {unknown}; valid names are "
            f"{list(DEFAULT_SEARCH_SPACE)}."
        )
    space = {
        name: _parse_entry(name, search_space.get(name, default))
        for name, default in DEFAULT_SEARCH_SPACE.items()
    }
    gram = space["gram_weight"]
    if gram[0] == "fixed":
        implied = gram[1] > 0
        if "use_gram" in search_space and space["use_gram"] != ("fixed", implied):
            raise ValueError(
                f"search_space fixes gram_weight={gram[1]:g} but use_gram="
                f"{search_space['use_gram']!r}; give one of them."
            )
        space["use_gram"] = ("fixed", implied)
    return space


def declare(hp, name, entry):
    """Declares one resolved entry on `hp`; returns its value for this trial."""
    if entry[0] == "fixed":
        return hp.Fixed(name, entry[1])
    if entry[0] == "choice":
        if name == "use_gram":
            return hp.Boolean(name, default=entry[1][0])
        return hp.Choice(name, entry[1], ordered=True)
    _, low, high, sampling = entry
    return hp.Float(name, low, high, sampling=sampling)


def declare_loss_hyperparameters(hp, space):
    """Declares the loss hyperparameters of `space` on `hp`; returns the settings.

    ``gram_weight`` is declared only while ``use_gram`` is True, and is 0 when
    it is off.

    Returns:
        dict with task_weight, kd_weight, gram_weight, temperature, learning_rate.
    """
    config = {
        name: declare(hp, name, space[name])
        for name in ("task_weight", "kd_weight", "temperature", "learning_rate")
    }
    use_gram = declare(hp, "use_gram", space["use_gram"])
    with hp.conditional_scope("use_gram", [True]):
        gram_weight = declare(hp, "gram_weight", space["gram_weight"])
    config["gram_weight"] = float(gram_weight) if use_gram else 0.0
    return {name: float(config[name]) for name in CONFIG_NAMES}
