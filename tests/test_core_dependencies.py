"""The library needs keras and numpy only; rich and matplotlib are the application's.

Each check runs in a fresh interpreter in which those packages cannot be imported.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import pytest
from helpers import PUBLIC_MODULES

from gramkd import cli

ROOT = Path(__file__).resolve().parent.parent
APPLICATION_PACKAGES = ("rich", "matplotlib")
# Every public module of the library (zoo: the reference networks, pure keras).
CORE_MODULES = tuple(m for m in PUBLIC_MODULES if m != "keras_gramkd.demo")
# Public names that are not the library's: `gramkd tune`'s entry point, and the
# hypermodels of the tune extra (keras_tuner imports rich itself).
NOT_CORE = (
    "keras_gramkd.tuning.run_tune",
    "keras_gramkd.tuning.DistillerHyperModel",
    "keras_gramkd.tuning.TermFamilyHyperModel",
)

# Blocks matplotlib from the start; keras needs rich (one of keras' own
# dependencies), so rich is blocked once keras is imported, and the rich modules
# keras loaded are forgotten (keras keeps its references): any later import of
# rich fails, and any rich module in sys.modules at the end was imported again.
CORE_CHILD = """
import importlib, importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    blocked = {"matplotlib"}

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Block())
import keras
for name in [m for m in sys.modules if m.split(".")[0] == "rich"]:
    del sys.modules[name]
Block.blocked.add("rich")

import numpy as np

for module_name in MODULES:
    module = importlib.import_module(module_name)
    for name in getattr(module, "__all__", ()):
        if f"{module_name}.{name}" not in NOT_CORE:
            getattr(module, name)

from keras_gramkd import Distiller, plots, zoo

dims = {"a": 4, "b": 3}
rng = np.random.default_rng(0)
x = {v: rng.normal(size=(8, d)).astype("float32") for v, d in dims.items()}
y = np.arange(8) % 3
distiller = Distiller(
    zoo.build_teacher(dims, n_classes=3),
    zoo.build_student(dims, n_classes=3),
    teacher_modalities=zoo.view_addresses("t", dims),
    student_modalities=zoo.view_addresses("s", dims),
    kd_weight=0.5,
    gram_weight=2.0,
)
distiller.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
steps = []
count = keras.callbacks.LambdaCallback(
    on_train_batch_end=lambda batch, logs: steps.append(batch)
)
history = distiller.fit(x, y, batch_size=8, verbose=0, callbacks=[count])
try:
    plots.plot_gram_matrices(np.eye(2), np.eye(2), ["a", "b"])
    plot_error = None
except ImportError as error:
    plot_error = str(error)
print(json.dumps({
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in Block.blocked),
    "steps": len(steps),
    "losses": {k: float(v[-1]) for k, v in history.history.items()},
    "plot_error": plot_error,
}))
"""


def _run(code, **env):
    """Runs `code` in a fresh interpreter that imports this checkout."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=path, **env),
    )


def _extra_requirements(extras, extra):
    """The distribution names an extra installs, its keras-gramkd[...] expanded."""
    names = set()
    for requirement in extras[extra]:
        name, _, inner = re.match(r"([\w.-]+)(\[([\w,]+)\])?", requirement).groups()
        if name == "keras-gramkd":
            for nested in inner.split(","):
                names |= _extra_requirements(extras, nested)
        else:
            names.add(name)
    return names


def _project():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_core_dependencies_are_keras_and_numpy():
    names = [re.match(r"[\w.-]+", r).group(0) for r in _project()["dependencies"]]
    assert names == ["keras", "numpy"]


def test_each_command_extra_installs_what_the_command_needs():
    extras = _project()["optional-dependencies"]
    everything = _extra_requirements(extras, "all")
    for extra, modules in cli.COMMAND_EXTRAS.values():
        # The module and distribution names agree for rich and matplotlib.
        assert set(modules) <= _extra_requirements(extras, extra), extra
    assert set(APPLICATION_PACKAGES) <= _extra_requirements(extras, "cli")
    for extra in extras:
        assert _extra_requirements(extras, extra) <= everything, extra


def test_readme_demo_command_installs_the_cli_extra():
    readme = (ROOT / "README.md").read_text()
    pattern = r'pip install "\.\[([\w,]+)\]" && \.venv/bin/gramkd demo'
    command = re.search(pattern, readme)
    assert command, "README.md lost its `pip install ... && gramkd demo` command"
    assert "cli" in command.group(1).split(",")


def test_core_imports_and_trains_without_rich_or_matplotlib():
    code = f"MODULES = {CORE_MODULES!r}\nNOT_CORE = {NOT_CORE!r}\n{CORE_CHILD}"
    done = _run(code, KERAS_BACKEND=keras.backend.backend())
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert result["steps"] == 1
    losses = result["losses"]
    terms = [losses[name] for name in ("task_loss", "kd_loss", "gram_loss")]
    assert all(0 < value < float("inf") for value in terms), losses
    # One batch: the total is the weighted sum (task 1, kd 0.5, gram 2).
    total = terms[0] + 0.5 * terms[1] + 2.0 * terms[2]
    assert losses["loss"] == pytest.approx(total, rel=1e-5), losses
    assert result["plot_error"] == (
        'keras_gramkd.plots needs matplotlib: pip install "keras-gramkd[plots]"'
    )


@pytest.mark.parametrize(
    "command, absent",
    [
        ("demo", ["rich"]),
        ("demo", ["matplotlib"]),
        ("demo", ["rich", "matplotlib"]),
        ("tune", ["rich"]),
    ],
)
def test_command_without_the_cli_extra_names_it_before_any_work(command, absent):
    code = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({absent!r}))  # as if not installed\n"
        "from gramkd.cli import main\n"
        f"print(main([{command!r}]), 'keras' in sys.modules)\n"
    )
    done = _run(code)
    assert done.stdout.split() == ["2", "False"], done.stderr[-2000:]
    assert done.stderr == (
        f"gramkd {command}: error: {', '.join(absent)} not installed; install the cli "
        'extra: pip install "keras-gramkd[cli]"\n'
    )


def test_every_package_is_core_or_application():
    packages = {
        f"keras_gramkd.{p.parent.name}"
        for p in (ROOT / "keras_gramkd").glob("*/__init__.py")
    }
    assert packages - set(CORE_MODULES) == {"keras_gramkd.demo"}
