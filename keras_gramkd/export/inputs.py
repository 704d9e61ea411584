"""The student and its inputs: loading, input names and specs, user data as arrays.

Only public Keras APIs: a functional model's input structure is `model.input`
(a dict for a model built on a dict of inputs), and the layers inside a model
are found through `Model.layers` and the layers a custom layer holds as
attributes (`all_layers`).
"""

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import keras
import numpy as np

from keras_gramkd.distiller import Distiller
from keras_gramkd.saving import check_keras_archive

# Names TensorFlow accepts for a SavedModel signature argument (Keras already
# refuses '/' in a layer name).
_TFLITE_NAME = re.compile(r"[A-Za-z0-9.][A-Za-z0-9_.>-]*")


def load_student(student):
    """Returns a `keras.Model` from a model or a path to a `.keras` file.

    A `Distiller` (or a `.keras` file holding one) stands for its student: the
    student is what goes to the device.

    Args:
        student: A `keras.Model`, or a `str`/`Path` to a `.keras` file.

    Returns:
        The `keras.Model`.

    Raises:
        ValueError: If the path does not exist or is not a Keras model file.
    """
    if isinstance(student, Distiller):
        return student.student
    if isinstance(student, keras.Model):
        return student
    if not isinstance(student, (str, os.PathLike)):
        raise TypeError(
            "student must be a keras.Model or a path to a .keras file, got "
            f"{type(student).__name__}."
        )
    path = Path(student)
    if not path.is_file():
        raise ValueError(f"Student file not found: {path}.")
    if path.suffix != ".keras":
        raise ValueError(
            f"{path} is not a Keras model: expected a '.keras' file saved with "
            "model.save(...)."
        )
    check_keras_archive(path)
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as error:
        if "safe_mode" in str(error):
            raise ValueError(
                f"{path} holds a Lambda layer with Python code, which Keras loads "
                "only with safe_mode=False. If you trust the file, load it "
                "yourself, keras.saving.load_model(path, safe_mode=False), and "
                "pass the model instead of the path."
            ) from error
        raise ValueError(
            f"{path} is not a Keras model that can be loaded: {error}"
        ) from error
    if not isinstance(model, keras.Model):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a Keras model.")
    return load_student(model)


def _input_struct(model):
    """`model.input` (a tensor, list or dict), or None for a model without one."""
    try:
        return model.input
    except (AttributeError, ValueError):
        return None


def input_names(model):
    """Returns the names the exported files give the model's inputs.

    For a model built on a dict of inputs these are the dict's keys; otherwise
    the names of its `keras.Input` tensors.

    Args:
        model: A built `keras.Model`.

    Returns:
        A list of input names, in Keras order.
    """
    struct = _input_struct(model)
    if isinstance(struct, Mapping):
        return list(struct.keys())
    return [tensor.name for tensor in model.inputs]


def check_tflite_names(model):
    """Raises a `ValueError` for input names a TFLite signature cannot hold."""
    bad = [n for n in input_names(model) if not _TFLITE_NAME.fullmatch(n)]
    if bad:
        fixed = {n: re.sub(r"[^A-Za-z0-9_.-]", "_", n).lstrip("_") for n in bad}
        raise ValueError(
            f"TFLite cannot name inputs {bad}: a signature input name may hold "
            "only letters, digits, '_', '.' and '-', and may not start with "
            "'_'. Rename the keras.Input (and its key in the input dict), e.g. "
            + ", ".join(f"{n!r} -> {f or 'input'!r}" for n, f in fixed.items())
            + ". ONNX accepts the names as they are (formats='onnx')."
        )


def input_specs(model):
    """`{name: (shape without batch, dtype)}` of the model's inputs."""
    struct = _input_struct(model)
    if isinstance(struct, Mapping):
        tensors = list(struct.values())
    else:
        tensors = list(model.inputs)
    names = input_names(model)
    return {
        name: (tuple(t.shape[1:]), keras.backend.standardize_dtype(t.dtype))
        for name, t in zip(names, tensors, strict=True)
    }


def input_signature(model):
    """An explicit `input_signature` with a dynamic batch, for `model.export`."""
    specs = {
        name: keras.InputSpec(shape=(None, *shape), dtype=dtype, name=name)
        for name, (shape, dtype) in input_specs(model).items()
    }
    struct = _input_struct(model)
    if isinstance(struct, Mapping):
        return [specs]
    values = list(specs.values())
    if isinstance(struct, (list, tuple)) and len(values) > 1:
        return [values]
    return [values[0]]


def keras_inputs(model, data):
    """Shapes a `{name: array}` dict into what `model` is called with."""
    if isinstance(_input_struct(model), Mapping):
        return data
    values = [data[name] for name in input_names(model)]
    return values if len(values) > 1 else values[0]


def _is_array(x):
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _batches(data, names, what):
    """User data as an iterable of batches (one batch for in-memory arrays)."""
    # An `(x, y)` or `(x, y, sample_weight)` tuple: keep x. (A tuple of one
    # array per input has an array, not a dict, as its first item.)
    is_xy = isinstance(data, tuple) and len(data) in (2, 3)
    if is_xy and (not _is_array(data[0]) or len(names) == 1):
        data = data[0]
    single = isinstance(data, Mapping) or _is_array(data)
    if single or (isinstance(data, list) and all(_is_array(x) for x in data)):
        return [data]
    if isinstance(data, Iterable):
        return data
    raise TypeError(f"{what}: unsupported type {type(data).__name__}.")


def _batch_columns(batch, names, what):
    """One batch as `{input name: array}`."""
    if isinstance(batch, tuple) and len(batch) in (2, 3):
        batch = batch[0]
    if isinstance(batch, Mapping):
        missing = [n for n in names if n not in batch]
        if missing:
            raise ValueError(
                f"{what} lacks the model input(s) {missing}; it has "
                f"{sorted(batch)}. Keys must be the input names {names}."
            )
        return {n: np.asarray(batch[n]) for n in names}
    if _is_array(batch) and len(names) == 1:
        return {names[0]: np.asarray(batch)}
    if isinstance(batch, (list, tuple)) and len(batch) == len(names):
        return {n: np.asarray(x) for n, x in zip(names, batch, strict=True)}
    raise ValueError(f"{what} must be a dict keyed by the input names {names}.")


def as_input_dict(model, data, what, limit=None):
    """Normalises user data to a `{input name: float array}` dict.

    Accepts a dict of arrays, a single array (one-input models), a list of
    arrays in input order, an `(x, y)` tuple, or an iterable of such batches
    (e.g. a `tf.data.Dataset`), stopping after `limit` rows.
    """
    names = input_names(model)
    columns = {name: [] for name in names}
    count = 0
    for batch in _batches(data, names, what):
        parts = _batch_columns(batch, names, what)
        for name, array in parts.items():
            columns[name].append(array)
        count += len(next(iter(parts.values())))
        if limit is not None and count >= limit:
            break
    if not count:
        raise ValueError(f"{what} is empty.")
    out = {}
    for name, (shape, dtype) in input_specs(model).items():
        array = np.concatenate(columns[name])[:limit]
        if len(array.shape) != len(shape) + 1 or any(
            d is not None and d != s
            for d, s in zip(shape, array.shape[1:], strict=True)
        ):
            raise ValueError(
                f"{what}['{name}'] has rows of shape {array.shape[1:]}, the model "
                f"expects {shape}."
            )
        out[name] = array.astype(dtype if "float" not in dtype else "float32")
    return out


def load_inputs_npz(path, names):
    """Loads model inputs from an `.npz` file whose keys are the input names.

    Keys that are not input names (labels, for instance) are ignored. A model
    with a single input may also read an `.npz` with a single array.

    Args:
        path: Path to the `.npz` file.
        names: The model's input names (see `input_names`).

    Returns:
        A `{name: array}` dict.

    Example:

    ```python
    np.savez("calib.npz", pix=x["pix"], fou=x["fou"], kar=x["kar"])
    data = load_inputs_npz("calib.npz", input_names(student))
    ```
    """
    with np.load(path) as npz:
        keys = list(npz.keys())
        if len(names) == 1 and names[0] not in keys and len(keys) == 1:
            return {names[0]: npz[keys[0]]}
        missing = [n for n in names if n not in keys]
        if missing:
            raise ValueError(
                f"{path} lacks the model input(s) {missing}; it has {keys}. "
                f"Save one array per input, keyed by the input names {list(names)}."
            )
        return {n: npz[n] for n in names}


def _sublayers(layer):
    """The layers directly inside `layer`: `Model.layers`, or its layer attributes."""
    if isinstance(layer, keras.Model):
        return list(layer.layers)
    attributes = list(vars(layer).items())
    if hasattr(layer, "named_children"):  # torch keeps sub-modules out of vars()
        attributes += list(layer.named_children())
    found = []
    for name, value in attributes:
        if name.startswith("_"):
            continue
        items = value.values() if isinstance(value, Mapping) else value
        if isinstance(value, keras.layers.Layer):
            items = [value]
        elif not isinstance(value, (list, tuple, Mapping)):
            continue
        found += [item for item in items if isinstance(item, keras.layers.Layer)]
    return found


def all_layers(model):
    """`model` and every layer inside it, nested models and custom layers included.

    Walks `Model.layers` and, for other layers, the layers they hold as public
    attributes (alone, or in a list, tuple or dict), as Keras tracks them; on
    the torch backend a layer is a `torch.nn.Module`, which keeps its
    sub-modules apart (`named_children`).
    """
    found, seen, stack = [], set(), [model]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        found.append(layer)
        stack.extend(reversed(_sublayers(layer)))
    return found


def _float32_config(node):
    """A serialised config with every mixed-precision dtype policy set to float32."""
    if isinstance(node, list):
        return [_float32_config(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        policy = isinstance(value, dict) and value.get("class_name") == "DTypePolicy"
        if key == "dtype" and (policy or value in ("mixed_float16", "mixed_bfloat16")):
            out[key] = "float32"
        else:
            out[key] = _float32_config(value)
    return out


def float32_model(model):
    """Returns `model`, or a float32 copy of it if it uses mixed precision."""
    policies = {
        layer.dtype_policy.name
        for layer in all_layers(model)
        if getattr(layer, "dtype_policy", None) is not None
    }
    if policies <= {"float32"}:
        return model
    config = keras.saving.serialize_keras_object(model)
    clone = keras.saving.deserialize_keras_object(_float32_config(config))
    clone.set_weights(model.get_weights())
    return clone
