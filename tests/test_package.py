"""Packaging: imports in any order, saved files after the import, the example."""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import pytest
from helpers import PUBLIC_MODULES, make_data, make_net, modality_map, run_python

import keras_gramkd

ROOT = Path(__file__).resolve().parent.parent
# `from <module> import <all its names>` is tested as the first line of a fresh
# interpreter for each of PUBLIC_MODULES.


def _public_names(module_name):
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is None:  # the names the module defines itself
        names = [
            n
            for n, v in vars(module).items()
            if not n.startswith("_") and getattr(v, "__module__", None) == module_name
        ]
    return sorted(names)


def test_public_modules_list_is_complete():
    packages = {
        f"keras_gramkd.{p.parent.name}"
        for p in (ROOT / "keras_gramkd").glob("*/__init__.py")
    }
    assert packages <= set(PUBLIC_MODULES)
    assert set(keras_gramkd.__all__) >= {
        m.split(".")[1] for m in PUBLIC_MODULES[1:]
    } - {"demo", "export", "saving", "zoo"}  # imported on their own


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_name_imports_first_in_a_fresh_interpreter(module):
    names = _public_names(module)
    assert names, module
    code = (
        f"from {module} import {', '.join(names)}\n"
        "import sys, keras\n"
        "print(keras.backend.backend(), 'keras_gramkd.distiller' in sys.modules)\n"
    )
    no_tuner = importlib.util.find_spec("keras_tuner") is None
    if module == "keras_gramkd.tuning" and no_tuner:
        # Without the tune extra, the first use names the extra to install.
        with pytest.raises(subprocess.CalledProcessError) as failed:
            run_python(code)
        assert 'pip install "keras-gramkd[tune]"' in failed.value.stderr
        return
    out = run_python(code).strip().splitlines()[-1]
    # The backend is KERAS_BACKEND's, and the saveable classes are registered.
    assert out == f"{keras.backend.backend()} True"


def test_import_adds_no_import_hook_and_nothing_beyond_keras():
    code = (
        "import sys, keras\n"
        "hooks, before = list(sys.meta_path), set(sys.modules)\n"
        "import keras_gramkd\n"
        "print(sys.meta_path == hooks)\n"
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))\n"
    )
    same_hooks, added = run_python(code).strip().splitlines()[-2:]
    assert same_hooks == "True"
    assert added == "['keras_gramkd']"


def _saved_distiller(tmp_path, kind):
    from keras_gramkd import FitNetTerm, GramTerm, KDTerm, RKDTerm, SPTerm
    from keras_gramkd.tuning import StudentCheckpointDistiller

    cls = StudentCheckpointDistiller if kind == "tuner" else keras_gramkd.Distiller
    terms = None
    if kind == "terms":
        terms = [
            KDTerm(weight=0.5, temperature=2.0),
            GramTerm(
                weight=0.25,
                teacher_features=modality_map("t"),
                student_features=modality_map("s"),
            ),
            SPTerm("t_a", "s_a", weight=30.0),
            RKDTerm("t_b", "s_b", distance_weight=2.0, angle_weight=3.0),
            FitNetTerm("t_c", "s_c", weight=0.1),
        ]
    short_form = dict(
        teacher_modalities=modality_map("t"),
        student_modalities=modality_map("s"),
        gram_weight=0.5,
    )
    distiller = cls(
        make_net("t", 8),
        make_net("s", 3),
        **(short_form if terms is None else {"terms": terms}),
    )
    distiller.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
    distiller.fit(*make_data(8), verbose=0)
    path = tmp_path / "d.keras"
    distiller.save(path)
    return distiller, path


@pytest.mark.slow  # fresh Python processes
@pytest.mark.parametrize(
    "imports, kind",
    [
        ("import keras_gramkd; import keras", "short"),
        ("import keras; import keras_gramkd", "short"),
        ("import keras_gramkd; import tensorflow; import keras", "short"),
        (
            "import importlib.util, keras_gramkd; importlib.util.find_spec('keras'); "
            "import keras",
            "short",
        ),
        ("import keras_gramkd, keras", "terms"),
        ("import keras_gramkd, keras", "tuner"),
    ],
)
def test_saved_distiller_loads_in_a_fresh_process(tmp_path, imports, kind):
    if "tensorflow" in imports and keras.backend.backend() != "tensorflow":
        pytest.importorskip("tensorflow")
    distiller, path = _saved_distiller(tmp_path, kind)
    code = (
        f"{imports}\n"
        f"d = keras.saving.load_model({str(path)!r})\n"
        "print(type(d).__name__, [(t.name, t.weight) for t in d.terms])\n"
    )
    loaded = run_python(code).strip().splitlines()[-1]
    expected = [(t.name, t.weight) for t in distiller.terms]
    assert loaded == f"{type(distiller).__name__} {expected}"


def test_public_api():
    assert keras_gramkd.__version__ == "0.1.0"
    for name in keras_gramkd.__all__:
        assert hasattr(keras_gramkd, name)
    assert keras_gramkd.Distiller.__module__ == "keras_gramkd.distiller"
    with pytest.raises(AttributeError, match="no attribute 'Distillr'"):
        keras_gramkd.Distillr  # noqa: B018


def test_missing_backend_package_names_the_extra_to_install():
    # As if jax were not installed: Keras' raw "No module named 'jax'" becomes a
    # message naming the extra.
    code = (
        "import sys\n"
        "sys.modules['jax'] = None\n"
        "try:\n"
        "    import keras_gramkd\n"
        "except ModuleNotFoundError as error:\n"
        "    print(error.name, '|', error)\n"
    )
    env = dict(os.environ, KERAS_BACKEND="jax")
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    name, message = done.stdout.strip().split(" | ")
    assert name == "jax", done.stderr[-2000:]
    assert "The Keras backend 'jax' needs the jax package" in message
    assert 'pip install "keras-gramkd[jax]"' in message


@pytest.mark.slow
def test_quickstart_example_trains_teacher_and_student():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--epochs", "3"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        env=dict(os.environ, KERAS_BACKEND=keras.backend.backend()),
    ).stdout
    teacher = float(re.search(r"teacher test accuracy: ([\d.]+)", out).group(1))
    student = float(re.search(r"student test accuracy: ([\d.]+)", out).group(1))
    assert teacher > 0.85  # 10 classes: chance is 0.1
    assert 0.1 < student <= 1.0
