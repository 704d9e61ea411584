"""A teacher or a student inside the `Distiller`: its inputs and one forward call.

`Network` knows which batch keys a model reads (each network gets the dict
keys its `keras.Input`s declare, so teacher and student may take different
inputs from one batch) and runs the model once per step, returning its logits
together with every feature the distillation terms address (see
`keras_gramkd.features`), all from that single call.
"""

import keras

from keras_gramkd.features import (
    FeatureExtractor,
    check_pool_shape,
    layer_paths,
    resolve_address,
)
from keras_gramkd.layers import ModalityDropout


def input_specs(model):
    """How a model takes its inputs (dict keys, a list of names, one name, or
    None) and the shape each named input declares."""
    try:
        structure = model.input
    except (AttributeError, ValueError):
        return None, {}
    tensors = keras.tree.flatten(structure)
    if isinstance(structure, dict):
        names = dict.fromkeys(structure)
        shapes = {key: tuple(structure[key].shape) for key in structure}
        return names, shapes
    shapes = {tensor.name: tuple(tensor.shape) for tensor in tensors}
    if isinstance(structure, (list, tuple)):
        return [tensor.name for tensor in structure], shapes
    return structure.name, shapes


def symbolic_output(model, role):
    """The model's single symbolic output, or None for a subclassed model."""
    try:
        output = model.output
    except (AttributeError, ValueError):
        return None
    if isinstance(output, (list, tuple, dict)):
        raise ValueError(
            f"The {role} has {len(output)} outputs; the Distiller needs a model "
            "with one output, the class logits. Wrap it: "
            f"keras.Model({role}.inputs, {role}.outputs[i])."
        )
    return output


def check_logits_layer(model, role):
    """Refuses a model whose last layer applies a softmax."""
    last = model.layers[-1] if getattr(model, "layers", None) else None
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    if isinstance(last, keras.layers.Softmax) or activation in (
        "softmax",
        "log_softmax",
    ):
        raise ValueError(
            f"The {role}'s output layer {last.name!r} applies a softmax, but "
            "distillation needs logits: softened probabilities are formed from "
            "logits / temperature. Build the model with a linear output layer "
            "(activation=None) and compile with from_logits=True, or wrap it: "
            f"keras.Model({role}.inputs, {role}.layers[-1].input) for a "
            "separate Softmax layer."
        )


def model_layers(model):
    """Every layer of `model`, nested models' layers included."""
    found = []
    for layer in getattr(model, "layers", []):
        found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(model_layers(layer))
    return found


def check_separate(teacher, student):
    """Raises when teacher and student are one model or share a layer."""
    if teacher is student:
        raise ValueError(
            "The teacher and the student are the same model: the teacher is "
            "frozen, so nothing would train. Build the student as a separate "
            "model (keras.models.clone_model(teacher) for a copy to shrink)."
        )
    teacher_layers = {id(layer): layer for layer in model_layers(teacher)}
    shared = [
        layer.name
        for layer in model_layers(student)
        if id(layer) in teacher_layers and layer.weights
    ]
    if shared:
        raise ValueError(
            f"The teacher and the student share layer(s) {shared}: freezing the "
            "teacher would freeze them in the student, and training the student "
            "would change the teacher. Give the student its own layers (for "
            "example keras.models.clone_model on the shared encoder, then "
            "set_weights(encoder.get_weights()) to start from the teacher's)."
        )


class Network:
    """A teacher or a student: which batch keys it reads, and one forward call.

    Args:
        model: the `keras.Model`.
        role: `"teacher"` or `"student"`, for messages.
    """

    def __init__(self, model, role):
        self.model = model
        self.role = role
        self.inputs, self.input_shapes = input_specs(model)
        self.extractor = None
        self.mask_path = None

    def add_features(self, features, mask_layer=None):
        """Resolves `features` (a list of `Feature`s, their addresses replaced
        by checked paths) and builds the one-call extractor.

        Returns:
            dict path -> shape of each addressed feature.
        """
        if not features and mask_layer is None:
            return {}
        if symbolic_output(self.model, self.role) is None:
            raise ValueError(
                f"The {self.role} has no symbolic outputs (a subclassed model?), "
                "so its layers cannot be read. Build it with the functional "
                "API, or set the weight of the terms that read its features to 0 "
                "(gram_weight=0 in the short form)."
            )
        for feature in features:
            feature.address = resolve_address(self.model, self.role, feature.address)
        paths = [feature.address for feature in features]
        if mask_layer is not None:
            self.mask_path = resolve_address(self.model, self.role, mask_layer)
            paths.append(self.mask_path)
        self.extractor = FeatureExtractor(self.model, self.role, paths)
        shapes = {
            path: tuple(getattr(tensor, "shape", ()))
            for path, tensor in self.extractor.symbolic.items()
        }
        for feature in features:
            check_pool_shape(feature, shapes[feature.address], self.role)
        return shapes

    def check_mask(self, n_modalities):
        """Raises unless the mask layer outputs a (batch, n_modalities) mask."""
        output = self.extractor.symbolic[self.mask_path]
        layer = dict(layer_paths(self.model)).get(self.mask_path)
        if isinstance(layer, ModalityDropout):
            if not layer.return_mask:
                raise ValueError(
                    f"student_mask_layer {self.mask_path!r} is a ModalityDropout "
                    "without return_mask=True; build it with return_mask=True so "
                    "that it outputs (views, mask)."
                )
            output = keras.tree.flatten(output)[-1]  # (views, mask)
        if isinstance(output, (list, tuple)) or tuple(output.shape)[1:] != (
            n_modalities,
        ):
            shape = (
                [tuple(o.shape) for o in output]
                if isinstance(output, (list, tuple))
                else tuple(output.shape)
            )
            raise ValueError(
                f"student_mask_layer {self.mask_path!r} must output a (batch, "
                f"{n_modalities}) modality mask, one column per modality in the "
                f"order of the Distiller's modality_names; it outputs {shape}."
            )

    def _check_shape(self, key, value):
        expected = self.input_shapes.get(key)
        found = getattr(value, "shape", None)
        if expected is None or found is None:
            return
        found = tuple(found)
        if len(found) != len(expected) or any(
            e is not None and f is not None and e != f
            for e, f in zip(expected[1:], found[1:], strict=False)
        ):
            raise ValueError(
                f"Input {key!r} of the {self.role} has shape {found}, but the "
                f"{self.role} expects {expected} (None: any size). Check which "
                "array the batch holds under this key."
            )

    def input_keys(self, x):
        """The batch keys this network reads, or None where x is not a dict
        holding all of them."""
        if self.inputs is None or not isinstance(x, dict):
            return None
        keys = [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)
        return keys if all(key in x for key in keys) else None

    def select_inputs(self, x):
        """The part of a batch this network reads."""
        if self.inputs is None or not isinstance(x, dict):
            return x
        keys = [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)
        missing = [key for key in keys if key not in x]
        if missing:
            raise ValueError(
                f"The {self.role} expects input(s) {missing}, but the batch has "
                f"keys {sorted(x)}. Give x one entry per model input, named as "
                "the model's keras.Input (or its input dict keys)."
            )
        for key in keys:
            self._check_shape(key, x[key])
        if isinstance(self.inputs, dict):
            return {key: x[key] for key in keys}
        if isinstance(self.inputs, list):
            return [x[key] for key in keys]
        return x[self.inputs]

    def forward(self, x, training):
        """(logits, {path: feature}, mask or None) from one call."""
        inputs = self.select_inputs(x)
        if self.extractor is None:
            return self.model(inputs, training=training), {}, None
        logits, features = self.extractor(inputs, training=training)
        mask = None
        if self.mask_path is not None:
            mask = keras.tree.flatten(features[self.mask_path])[-1]
        return logits, features, mask
