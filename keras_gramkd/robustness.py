"""Robustness to missing modalities: accuracy with each modality (pair) dropped.

`evaluate_robustness` drops each modality of the test inputs in turn (and each
pair), replacing its inputs by a constant, and reports the accuracy each time:
how much the model leans on every modality, and how it copes when one is lost.

Example:

>>> import keras, numpy as np
>>> a, b = keras.Input((2,), name="a"), keras.Input((2,), name="b")
>>> model = keras.Model({"a": a, "b": b}, keras.layers.Add()([a, b]))
>>> x = {  # "a" votes 2 for the right class, "b" always votes 1 for class 0
...     "a": np.array([[2, 0], [0, 2], [2, 0], [0, 2]], "float32"),
...     "b": np.array([[1, 0], [1, 0], [1, 0], [1, 0]], "float32"),
... }
>>> report = evaluate_robustness(model, x, np.array([0, 1, 0, 1]))
>>> report.accuracy, report.dropped, report.dropped_pairs
(1.0, {'a': 0.5, 'b': 1.0}, {('a', 'b'): 0.5})
>>> print(report.to_markdown())
| dropped | accuracy % | change (points) |
|---|---|---|
| nothing | 100.00 |  |
| a | 50.00 | -50.00 |
| b | 100.00 | +0.00 |
| a + b | 50.00 | -50.00 |
"""

import dataclasses
import itertools

import keras
import numpy as np

from keras_gramkd.checks import check_number
from keras_gramkd.distiller import MODALITY_MASK_KEY, Distiller


@dataclasses.dataclass(frozen=True)
class RobustnessReport:
    """Accuracies of one model with modalities dropped at test time.

    Attributes:
        accuracy: accuracy on the full inputs.
        dropped: modality name -> accuracy with that modality dropped.
        dropped_pairs: (name, name) -> accuracy with both dropped, for every
            pair in modality order; empty when pairs were not evaluated.
        num_samples: number of samples evaluated.
        fill_value: the value that replaced the inputs of dropped modalities.
    """

    accuracy: float
    dropped: dict
    dropped_pairs: dict
    num_samples: int
    fill_value: float

    @property
    def mean_dropped(self):
        """Mean accuracy over the single dropped modalities."""
        return float(np.mean(list(self.dropped.values())))

    def without(self, *names):
        """Accuracy with the named modalities (none, one or two) dropped."""
        unknown = [name for name in names if name not in self.dropped]
        if unknown:
            raise ValueError(
                f"Unknown modality {unknown[0]!r}; this report's modalities are "
                f"{list(self.dropped)}."
            )
        if len(names) == 0:
            return self.accuracy
        if len(names) == 1:
            return self.dropped[names[0]]
        if len(names) == 2 and names[0] != names[1]:
            order = list(self.dropped)
            pair = tuple(sorted(names, key=order.index))
            if pair not in self.dropped_pairs:
                raise ValueError(
                    f"Pairs were not evaluated, so {pair} has no accuracy; call "
                    "evaluate_robustness(..., pairs=True)."
                )
            return self.dropped_pairs[pair]
        raise ValueError(
            f"Got modalities {list(names)}; name none, one, or two different "
            "modalities (only single modalities and pairs are evaluated)."
        )

    def rows(self):
        """(dropped modality names, accuracy, change from full input) per line."""
        lines = [((), self.accuracy)]
        lines += [((name,), acc) for name, acc in self.dropped.items()]
        lines += list(self.dropped_pairs.items())
        return [(names, acc, acc - self.accuracy) for names, acc in lines]

    def to_markdown(self):
        """The rows as a Markdown table, accuracies in percent."""
        lines = [
            "| dropped | accuracy % | change (points) |",
            "|---|---|---|",
        ]
        for names, acc, change in self.rows():
            label = " + ".join(names) if names else "nothing"
            delta = f"{100 * change:+.2f}" if names else ""
            lines.append(f"| {label} | {100 * acc:.2f} | {delta} |")
        return "\n".join(lines)


def evaluate_robustness(
    model, x, y, modalities=None, pairs=True, fill_value=0.0, batch_size=256
):
    """Accuracy of `model` on (x, y) with each modality, and each pair, dropped.

    Dropping a modality replaces every input array of it with `fill_value`.
    For inputs standardised with training statistics (as
    `keras_gramkd.datasets.load_mfeat` returns them) the default 0 is the
    training mean, the value that carries no information; it is also what
    `keras_gramkd.layers.ModalityDropout` feeds a model in training.

    Args:
        model: a `keras.Model` taking the dict `x` and returning (n, classes)
            logits or probabilities; a `keras_gramkd.Distiller` is evaluated
            through its student.
        x: dict input name -> array with n samples along axis 0.
        y: (n,) integer class labels, or (n, classes) one-hot labels.
        modalities: which inputs form each modality: None (every key of `x`
            is one modality), a list of keys of `x` (each one modality), or a
            dict modality name -> key of `x` or list of keys.
        pairs: also drop every pair of modalities (M(M-1)/2 evaluations).
        fill_value: the value of dropped inputs.
        batch_size: batch size of `model.predict`.

    Returns:
        A `RobustnessReport`. See the module docstring for an example.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"model must be a keras.Model (or a Distiller); got {type(model).__name__}."
        )
    x, n = _check_inputs(x)
    _check_keys(model, x)
    labels, one_hot_classes = _check_labels(y, n)
    spec = _check_modalities(modalities, x)
    check_number(
        "fill_value",
        fill_value,
        hint="Use 0 (the mean of standardised inputs) unless the model expects "
        "another 'missing' value.",
    )

    def accuracy_without(names):
        dropped = {key for name in names for key in spec[name]}
        inputs = {
            key: np.full(value.shape, fill_value, value.dtype)
            if key in dropped
            else value
            for key, value in x.items()
        }
        scores = model.predict(inputs, batch_size=batch_size, verbose=0)
        _check_scores(scores, n, labels, one_hot_classes)
        return float(np.mean(np.argmax(scores, axis=-1) == labels))

    names = list(spec)
    return RobustnessReport(
        accuracy=accuracy_without(()),
        dropped={name: accuracy_without((name,)) for name in names},
        dropped_pairs={
            pair: accuracy_without(pair)
            for pair in (itertools.combinations(names, 2) if pairs else ())
        },
        num_samples=n,
        fill_value=float(fill_value),
    )


def _check_inputs(x):
    """x as a dict of numpy arrays, and its number of samples."""
    if not isinstance(x, dict):
        raise ValueError(
            "x must be a dict input name -> array, keyed like the model's "
            f"inputs; got {type(x).__name__}."
        )
    if not x:
        raise ValueError(
            "x is an empty dict; give one array per model input, keyed like "
            "the model's inputs."
        )
    x = {key: np.asarray(value) for key, value in x.items()}
    lengths = {key: len(value) if value.ndim else 0 for key, value in x.items()}
    n = next(iter(lengths.values()))
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"The inputs of x have different numbers of samples ({lengths}); "
            "every input needs one row per sample."
        )
    if n == 0:
        raise ValueError("x has no samples; give at least one sample per input.")
    return x, n


def _input_names(model):
    """Input names of a functional model (a Distiller's student); else None."""
    if isinstance(model, Distiller):
        model = model.student
    try:
        inputs = model.input
    except (AttributeError, ValueError):  # a subclassed model: not known
        return None
    if isinstance(inputs, dict):
        return list(inputs)
    return [tensor.name for tensor in keras.tree.flatten(inputs)]


def _check_keys(model, x):
    """Raises a `ValueError` for keys of x that are not inputs of the model."""
    names = _input_names(model)
    if MODALITY_MASK_KEY in x and MODALITY_MASK_KEY not in (names or ()):
        raise ValueError(
            f"x has a {MODALITY_MASK_KEY!r} key. evaluate_robustness drops "
            "modalities itself (it replaces their inputs with fill_value), and "
            "the model does not take a mask: remove it from x."
        )
    extra = [key for key in x if names is not None and key not in names]
    if extra:
        raise ValueError(
            f"x has key(s) {extra} that the model does not take; its inputs are "
            f"{names}. Remove them from x (dropping them would change nothing)."
        )


def _check_labels(y, n):
    """(n,) integer labels from class labels or one-hot; and the one-hot width."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 0 or len(y) != n:
        raise ValueError(
            f"y has {len(y) if y.ndim else 'no'} labels but x has {n} samples; "
            "give one label per sample, in the order of x."
        )
    whole = y.dtype.kind in "iu" or (
        y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y))
    )
    if y.ndim == 1 and whole and np.all(y >= 0):
        return y.astype(np.int64), None
    if y.ndim == 2 and whole and np.all((y == 0) | (y == 1)) and np.all(y.sum(1) == 1):
        return np.argmax(y, axis=1), y.shape[1]
    raise ValueError(
        f"y must be (n,) integer class labels >= 0 or (n, classes) one-hot "
        f"labels; got shape {y.shape} of dtype {y.dtype}. Convert "
        "probabilities or scores with np.argmax(y, axis=-1)."
    )


def _check_modalities(modalities, x):
    """modality name -> tuple of keys of x."""
    if modalities is None:
        spec = {key: (key,) for key in x}
    elif isinstance(modalities, (list, tuple)):
        spec = {key: (key,) for key in modalities}
    elif isinstance(modalities, dict):
        spec = {
            name: (keys,) if isinstance(keys, str) else tuple(keys)
            for name, keys in modalities.items()
        }
    else:
        raise ValueError(
            "modalities must be None (each key of x is a modality), a list of "
            "keys of x, or a dict modality name -> key or list of keys of x; "
            f"got {type(modalities).__name__}."
        )
    if not spec or not all(spec.values()):
        raise ValueError(
            f"modalities {modalities!r} names no inputs; give each modality at "
            f"least one key of x (x has keys {list(x)})."
        )
    for name, keys in spec.items():
        missing = [key for key in keys if key not in x]
        if missing:
            raise ValueError(
                f"Modality {name!r} needs input(s) {missing} that x does not "
                f"have; x has keys {list(x)}. Map each modality to keys of x."
            )
    return spec


def _check_scores(scores, n, labels, one_hot_classes):
    if not isinstance(scores, np.ndarray) or scores.ndim != 2 or len(scores) != n:
        shape = getattr(scores, "shape", type(scores).__name__)
        raise ValueError(
            f"The model must output one (n, classes) array of logits or "
            f"probabilities; its predict gave {shape}. Wrap a model with several "
            "outputs: keras.Model(model.inputs, model.outputs[i])."
        )
    classes = scores.shape[1]
    if one_hot_classes is not None and one_hot_classes != classes:
        raise ValueError(
            f"y is one-hot over {one_hot_classes} classes but the model outputs "
            f"{classes}; give labels over the model's classes."
        )
    if labels.max() >= classes:
        raise ValueError(
            f"y has class label {labels.max()} but the model outputs only "
            f"{classes} classes; give labels in 0..{classes - 1}."
        )
