"""Reaching features inside a model: addresses, nested encoders, token pooling.

A feature *address* names the layer whose output a distillation term reads:

- a top-level layer name, `"t_pix_embed"`;
- a path through nested models, `"pix_encoder/embed"`: sub-model names joined
  by `/`, any depth, through functional and `Sequential` sub-models;
- the layer object itself.

`Feature(address, pool=...)` adds how a token embedding (batch, T, d) or a
feature map (batch, H, W, d) becomes one (batch, d) vector: `"mean"` over the
middle axes, `"first"` (a CLS token) or `"max"`. Left out (None), a modality
of a dict is mean-pooled and a term's single address is read as the layer
outputs it.

`FeatureExtractor(model, role, addresses)` builds, once, a functional view of
the model that returns its output *and* the outputs of the addressed layers
from one forward pass. The view reuses the model's own layers and weights: the
model itself is left untouched (it saves, reloads and exports as before).
Nested models that hold an addressed layer are replaced in the view by views
of their own, built the same way, so every layer keeps its place and name.
Only public Keras APIs are used: `keras.models.clone_model` with a
`clone_function` that returns each layer itself (no copy) and a
`call_function` that records the outputs.

Example:

>>> import keras, numpy as np
>>> inner = keras.Input((4,))
>>> encoder = keras.Model(
...     inner, keras.layers.Dense(8, name="embed")(inner), name="encoder")
>>> x = keras.Input((4,), name="x")
>>> model = keras.Model(x, keras.layers.Dense(3)(encoder(x)))
>>> extractor = FeatureExtractor(model, "student", ["encoder/embed"])
>>> logits, features = extractor(np.ones((2, 4), "float32"))
>>> tuple(logits.shape), tuple(features["encoder/embed"].shape)
((2, 3), (2, 8))
"""

import difflib
import warnings

import keras
from keras import ops

POOLINGS = ("mean", "first", "max")


class Feature:
    """A feature address and how its tokens are pooled to one vector.

    Args:
        address: a layer name, a `/`-joined path through nested models, or a
            layer object.
        pool: `"mean"`, `"first"` or `"max"`: how a (batch, T, d) or
            (batch, H, W, d) output becomes (batch, d). (batch, d) outputs
            are used as they are. `"first"` takes token 0 of a sequence (a
            CLS token) and needs a (batch, T, d) output. None (default):
            `"mean"` for a modality of a dict, and no pooling for a term's
            single address (the layer's output as it is).

    Example:

    >>> Feature("text_encoder/tokens", pool="first")
    Feature('text_encoder/tokens', pool='first')
    >>> Feature("t_fused").get_config()
    {'address': 't_fused', 'pooling': None}
    """

    def __init__(self, address, pool=None):
        if isinstance(address, Feature):
            address, pool = address.address, address.pool
        if not isinstance(address, (str, keras.layers.Layer)) or address == "":
            raise ValueError(
                "A feature address must be a layer name, a path like "
                f"'encoder/embed', or a layer object; got {address!r}."
            )
        if pool is not None and pool not in POOLINGS:
            raise ValueError(
                f"Unknown pooling {pool!r} for feature {_label(address)}. Use one "
                f"of {', '.join(repr(p) for p in POOLINGS)}, or None."
            )
        self.address = address
        self.pool = pool

    def __repr__(self):
        return f"Feature({_label(self.address)}, pool={self.pool!r})"

    def get_config(self):
        """A JSON-able config; a layer object is stored by its name.

        The pooling is stored under `"pooling"`: configs saved before
        pooling applied to single addresses hold `"pool"` (see `as_feature`).
        """
        address = self.address
        if isinstance(address, keras.layers.Layer):
            address = address.name
        return {"address": address, "pooling": self.pool}


def as_feature(spec, modality=False):
    """`spec` (a Feature, an address or a config dict) as a new `Feature`.

    Args:
        spec: a `Feature`, an address, or a `{"address", "pooling"}` dict.
        modality: True for one modality of a dict, whose pool defaults to
            `"mean"`; False for a term's single address.

    A dict with the key `"pool"` instead of `"pooling"` is a config saved
    before pooling applied to single addresses: a modality keeps its pool,
    and a single address is read as the layer outputs it, as it was then
    (with a warning when that pool was not the default `"mean"`).
    """
    if isinstance(spec, dict) and "address" in spec:
        feature = _from_config(spec, modality)
    else:
        feature = Feature(spec)
    if modality and feature.pool is None:
        feature.pool = "mean"
    return feature


def _from_config(config, modality):
    address = config["address"]
    if "pooling" in config or "pool" not in config:
        return Feature(address, config.get("pooling"))
    legacy = config["pool"]
    if modality:
        return Feature(address, legacy)
    if legacy != "mean":
        warnings.warn(
            f"Feature {_label(address)} has the config key 'pool' ({legacy!r}), "
            "written before pooling applied to a term's single address: that "
            "pool was ignored then and is ignored now (the layer's output is "
            f"read as it is). To pool it, give Feature({address!r}, "
            f"pool={legacy!r}) (config key 'pooling').",
            stacklevel=4,
        )
    return Feature(address)


def _label(address):
    if isinstance(address, keras.layers.Layer):
        return f"<layer {address.name!r}>"
    return repr(address)


def pool_tokens(tensor, pool="mean"):
    """(batch, d), (batch, T, d) or (batch, H, W, d) -> (batch, d).

    Args:
        tensor: the features; the last axis is the embedding width.
        pool: `"mean"` (or None, a modality's default) or `"max"` over the
            middle axes, or `"first"` (token 0 of a (batch, T, d) sequence).

    Example:

    >>> import numpy as np
    >>> tokens = np.arange(12, dtype="float32").reshape(1, 3, 4)
    >>> [ops.convert_to_numpy(pool_tokens(tokens, p))[0].tolist()
    ...  for p in ("mean", "first", "max")]
    [[4.0, 5.0, 6.0, 7.0], [0.0, 1.0, 2.0, 3.0], [8.0, 9.0, 10.0, 11.0]]
    """
    rank = len(tensor.shape)
    if rank == 2:
        return tensor
    if pool == "first":
        return tensor[:, 0]
    axes = tuple(range(1, rank - 1))
    return ops.max(tensor, axis=axes) if pool == "max" else ops.mean(tensor, axis=axes)


def check_pool_shape(feature, shape, role):
    """Raises unless a feature of `shape` can be pooled as `feature` says."""
    if len(shape) < 2:
        raise ValueError(
            f"Feature {_label(feature.address)} of the {role} has shape {shape}; "
            "a modality embedding must be (batch, d), (batch, T, d) or "
            "(batch, H, W, d)."
        )
    if feature.pool == "first" and len(shape) != 3:
        raise ValueError(
            f"Feature {_label(feature.address)} of the {role} has shape {shape}; "
            "pool='first' takes token 0 of a (batch, T, d) sequence. Use "
            "pool='mean' or 'max' for this shape."
        )


def _is_graph_model(layer):
    """A functional or Sequential model, whose inner layers can be reached."""
    if isinstance(layer, keras.Sequential):
        return True
    if not isinstance(layer, keras.Model):
        return False
    try:
        return bool(layer.inputs) and bool(layer.outputs)
    except (AttributeError, ValueError):
        return False


def layer_paths(model, prefix=""):
    """Every address in `model`: (path, layer) pairs, nested models included."""
    pairs = []
    for layer in model.layers:
        path = prefix + layer.name
        pairs.append((path, layer))
        if _is_graph_model(layer):
            pairs.extend(layer_paths(layer, path + "/"))
    return pairs


def _same_layer(layer):
    return layer


def _close_paths(address, paths):
    leaf = address.rsplit("/", 1)[-1]
    same_leaf = [p for p in paths if p.rsplit("/", 1)[-1] == leaf]
    close = difflib.get_close_matches(address, paths, n=5, cutoff=0.5)
    return list(dict.fromkeys(same_leaf + close))[:6]


def resolve_address(model, role, address):
    """The path of `address` in `model`, checked: it exists, once."""
    pairs = layer_paths(model)
    if isinstance(address, keras.layers.Layer):
        found = [path for path, layer in pairs if layer is address]
        if not found:
            raise ValueError(
                f"Layer {address.name!r} (a layer object) is not part of the "
                f"{role}. Pass a layer of the {role}, or its name or path."
            )
        if len(found) > 1:
            raise ValueError(
                f"Layer {address.name!r} appears in the {role} at several "
                f"places {found}, so the address is ambiguous. Give the path "
                "of the place you mean, under a layer that is used once."
            )
        return found[0]
    paths = [path for path, _ in pairs]
    if address in paths:
        return address
    hint = _close_paths(address, paths)
    hint = f" Did you mean {hint}?" if hint else ""
    parent = address.rsplit("/", 1)[0] if "/" in address else None
    where = ""
    if parent is not None and parent in paths:
        sub = dict(pairs)[parent]
        if not _is_graph_model(sub):
            where = (
                f" {parent!r} is a {type(sub).__name__}, not a functional or "
                "Sequential model, so the layers inside it cannot be reached; "
                f"name {parent!r} itself, or build it with the functional API."
            )
    raise ValueError(
        f"The {role} has no layer named {address!r}.{hint}{where} Addresses are "
        "top-level layer names or paths through nested models joined by '/' "
        f"(its top-level layers: {[layer.name for layer in model.layers]})."
    )


class FeatureExtractor:
    """One forward call of a model that returns its output and named features.

    Args:
        model: a functional or Sequential `keras.Model`.
        role: `"teacher"` or `"student"`, for error messages.
        paths: addresses checked by `resolve_address` (strings).

    Calling it returns `(output, {path: tensor})`. Raises at construction
    when an addressed layer, or a model holding it, is called more than once
    (the address would be ambiguous) or not on the way to the output.
    """

    def __init__(self, model, role, paths):
        self.role = role
        self.paths = sorted(set(paths))
        self.model, symbolic = _view(model, role, self.paths, "")
        self.symbolic = dict(zip(self.paths, symbolic, strict=True))
        """path -> the feature's symbolic tensor (shapes and dtypes)."""

    def __call__(self, inputs, training=None):
        output, *features = self.model(inputs, training=training)
        return output, dict(zip(self.paths, features, strict=True))


def _view(model, role, paths, prefix):
    """A functional model returning `model`'s output, then the outputs at
    `paths`; and those outputs' symbolic tensors."""
    records, views = {}, {}

    def call(layer, *args, **kwargs):
        inner = sorted(
            p.split("/", 1)[1] for p in paths if p.startswith(layer.name + "/")
        )
        if inner:
            if id(layer) not in views:  # one view, however often it is called
                views[id(layer)] = _view(layer, role, inner, f"{prefix}{layer.name}/")
            sub = views[id(layer)][0]
            output, *features = sub(*args, **kwargs)
            for path, feature in zip(inner, features, strict=True):
                records.setdefault(f"{layer.name}/{path}", []).append(feature)
        else:
            output = layer(*args, **kwargs)
        records.setdefault(layer.name, []).append(output)
        return output

    if isinstance(model, keras.Sequential):
        spec = model.inputs[0]
        inputs = keras.Input(batch_shape=spec.shape, dtype=spec.dtype)
        output = inputs
        for layer in model.layers:
            output = call(layer, output)
    else:
        view = keras.models.clone_model(
            model, clone_function=_same_layer, call_function=call
        )
        inputs, output = view.input, view.output
    input_layers = {
        layer.name
        for layer in model.layers
        if isinstance(layer, keras.layers.InputLayer)
    }
    features = []
    for path in paths:
        if path in input_layers:
            raise ValueError(
                f"{prefix + path!r} is an input of the {role}, not a layer that "
                "computes a feature. Name the layer whose output is the "
                "modality's embedding (e.g. the encoder's last layer)."
            )
        found = records.get(path, [])
        if len(found) != 1:
            raise _call_count_error(role, prefix + path, len(found))
        features.append(found[0])
    return keras.Model(inputs, [output, *features], name=model.name), features


def _call_count_error(role, path, calls):
    if calls == 0:
        return ValueError(
            f"Layer {path!r} of the {role} is not on the way from its inputs "
            "to its output, so a forward pass never computes it. Name a layer "
            "that the output depends on."
        )
    return ValueError(
        f"{path!r} of the {role} is called {calls} times in one forward pass "
        "(a shared layer or sub-model), so the address is ambiguous: each "
        "call gives another tensor. Give each modality its own layer (for "
        "example one Dense per modality instead of one shared projection), or "
        "address a layer that is called once."
    )
