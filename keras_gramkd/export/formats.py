"""The export formats: one `ExportFormat` record per format, in one registry.

A record holds all that `export_student` needs to know about a format: its
name and aliases, the file suffix, the Keras backends that can convert it in
this process (any other converts in a `KERAS_BACKEND=tensorflow` child
process), the converter, the runner that verifies the file and the packages
it needs, the quantisations it allows and where they happen (in the converter,
or on the float32 file afterwards). The pipeline, the verifier and the child
process look formats up here, so a new format is one `register_format` call.

>>> from keras_gramkd.export.formats import format_names, get_format
>>> format_names()
('tflite', 'onnx')
>>> get_format("litert").name, get_format("onnx").suffix
('tflite', '.onnx')
"""

import dataclasses
import importlib.util
from collections.abc import Callable, Mapping

import keras

from keras_gramkd.export.convert import convert_onnx, convert_tflite, quantize_onnx
from keras_gramkd.export.inputs import check_tflite_names
from keras_gramkd.export.runtimes import ONNXRunner, TFLiteRunner

QUANTIZATIONS = (None, "float16", "dynamic", "int8")
"""Every quantisation a format may allow (`None` is float32)."""


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    """One export format: how to write a file and how to verify it.

    Attributes:
        name: The canonical name, e.g. `"tflite"`; also the report's format.
        suffix: The file suffix, e.g. `".tflite"`. Files are named
            `{stem}_{float32|float16|dynamic|int8}{suffix}`.
        convert: `convert(model, out, quantize, calibration, int8_io)` writes
            the file `out` from a float32 `keras.Model`. `calibration` is a dict
            of arrays keyed by input name (or `None`).
        runner: `runner(path)` loads a file for verification and returns an
            object with `dynamic_batch` (bool), `input_dtypes()` (`{input name:
            dtype name}`) and `__call__(data)`: inputs by name -> list of
            float32 output arrays.
        runtime: The package the runner runs the file in, as the report names
            it (e.g. `"onnxruntime"`).
        aliases: Other names accepted for the format, e.g. `("litert",)`.
        in_process: `{Keras backend: None, a module it also needs, or a
            function of no argument that says whether this Keras can}`: the
            backends that convert the format in this process. From any other
            backend the file is written in a TensorFlow child process, which
            knows the formats this module registers at import.
        requires: `(module, what it is for)` pairs imported before converting
            anything, so that a missing runtime fails first, naming the extra.
        quantizations: The quantisations the format allows (from
            `QUANTIZATIONS`).
        quantize_file: `None` when `convert` quantises; else
            `quantize_file(float32_file, out, quantize, calibration)` writes a
            quantised file from the float32 one (which is deleted afterwards
            if float32 was not asked for).
        check_model: `check_model(model)`, run before any conversion; raises
            `ValueError` for a model the format cannot hold.

    Example:

    >>> import numpy as np
    >>> def save_weights(model, out, quantize, calibration, int8_io):
    ...     np.savez(out, *model.get_weights())
    >>> fmt = ExportFormat("weights", ".npz", save_weights, runner=None,
    ...                    runtime="numpy", in_process={"jax": None})
    >>> fmt.converts_in_process("jax"), fmt.converts_in_process("torch")
    (True, False)
    """

    name: str
    suffix: str
    convert: Callable
    runner: Callable
    runtime: str
    aliases: tuple = ()
    in_process: Mapping = dataclasses.field(
        default_factory=lambda: {"tensorflow": None}, hash=False
    )
    requires: tuple = ()
    quantizations: tuple = (None,)
    quantize_file: Callable | None = None
    check_model: Callable | None = None

    def converts_in_process(self, backend=None):
        """Whether `backend` (default: the current one) writes the file here."""
        backend = backend or keras.backend.backend()
        if backend not in self.in_process:
            return False
        need = self.in_process[backend]
        if callable(need):
            return need()
        return need is None or importlib.util.find_spec(need) is not None

    def conversion_quantizations(self, quantizations):
        """The quantisations the converter writes for `quantizations` asked."""
        if self.quantize_file is None:
            return list(quantizations)
        return [None]


_REGISTRY = {}


def torch_onnx_takes_dicts():
    """Whether Keras' torch backend exports ONNX from dict inputs (every
    multi-modal student's): from Keras 3.15; Keras 3.14 refuses them, so there
    the file is written in a TensorFlow child process."""
    major, minor = (int(part) for part in keras.version().split(".")[:2])
    return (major, minor) >= (3, 15)


def format_names():
    """The names of the registered formats, in registration order.

    >>> format_names()[:2]
    ('tflite', 'onnx')
    """
    return tuple(_REGISTRY)


def _aliases():
    return {alias: fmt.name for fmt in _REGISTRY.values() for alias in fmt.aliases}


def get_format(name):
    """The `ExportFormat` called `name` or one of its aliases (any case).

    >>> get_format("LiteRT").name
    'tflite'

    Raises:
        ValueError: No registered format has that name; the message lists them.
    """
    key = str(name).lower()
    key = _aliases().get(key, key)
    if key in _REGISTRY:
        return _REGISTRY[key]
    accepted = ", ".join(
        f"{alias!r} is accepted for {target!r}" for alias, target in _aliases().items()
    )
    raise ValueError(
        f"Unknown export format {name!r}; choose from {list(_REGISTRY)}"
        + (f" ({accepted})." if accepted else ".")
    )


def format_for_file(path):
    """The registered `ExportFormat` whose suffix ends `path`.

    >>> format_for_file("export/student_int8.tflite").name
    'tflite'

    Raises:
        ValueError: No registered format has that suffix.
    """
    text = str(path)
    matches = [f for f in _REGISTRY.values() if text.endswith(f.suffix)]
    if not matches:
        suffixes = [f.suffix for f in _REGISTRY.values()]
        listed = " or ".join(
            [", ".join(suffixes[:-1]), suffixes[-1]] if len(suffixes) > 1 else suffixes
        )
        raise ValueError(f"{path}: expected a {listed} file.")
    return max(matches, key=lambda f: len(f.suffix))


def register_format(fmt):
    """Adds an `ExportFormat` to the registry; `export_student` then accepts it.

    Raises:
        ValueError: Its name, an alias or its suffix is already taken, or it
            allows a quantisation outside `QUANTIZATIONS`.

    Example:

    >>> import numpy as np
    >>> def save_weights(model, out, quantize, calibration, int8_io):
    ...     np.savez(out, *model.get_weights())
    >>> fmt = ExportFormat("weights", ".npz", save_weights, runner=None,
    ...                    runtime="numpy")
    >>> register_format(fmt)
    >>> get_format("weights") is fmt
    True
    >>> unregister_format("weights") is fmt
    True
    """
    taken = set(_REGISTRY) | set(_aliases())
    clash = sorted(taken & {fmt.name, *fmt.aliases})
    if clash:
        raise ValueError(f"Export format name(s) {clash} are already registered.")
    suffix = [f.name for f in _REGISTRY.values() if f.suffix == fmt.suffix]
    if suffix:
        raise ValueError(f"The suffix {fmt.suffix!r} is already {suffix[0]!r}'s.")
    unknown = [q for q in fmt.quantizations if q not in QUANTIZATIONS]
    if unknown:
        raise ValueError(
            f"Format {fmt.name!r} allows unknown quantisation(s) {unknown}; "
            f"choose from {list(QUANTIZATIONS)}."
        )
    _REGISTRY[fmt.name] = fmt


def unregister_format(name):
    """Removes a registered format (by name or alias); returns its record.

    Raises:
        ValueError: No registered format has that name.
    """
    return _REGISTRY.pop(get_format(name).name)


def child_knows(fmt):
    """Whether the TensorFlow child process can convert `fmt` (built in)."""
    return _BUILT_IN.get(fmt.name) is fmt


register_format(
    ExportFormat(
        name="tflite",
        suffix=".tflite",
        convert=convert_tflite,
        runner=TFLiteRunner,
        runtime="ai_edge_litert",
        aliases=("litert",),
        in_process={"tensorflow": None},
        requires=(("ai_edge_litert", "TFLite verification"),),
        quantizations=QUANTIZATIONS,
        check_model=check_tflite_names,
    )
)
register_format(
    ExportFormat(
        name="onnx",
        suffix=".onnx",
        convert=convert_onnx,
        runner=ONNXRunner,
        runtime="onnxruntime",
        in_process={
            "tensorflow": None,
            "torch": torch_onnx_takes_dicts,
            "jax": "jax2onnx",
        },
        requires=(("onnxruntime", "ONNX export and verification"),),
        quantizations=QUANTIZATIONS,
        quantize_file=quantize_onnx,
    )
)
_BUILT_IN = dict(_REGISTRY)
