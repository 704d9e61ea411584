"""Packaging: light import, doctests' home, the CLI, the quickstart example."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import pytest
from helpers import run_python

import keras_gramkd

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # a fresh Python process
def test_import_is_light_and_core_adds_nothing_beyond_keras():
    """`import keras_gramkd` imports no keras; the core adds nothing keras does not."""
    code = (
        "import sys; import keras_gramkd; print('keras' in sys.modules); "
        "import keras; before = set(sys.modules); keras_gramkd.Distiller; "
        "keras_gramkd.datasets.load_mfeat; keras_gramkd.ops; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))"
    )
    keras_loaded, added = run_python(code).strip().splitlines()
    assert keras_loaded == "False"
    # keras_gramkd's modules register with Keras while keras is imported.
    assert added in ("[]", "['keras_gramkd']")


@pytest.mark.slow  # fresh Python processes
@pytest.mark.parametrize(
    "first, kind",
    [
        ("keras_gramkd", "Distiller"),
        ("keras", "Distiller"),
        ("keras_gramkd", "StudentCheckpointDistiller"),  # the tuner's
    ],
)
def test_saved_distiller_loads_after_import_keras_gramkd(tmp_path, first, kind):
    from helpers import make_data, make_net, modality_map

    from keras_gramkd.tuning import StudentCheckpointDistiller

    cls = {"Distiller": keras_gramkd.Distiller}.get(kind, StudentCheckpointDistiller)
    distiller = cls(
        make_net("t", 8),
        make_net("s", 3),
        teacher_modalities=modality_map("t"),
        student_modalities=modality_map("s"),
        gram_weight=0.5,
    )
    distiller.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
    distiller.fit(*make_data(8), verbose=0)
    distiller.save(tmp_path / "d.keras")
    second = "keras" if first == "keras_gramkd" else "keras_gramkd"
    code = (
        f"import sys; import {first}; import {second}; "
        "print('keras_gramkd.distiller' in sys.modules); "
        f"d = keras.saving.load_model({str(tmp_path / 'd.keras')!r}); "
        "print(type(d).__name__, d.gram_weight)"
    )
    before, loaded = run_python(code).strip().splitlines()[-2:]
    assert before == "True"
    assert loaded == f"{kind} 0.5"


def test_public_api():
    assert keras_gramkd.__version__ == "0.1.0"
    for name in keras_gramkd.__all__:
        assert hasattr(keras_gramkd, name)
    assert keras_gramkd.Distiller.__module__ == "keras_gramkd.distiller"
    with pytest.raises(AttributeError, match="no attribute 'Distillr'"):
        keras_gramkd.Distillr  # noqa: B018


@pytest.mark.slow  # a fresh Python process
def test_cli_lists_commands_and_rejects_unknown_backend():
    out = subprocess.run(
        [sys.executable, "-m", "keras_gramkd", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "{demo,tune,export}" in out
    bad = subprocess.run(
        [sys.executable, "-m", "keras_gramkd", "demo", "--backend", "mxnet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "invalid choice: 'mxnet'" in bad.stderr


@pytest.mark.slow  # a fresh Python process
def test_cli_backend_flag_selects_the_backend():
    code = (
        "import os, keras_gramkd.cli as c\n"
        "c.COMMANDS = {'demo': ('keras_gramkd.cli', 'h', '_noop_add', '_noop_run')}\n"
        "c._noop_add = lambda p: None\n"
        "c._noop_run = lambda a: print(\n"
        "    os.environ['KERAS_BACKEND'], __import__('keras').backend.backend()\n"
        ") or 0\n"
        "raise SystemExit(c.main(['demo', '--backend', 'torch']))\n"
    )
    assert run_python(code, backend="jax").split() == ["torch", "torch"]


def test_missing_backend_package_names_the_extra_to_install():
    # As if jax were not installed: the CLI and the lazy names both say which
    # extra to install, instead of Keras' raw "No module named 'jax'".
    code = (
        "import importlib, importlib.util, os, sys\n"
        "find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n == 'jax' else find(n, *a)\n"
        "import keras_gramkd.cli as c\n"
        "print(c.main(['demo', '--backend', 'jax']), 'keras' in sys.modules)\n"
        "real = importlib.import_module\n"
        "def fake(name, *a):\n"
        "    if name == 'keras_gramkd.distiller':\n"
        "        raise ModuleNotFoundError(\"No module named 'jax'\", name='jax')\n"
        "    return real(name, *a)\n"
        "importlib.import_module = fake\n"
        "import keras_gramkd\n"
        "try:\n"
        "    keras_gramkd.Distiller\n"
        "except ModuleNotFoundError as e:\n"
        "    print(e)\n"
    )
    env = dict(os.environ, KERAS_BACKEND="jax")
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    extra = 'pip install "keras-gramkd[jax]"'
    # 2, and the CLI stopped before anything imported keras.
    assert done.stdout.splitlines()[0] == "2 False", done.stderr[-2000:]
    assert "gramkd: error: The Keras backend 'jax' needs the jax package" in done.stderr
    assert extra in done.stderr
    assert extra in done.stdout.splitlines()[1]


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


def _readme_block(heading):
    """The first python block after `heading` in the README."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(heading) :]
    start = section.index("```python") + len("```python")
    return section[start : section.index("```\n", start)]


@pytest.mark.slow
def test_readme_quickstart_runs_as_pasted(tmp_path):
    code = _readme_block("## Quickstart")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        cwd=tmp_path,
        env=dict(os.environ, KERAS_BACKEND=keras.backend.backend()),
    ).stdout
    teacher = float(re.search(r"teacher ([\d.]+)", out).group(1))
    student = float(re.search(r"student ([\d.]+)", out).group(1))
    assert teacher > 0.85 and 0.1 < student <= 1.0  # 10 classes: chance is 0.1
    reloaded = keras.saving.load_model(tmp_path / "student.keras")
    assert reloaded.name == "student" and reloaded.output.shape[-1] == 10


@pytest.mark.slow
def test_readme_study_runs_as_pasted_after_the_quickstart(tmp_path):
    code = _readme_block("## Quickstart") + _readme_block("## Does it help your model")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=tmp_path,
        env=dict(os.environ, KERAS_BACKEND=keras.backend.backend()),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == [
        "| teacher",
        "| labels",
        "| kd",
        "| kd+gram",
        "| kd+modality_sp",
    ]
    stored = json.loads((tmp_path / "study.json").read_text())
    assert stored["config"]["seeds"] == [0, 1, 2]
    assert set(stored["paired_vs_reference"]) == {"labels", "kd+gram", "kd+modality_sp"}
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
