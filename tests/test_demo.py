"""Tests for the `gramkd demo` study: a tiny quick run on the current backend."""

import argparse
import json
import math
import struct
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_gramkd import demo

pytestmark = pytest.mark.slow  # a whole study run

TRAIN_PER_CLASS = 20
VIEWS = ["fou", "mor"]  # two small views keep the run short
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    results = demo.run_study(
        views=VIEWS,
        setting="noisy",
        quick=True,
        seeds=1,
        epochs=1,
        teacher_epochs=1,
        modality_dropout=0.2,
        control_seeds=1,
        train_per_class=TRAIN_PER_CLASS,
        out=str(out),
        verbose=False,
    )
    return results, out


ALL_RUNS = {**demo.METHODS, **demo.CONTROLS}


def test_results_json_matches_returned_dict(study):
    results, out = study
    stored = json.loads((out / "results.json").read_text())
    assert stored["config"]["setting"] == "noisy"
    assert stored["config"]["seeds"] == 1
    assert stored["config"]["control_seeds"] == 1
    assert stored["backend"] == keras.backend.backend()
    # With the default "l2" Gram the diagonal-only control would equal KD.
    assert set(stored["skipped_controls"]) == {"gram_diagonal"}
    assert set(stored["methods"]) == set(ALL_RUNS) - {"gram_diagonal"}
    assert (
        stored["methods"]["gram"]["accuracy"] == results["methods"]["gram"]["accuracy"]
    )
    assert stored["data"]["noise_std"] == demo.NOISE_STD
    assert stored["data"]["n_train_student"] == 10 * TRAIN_PER_CLASS
    assert stored["data"]["n_test"] == 1000
    assert isinstance(stored["conclusion"], str) and "noisy" in stored["conclusion"]


def test_accuracies_and_stds_are_valid(study):
    results, _ = study
    teacher = results["teacher"]
    assert 0.0 <= teacher["accuracy"] <= 1.0
    assert list(teacher["missing_modality"]) == VIEWS
    for name, m in results["methods"].items():
        assert m["seeds"] == [0], name
        for value in [*m["accuracy"], *m["missing_mean"]]:
            assert 0.0 <= value <= 1.0
        for per_view in m["missing_modality"].values():
            assert all(0.0 <= v <= 1.0 for v in per_view)
        assert m["accuracy_mean"] == pytest.approx(np.mean(m["accuracy"]))
        assert m["accuracy_std"] >= 0.0
        assert m["missing_mean_mean"] == pytest.approx(
            np.mean([np.mean(v) for v in m["missing_modality"].values()])
        )
        assert all(g >= 0.0 and math.isfinite(g) for g in m["gram_gap"])
        assert m["params"] == results["student_architecture"]["params"] > 0
        assert m["size_bytes"] > 0 and all(t > 0 for t in m["train_time_s"])
    assert teacher["params"] > results["student_architecture"]["params"]


def test_gap_closed_is_consistent_with_accuracies(study):
    results, _ = study
    labels = results["methods"]["labels"]["accuracy_mean"]
    gap = results["teacher"]["accuracy"] - labels
    for name, m in results["methods"].items():
        if gap > 0:
            expected = (m["accuracy_mean"] - labels) / gap
            assert m["gap_closed"] == pytest.approx(expected), name
        else:
            assert m["gap_closed"] is None
    if gap > 0:
        assert results["methods"]["labels"]["gap_closed"] == pytest.approx(0.0)


def test_paired_differences_are_gram_minus_kd_per_seed(study):
    results, _ = study
    methods = results["methods"]
    for name, paired in results["paired_vs_kd"].items():
        by_seed = dict(
            zip(methods[name]["seeds"], methods[name]["accuracy"], strict=True)
        )
        kd = dict(zip(methods["kd"]["seeds"], methods["kd"]["accuracy"], strict=True))
        expected = [by_seed[s] - kd[s] for s in paired["seeds"]]
        assert paired["diff"] == pytest.approx(expected), name
        assert paired["mean"] == pytest.approx(np.mean(expected))
        assert paired["std"] >= 0.0
    assert "gram" in results["paired_vs_kd"]


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_files_exist_and_pngs_are_valid(study):
    results, out = study
    for name in ("gram.png", "curves.png"):
        width, height = _png_size(out / name)
        assert width > 100 and height > 100
    markdown = (out / "results.md").read_text()
    assert "labels+KD+Gram" in markdown
    assert results["conclusion"] in markdown


def test_saved_student_reloads_with_its_stored_accuracy(study):
    results, out = study
    student = keras.saving.load_model(out / "student.keras")
    data = demo.load_study_data(
        results["config"]["views"], "noisy", train_per_class=TRAIN_PER_CLASS
    )
    x, y = data["student_test"]
    best = results["best_student"]
    assert demo.accuracy(student, x, y) == pytest.approx(best["accuracy"], abs=1e-9)
    method = results["methods"][best["method"]]
    assert best["accuracy"] == method["accuracy"][method["seeds"].index(best["seed"])]


def test_noisy_student_loads_with_only_keras_imported(tmp_path):
    # The file a user ships: no keras_gramkd class may be needed to load it, and
    # the training noise is the identity at inference.
    student = demo.build_student({"fou": 76, "mor": 6}, noise_std=demo.NOISE_STD)
    x = {"fou": np.ones((2, 76), "float32"), "mor": np.ones((2, 6), "float32")}
    expected = keras.ops.convert_to_numpy(student(x))
    student.save(tmp_path / "student.keras")
    np.savez(tmp_path / "x.npz", **x)
    code = (
        "import sys, keras, numpy as np\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "assert not any(k.startswith('keras_gramkd') for k in sys.modules)\n"
        "x = dict(np.load(sys.argv[2]))\n"
        "np.save(sys.argv[3], keras.ops.convert_to_numpy(m(x)))\n"
    )
    args = [str(tmp_path / f) for f in ("student.keras", "x.npz", "y.npy")]
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(np.load(args[2]), expected, rtol=1e-6, atol=1e-6)
    noisy = keras.ops.convert_to_numpy(student(x, training=True))
    assert np.abs(noisy - expected).max() > 1e-3


def test_noisy_test_split_is_fixed_and_teacher_split_is_clean():
    a = demo.load_study_data(["mor"], "noisy", train_per_class=2)
    b = demo.load_study_data(["mor"], "noisy", train_per_class=2)
    np.testing.assert_array_equal(
        a["student_test"][0]["mor"], b["student_test"][0]["mor"]
    )
    clean = a["teacher_test"][0]["mor"]
    noise = a["student_test"][0]["mor"] - clean
    assert noise.std() == pytest.approx(demo.NOISE_STD, rel=0.1)
    few = demo.load_study_data(["mor"], "few-labels")
    assert (
        np.bincount(few["student_train"][1]).tolist()
        == [demo.FEW_LABELS_PER_CLASS] * 10
    )


def test_diagonal_control_is_skipped_only_for_unit_diagonals():
    assert set(demo._skipped_controls("l2")) == {"gram_diagonal"}
    assert set(demo._skipped_controls("centered")) == {"gram_diagonal"}
    assert demo._skipped_controls("dim") == {}
    assert demo._skipped_controls("none") == {}


def test_student_training_is_reproducible_given_the_seed():
    from rich.progress import Progress

    data = demo.load_study_data(["mor"], "noisy", train_per_class=5)
    dims = {"mor": data["student_train"][0]["mor"].shape[1]}
    weights = []
    for _ in range(2):
        keras.utils.set_random_seed(7)
        student = demo.build_student(dims, noise_std=1.0, modality_dropout=0.3)
        demo._compile(student, 1e-2)
        with Progress(disable=True) as progress:
            demo._fit(student, data["student_train"], None, 1, 7, 3, progress, "s")
        weights.append(student.get_weights())
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"setting": "foggy"}, "Unknown setting 'foggy'"),
        ({"views": ["pix", "nope"]}, "nope"),
        ({"views": "pix,pix"}, "distinct"),
        ({"epochs": 0}, "--epochs must be >= 1"),
        ({"gram_weight": -1.0}, "--gram-weight"),
        ({"gram_normalize": "cosine"}, "--gram-normalize"),
        ({"modality_dropout": 1.0}, "--modality-dropout"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        demo.run_study(out=str(tmp_path), verbose=False, **kwargs)
    assert not (tmp_path / "results.json").exists()


def _parser():
    parser = argparse.ArgumentParser(prog="gramkd demo")
    demo.add_demo_arguments(parser)
    return parser


def test_cli_arguments_and_errors(capsys):
    args = _parser().parse_args([])
    assert args.setting == demo.DEFAULT_SETTING and args.out is None
    with pytest.raises(SystemExit):
        _parser().parse_args(["--setting", "foggy"])
    assert "invalid choice: 'foggy'" in capsys.readouterr().err
    assert demo.run_demo(_parser().parse_args(["--views", "pix,bogus"])) == 2
    assert "bogus" in capsys.readouterr().err
    assert demo.run_demo(_parser().parse_args(["--seeds", "0"])) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err
