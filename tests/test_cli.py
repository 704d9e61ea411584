"""The `gramkd` command: help without keras, its options' checks and defaults."""

import os
import subprocess
import sys

import pytest

from gramkd import cli, options
from keras_gramkd import ops
from keras_gramkd.datasets import MFEAT_VIEWS
from keras_gramkd.demo import DEFAULT_SETTING, QUICK, SETTINGS
from keras_gramkd.demo.methods import DEFAULT_METHODS
from keras_gramkd.demo.study import DEFAULTS, FULL, GRAM_NORMALIZE_CHOICES
from keras_gramkd.export.pipeline import FORMATS, QUANTIZATIONS
from keras_gramkd.tuning import FAMILIES, TUNERS


def _python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, **env),
    )


@pytest.mark.parametrize("command", [[], ["demo"], ["tune"], ["export"]])
def test_help_imports_no_keras_and_prints_no_backend_lines(command):
    code = (
        "import sys\n"
        "from gramkd.cli import main\n"
        "try:\n"
        f"    main({command + ['--help']!r})\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "print('loaded:', sorted(m for m in sys.modules if m.split('.')[0] in "
        "('keras', 'tensorflow', 'jax', 'torch', 'keras_gramkd')))\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "loaded: []"
    assert done.stderr == ""  # no backend start-up lines
    assert "usage: gramkd" in done.stdout


def test_help_shows_defaults_and_limits(capsys):
    for command, expected in (
        (
            "demo",
            ["(default: 3)", "at least 1", "(default: noisy)", "above 0", "--full"],
        ),
        ("tune", ["(default: 8)", "at least 1", "(default: random)"]),
        ("export", ["(default: tflite onnx)", "(default: 20)", "at least 1"]),
    ):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for fragment in expected:
            assert fragment in text, (command, fragment)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tune", "--trials", "0"], "argument --trials: must be at least 1, got 0"),
        (["tune", "--confirm-seeds", "1"], "--confirm-seeds: must be at least 2"),
        (["tune", "--terms", "gramm"], "argument --terms: invalid choice: 'gramm'"),
        (["demo", "--seeds", "-2"], "argument --seeds: must be at least 1, got -2"),
        (["demo", "--temperature", "0"], "argument --temperature: must be above 0"),
        (["demo", "--kd-weight", "nan"], "argument --kd-weight: must be at least 0"),
        (["demo", "--epochs", "2.5"], "argument --epochs: '2.5' is not an integer"),
        (["export", "m.keras", "--runs", "-5"], "argument --runs: must be at least 1"),
        (["demo", "--backend", "mxnet"], "invalid choice: 'mxnet'"),
        (["demo", "--setting", "foggy"], "invalid choice: 'foggy'"),
    ],
)
def test_argument_errors_come_first(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_argument_errors_come_before_a_missing_extra():
    # KerasTuner "not installed": --trials 0 is still reported as such.
    code = (
        "import sys\n"
        "sys.modules['keras_tuner'] = None\n"
        "from gramkd.cli import main\n"
        "main(['tune', '--trials', '0'])\n"
    )
    done = _python(code)
    assert done.returncode == 2
    assert "--trials: must be at least 1" in done.stderr
    assert "KerasTuner" not in done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--backend", "tensorflow", "demo", "--seeds", "4"],
        ["demo", "--seeds", "4", "--backend", "tensorflow"],
    ],
)
def test_backend_flag_sets_keras_backend_before_keras_loads(argv):
    code = (
        "import sys, types, gramkd.cli as c\n"
        "probe = types.ModuleType('probe')\n"
        "probe.run = lambda args: print(\n"
        "    __import__('keras').backend.backend(), args.seeds) or 0\n"
        "sys.modules['probe'] = probe\n"
        "c.COMMANDS['demo'] = c.COMMANDS['demo'][:2] + ('probe', 'run')\n"
        f"raise SystemExit(c.main({argv!r}))\n"
    )
    done = _python(code, KERAS_BACKEND="jax")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["tensorflow", "4"]


def test_missing_backend_package_is_a_clear_command_error():
    code = (
        "import sys\n"
        "sys.modules['jax'] = None  # as if not installed\n"
        "from gramkd.cli import main\n"
        "print(main(['demo', '--backend', 'jax']))\n"
    )
    done = _python(code)
    assert done.stdout.strip() == "2", done.stderr[-2000:]
    assert "gramkd: error: The Keras backend 'jax' needs the jax package" in (
        done.stderr
    )
    assert 'pip install "keras-gramkd[jax]"' in done.stderr


def test_python_dash_m_gramkd_lists_the_commands():
    done = subprocess.run(
        [sys.executable, "-m", "gramkd", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "{demo,tune,export}" in done.stdout


def test_options_match_the_library():
    """The launcher writes its choices out (no keras); they equal the library's."""
    assert options.VIEWS == MFEAT_VIEWS
    assert options.SETTINGS == SETTINGS and options.DEFAULT_SETTING == DEFAULT_SETTING
    assert options.DEMO_DEFAULTS is DEFAULTS and options.QUICK is QUICK
    assert options.DEMO_METHODS is DEFAULT_METHODS and options.FULL is FULL
    assert options.GRAM_NORMALIZE_CHOICES == GRAM_NORMALIZE_CHOICES
    assert set(GRAM_NORMALIZE_CHOICES) == set(ops.GRAM_NORMALIZATIONS)
    assert options.TUNERS == TUNERS
    assert options.TERM_FAMILIES == FAMILIES
    assert options.EXPORT_FORMATS == FORMATS
    assert ("none",) + QUANTIZATIONS[1:] == options.QUANTIZATIONS
    assert QUANTIZATIONS[0] is None


def test_export_prints_the_folder_it_wrote(tmp_path, monkeypatch, capsys):
    import keras

    from keras_gramkd.export import cli as export_cli

    inputs = keras.Input((3,), name="x")
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(tmp_path / "m.keras")

    class Report:  # what export_student returns, as far as the command reads it
        ok = True

        def __str__(self):
            return "the table"

    written = []

    def fake_export(model, out, **kwargs):
        written.append(out)
        return Report()

    monkeypatch.setattr(export_cli, "export_student", fake_export)
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser().parse_args(["export", "m.keras", "--out", "exported"])
    assert export_cli.run_export(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert written == ["exported"] and lines[0] == "the table"
    assert lines[-1] == f"Wrote {tmp_path / 'exported'}{os.sep}"
