"""Converting in a `KERAS_BACKEND=tensorflow` child process.

Keras writes `.tflite` files only under TensorFlow (and ONNX from JAX only with
jax2onnx). From another backend the parent saves the student to a `.keras` file
and writes a JSON job: the model file, the files to write, the calibration
`.npz` and the custom classes and functions to import by module and name. The
child, `python -m keras_gramkd.export _child job.json`, loads the model and
writes the files with each format's converter. The child knows the formats that
`keras_gramkd.export.formats` registers at import (TFLite and ONNX); a format
registered elsewhere must convert in process (`ExportFormat.in_process`).
"""

import builtins
import dis
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import keras
import numpy as np

from keras_gramkd.export.errors import ExportError
from keras_gramkd.export.formats import child_knows, get_format
from keras_gramkd.export.inputs import all_layers

CHILD_COMMAND = "_child"
"""The first argument of `python -m keras_gramkd.export` that runs a job."""


def _global_names(code):
    """Non-builtin global names that a function's bytecode reads."""
    names = {
        i.argval
        for i in dis.get_instructions(code)
        if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")
    }
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return {name for name in names if not hasattr(builtins, name)}


def custom_objects(model, formats):
    """`{saved name: [module, qualified name]}` the child process must import.

    These are the model's own classes and the named functions of its `Lambda`
    layers. One defined in `__main__` (a script or notebook) or inside a
    function cannot be imported there, and a saved Python lambda keeps only
    its bytecode, not the globals it reads: each is a `ValueError` that says
    what to move where.
    """
    layers = all_layers(model)
    classes = {type(layer) for layer in layers}
    objects = {
        keras.saving.get_registered_name(c): c
        for c in classes
        if c.__module__.split(".")[0] != "keras"
    }
    stuck = []
    for layer in layers:
        if not isinstance(layer, keras.layers.Lambda):
            continue
        if layer.function.__name__ != "<lambda>":
            objects[layer.function.__name__] = layer.function
        elif _global_names(layer.function.__code__):
            names = sorted(_global_names(layer.function.__code__))
            stuck.append(f"the Lambda layer {layer.name!r}, whose lambda reads {names}")
    stuck += sorted(
        f"{obj.__qualname__} (in {obj.__module__})"
        for obj in objects.values()
        if obj.__module__ == "__main__" or "<locals>" in obj.__qualname__
    )
    if stuck:
        raise ValueError(
            f"The student uses {'; '.join(stuck)}. Exporting {formats} from the "
            f"{keras.backend.backend()} backend converts in a TensorFlow child "
            "process, which cannot import a class or function defined in "
            "__main__ (your script or notebook) or inside a function, nor the "
            "globals of a saved lambda. Move it into a module (a .py file next "
            "to your script; a lambda becomes a def there) and import it from "
            "there, or export under KERAS_BACKEND=tensorflow."
        )
    return {name: [obj.__module__, obj.__qualname__] for name, obj in objects.items()}


def child_objects(model, jobs):
    """Checks that the child process can run `jobs`; returns `custom_objects`."""
    formats = sorted({job["fmt"] for job in jobs})
    unknown = [name for name in formats if not child_knows(get_format(name))]
    if unknown:
        raise ValueError(
            f"The format(s) {unknown} cannot be converted under the "
            f"{keras.backend.backend()} backend, and the TensorFlow child process "
            "knows only the formats built into keras_gramkd.export.formats. Add "
            "this backend to the format's `in_process` backends, or export under "
            "a backend listed there."
        )
    if importlib.util.find_spec("tensorflow") is None:
        raise ImportError(
            f"Exporting {formats} from the {keras.backend.backend()} backend "
            "converts in a TensorFlow child process, and tensorflow is not "
            'installed. Install it with: pip install "keras-gramkd[tensorflow,export]"'
        )
    return custom_objects(model, formats)


def _write_job(model, jobs, calibration, int8_io, workdir, objects):
    """Saves the model (and calibration) in `workdir`; returns the job's path."""
    model_path = Path(workdir) / "student.keras"
    model.save(model_path)
    spec = {
        "model": str(model_path),
        "jobs": jobs,
        "int8_io": int8_io,
        "objects": objects,
        "calibration": None,
    }
    if calibration is not None:
        spec["calibration"] = str(Path(workdir) / "calibration.npz")
        np.savez(spec["calibration"], **calibration)
    spec_path = Path(workdir) / "job.json"
    spec_path.write_text(json.dumps(spec))
    return spec_path


def run_child(model, jobs, calibration, int8_io, workdir, objects):
    """Converts `jobs` in a `KERAS_BACKEND=tensorflow` child process."""
    spec_path = _write_job(model, jobs, calibration, int8_io, workdir, objects)
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "tensorflow"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    paths = [p for p in sys.path if p] + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    result = subprocess.run(
        [sys.executable, "-m", "keras_gramkd.export", CHILD_COMMAND, str(spec_path)],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-25:])
        raise ExportError(
            "Converting in the TensorFlow child process failed "
            f"(exit {result.returncode}):\n{tail}"
        )


def child_main(spec_path):
    """Entry point of the child process: converts the jobs of `spec_path`."""
    spec = json.loads(Path(spec_path).read_text())
    objects = {}
    for name, (module, qualname) in spec["objects"].items():
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        objects[name] = obj
    # The parent wrote this file from the model it holds in memory, so its
    # Lambda layers are the caller's own code, not an untrusted file's.
    model = keras.saving.load_model(
        spec["model"], custom_objects=objects, compile=False, safe_mode=False
    )
    calibration = None
    if spec["calibration"]:
        with np.load(spec["calibration"]) as npz:
            calibration = {k: npz[k] for k in npz.files}
    for job in spec["jobs"]:
        get_format(job["fmt"]).convert(
            model, job["out"], job["quantize"], calibration, spec["int8_io"]
        )
    return 0
