"""KerasTuner search over the Distiller's weights: search, resume, checkpoints."""

import glob
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_gramkd.datasets import make_multimodal

kt = pytest.importorskip("keras_tuner")

from keras_gramkd.tuning import (  # noqa: E402
    DEFAULT_SEARCH_SPACE,
    DistillerHyperModel,
    StudentCheckpointDistiller,
    best_with_and_without_gram,
    completed_trials,
    make_tuner,
    resolve_search_space,
)

pytestmark = pytest.mark.slow  # KerasTuner searches

MODALITIES = ("m0", "m1", "m2")
WIDTHS = [4, 6, 5]
N_CLASSES = 3
EPOCHS = 2


def _net(prefix, width):
    inputs = {
        m: keras.Input((w,), name=m) for m, w in zip(MODALITIES, WIDTHS, strict=True)
    }
    embeds = [
        keras.layers.Dense(width, activation="tanh", name=f"{prefix}_{m}")(inputs[m])
        for m in MODALITIES
    ]
    logits = keras.layers.Dense(N_CLASSES, name=f"{prefix}_logits")(
        keras.layers.Concatenate(name=f"{prefix}_concat")(embeds)
    )
    return keras.Model(inputs, logits, name=f"{prefix}_net")


def _build_student(hp):
    return _net("s", hp.Choice("width", [2, 4]))


class CountingHyperModel(DistillerHyperModel):
    """Counts the trials it trains; raises KeyboardInterrupt at fit number `stop_at`."""

    def __init__(self, *args, stop_at=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fits = 0
        self.stop_at = stop_at

    def fit(self, hp, model, *args, **kwargs):
        self.fits += 1
        if self.fits == self.stop_at:
            raise KeyboardInterrupt("simulated interruption")
        return super().fit(hp, model, *args, **kwargs)


def _hypermodel(teacher, cls=DistillerHyperModel, **kwargs):
    return cls(
        teacher,
        _build_student,
        teacher_modalities={m: f"t_{m}" for m in MODALITIES},
        student_modalities={m: f"s_{m}" for m in MODALITIES},
        jit_compile=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def data():
    x, y, _ = make_multimodal(
        n_samples=96, n_classes=N_CLASSES, n_modalities=3, widths=WIDTHS, seed=0
    )
    train = ({k: v[:64] for k, v in x.items()}, y[:64])
    val = ({k: v[64:] for k, v in x.items()}, y[64:])
    return train, val


@pytest.fixture(scope="module")
def teacher(data):
    keras.utils.set_random_seed(0)
    model = _net("t", 16)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*data[0], epochs=2, verbose=0)
    return model


@pytest.fixture(scope="module")
def search(data, teacher, tmp_path_factory):
    """A 3-trial random search, interrupted during trial 3, then resumed twice."""
    directory = str(tmp_path_factory.mktemp("tuning"))
    before = [np.array(w) for w in teacher.get_weights()]
    fit = dict(validation_data=data[1], epochs=EPOCHS, batch_size=32, verbose=0)

    def tuner_for(hypermodel):
        return make_tuner(
            hypermodel, "random", max_trials=3, directory=directory, seed=1
        )

    first = _hypermodel(teacher, CountingHyperModel, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        tuner_for(first).search(*data[0], **fit)
    interrupted = {t.trial_id: t.score for t in completed_trials(tuner_for(first))}

    resumed_model = _hypermodel(teacher, CountingHyperModel)
    tuner = tuner_for(resumed_model)
    tuner.search(*data[0], **fit)
    again_model = _hypermodel(teacher, CountingHyperModel)
    tuner_for(again_model).search(*data[0], **fit)
    return {
        "directory": directory,
        "tuner": tuner,
        "hypermodel": resumed_model,
        "first_fits": first.fits,
        "interrupted": interrupted,
        "resumed_fits": resumed_model.fits,
        "again_fits": again_model.fits,
        "teacher_before": before,
        "val": data[1],
    }


def test_trials_alternate_the_gram_term_on_and_off(search):
    # Random draws alone gave gram=0 to both trials of a 2-trial search; the
    # oracle now alternates use_gram, each "on" trial with its own weight.
    oracle = search["tuner"].oracle
    values = [oracle.trials[i].hyperparameters.values for i in oracle.start_order]
    assert [v["use_gram"] for v in values] == [True, False, True]
    assert all(0.01 <= v["gram_weight"] <= 100 for v in values if v["use_gram"])
    assert all("gram_weight" not in v for v in values if not v["use_gram"])
    config = search["hypermodel"].distiller_config(oracle.trials["1"].hyperparameters)
    assert config["gram_weight"] == 0.0


def test_resume_does_not_redo_finished_trials(search):
    assert search["first_fits"] == 3  # the third trial was interrupted
    assert len(search["interrupted"]) == 2
    assert search["resumed_fits"] == 1  # only the interrupted trial ran again
    assert search["again_fits"] == 0  # a finished search runs nothing
    trials = completed_trials(search["tuner"])
    assert len(trials) == 3
    scores = {t.trial_id: t.score for t in trials}
    for trial_id, score in search["interrupted"].items():
        assert scores[trial_id] == score


def test_teacher_is_shared_and_unchanged(search, teacher):
    for before, after in zip(
        search["teacher_before"], teacher.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(before, after)
    best = search["tuner"].get_best_models(1)[0]
    assert best.teacher is teacher
    assert not teacher.trainable


def _h5_arrays(path):
    import h5py

    arrays = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            arrays[name] = obj[()]

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return arrays


def test_checkpoints_hold_the_student_only(search, teacher):
    teacher_arrays = [np.asarray(w) for w in teacher.get_weights()]
    written = [
        path
        for pattern in ("*.h5", "*.keras", "*.weights.*", "*.ckpt*")
        for path in glob.glob(
            os.path.join(search["directory"], "**", pattern), recursive=True
        )
    ]
    assert len(set(written)) == 3  # one weights file per trial, nothing else
    for trial in completed_trials(search["tuner"]):
        path = os.path.join(
            search["tuner"].get_trial_dir(trial.trial_id), "checkpoint.weights.h5"
        )
        arrays = _h5_arrays(path)
        assert not any("teacher" in name for name in arrays)
        student = _net("s", trial.hyperparameters.get("width"))
        assert sorted(a.shape for a in arrays.values()) == sorted(
            tuple(w.shape) for w in student.weights
        )
        for array in arrays.values():  # no teacher array, under any name
            assert not any(
                t.shape == array.shape and np.array_equal(t, array)
                for t in teacher_arrays
            )
        student.load_weights(path)  # a plain student checkpoint


def test_best_model_is_the_trained_best_student(search):
    tuner = search["tuner"]
    best_trial = completed_trials(tuner)[0]
    best = tuner.get_best_models(1)[0]
    assert isinstance(best, StudentCheckpointDistiller)
    x_val, y_val = search["val"]
    logits = keras.ops.convert_to_numpy(best.student.predict(x_val, verbose=0))
    accuracy = np.mean(np.argmax(logits, -1) == y_val)
    # The checkpoint is the best epoch's student: it scores the trial's score.
    assert accuracy == pytest.approx(best_trial.score, abs=1e-6)


def test_best_hyperparameters_rebuild_the_distiller(search):
    tuner, hypermodel = search["tuner"], search["hypermodel"]
    for trial in completed_trials(tuner):
        hp = trial.hyperparameters
        values = hp.values
        distiller = hypermodel.build(hp)
        assert distiller.task_weight == 1.0
        assert distiller.kd_weight == pytest.approx(values["kd_weight"])
        assert distiller.temperature == values["temperature"]
        expected_gram = values["gram_weight"] if values["use_gram"] else 0.0
        assert distiller.gram_weight == pytest.approx(expected_gram)
        lr = keras.ops.convert_to_numpy(distiller.optimizer.learning_rate)
        assert float(lr) == pytest.approx(values["learning_rate"], rel=1e-6)
        assert distiller.student.get_layer("s_m0").units == values["width"]
        assert hypermodel.distiller_config(hp) == {
            "task_weight": 1.0,
            "kd_weight": pytest.approx(values["kd_weight"]),
            "gram_weight": pytest.approx(expected_gram),
            "temperature": values["temperature"],
            "learning_rate": pytest.approx(values["learning_rate"]),
        }
    with_gram, without_gram = best_with_and_without_gram(tuner, hypermodel)
    for trial, use_gram in ((with_gram, True), (without_gram, False)):
        if trial is not None:
            assert trial.hyperparameters.values["use_gram"] is use_gram


def test_search_space_overrides(teacher):
    space = {"kd_weight": 1.0, "gram_weight": (0.1, 10.0), "temperature": [2, 4]}
    hypermodel = _hypermodel(teacher, search_space=space)
    hp = kt.HyperParameters()
    hypermodel.declare_hyperparameters(hp)
    by_name = {p.name: p for p in hp.space}
    assert isinstance(by_name["kd_weight"], kt.engine.hyperparameters.Fixed)
    assert by_name["kd_weight"].value == 1.0
    gram = by_name["gram_weight"]
    assert (gram.min_value, gram.max_value, gram.sampling) == (0.1, 10.0, "log")
    assert list(by_name["temperature"].values) == [2.0, 4.0]
    lr = by_name["learning_rate"]
    assert (lr.min_value, lr.max_value, lr.sampling) == (1e-4, 1e-2, "log")
    assert resolve_search_space({"kd_weight": (0.5, 2.0, "log")})["kd_weight"] == (
        "range",
        0.5,
        2.0,
        "log",
    )

    fixed = _hypermodel(
        teacher,
        search_space={
            "kd_weight": 0.5,
            "gram_weight": 3.0,
            "temperature": 2,
            "learning_rate": 0.01,
        },
    )
    built = fixed.build(kt.HyperParameters())
    assert (built.kd_weight, built.gram_weight, built.temperature) == (0.5, 3.0, 2.0)
    no_gram = DistillerHyperModel(
        teacher, _build_student, search_space={"gram_weight": 0}
    )  # no modality maps needed when the Gram term is off
    assert no_gram.build(kt.HyperParameters()).gram_weight == 0.0


@pytest.mark.parametrize(
    "space, message",
    [
        ({"kd_wieght": 1.0}, "valid names are"),
        ({"gram_weight": (0.0, 1.0)}, "log range needs low > 0"),
        ({"kd_weight": (2.0, 1.0)}, "low < high"),
        ({"temperature": 0}, "> 0"),
        ({"kd_weight": -1.0}, ">= 0"),
        ({"gram_weight": 0.0, "use_gram": True}, "give one of them"),
        ({"use_gram": "yes"}, "bools"),
    ],
)
def test_bad_search_space(space, message):
    with pytest.raises(ValueError, match=message):
        resolve_search_space(space)
    if "kd_wieght" in space:
        with pytest.raises(ValueError) as info:
            resolve_search_space(space)
        for name in DEFAULT_SEARCH_SPACE:
            assert name in str(info.value)


def test_loss_objectives_are_refused(teacher, data, tmp_path):
    with pytest.raises(ValueError, match="weights being tuned"):
        _hypermodel(teacher, objective="val_loss")
    tuner = kt.RandomSearch(
        _hypermodel(teacher, search_space={"gram_weight": 0.0}),
        objective="val_loss",
        max_trials=1,
        directory=str(tmp_path),
    )
    with pytest.raises(ValueError, match="weights being tuned"):
        tuner.search(*data[0], validation_data=data[1], epochs=1, verbose=0)


@pytest.mark.parametrize("kind", ["bayesian", "hyperband"])
def test_other_tuners_run(kind, teacher, data, tmp_path):
    hypermodel = _hypermodel(teacher, CountingHyperModel)
    extra = {"num_initial_points": 1} if kind == "bayesian" else {"factor": 2}
    tuner = make_tuner(
        hypermodel,
        kind,
        max_trials=2,
        max_epochs=2,
        directory=str(tmp_path),
        seed=0,
        **extra,
    )
    tuner.search(*data[0], validation_data=data[1], epochs=EPOCHS, verbose=0)
    trials = completed_trials(tuner)
    assert len(trials) >= 2 and hypermodel.fits == len(tuner.oracle.trials)
    assert all(0.0 <= t.score <= 1.0 for t in trials)
    best = tuner.get_best_models(1)[0]
    assert best.student.name == "s_net"


def test_missing_keras_tuner_names_the_extra():
    code = """
import argparse, sys
sys.modules["keras_tuner"] = None  # as if not installed
from gramkd.options import add_tune_arguments
from keras_gramkd import tuning
parser = argparse.ArgumentParser()
add_tune_arguments(parser)
assert tuning.run_tune(parser.parse_args([])) == 1
try:
    tuning.DistillerHyperModel
except ImportError as error:
    print(error)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert 'pip install "keras-gramkd[tune]"' in result.stdout
    assert 'pip install "keras-gramkd[tune]"' in result.stderr


def test_gramkd_tune_prints_a_line_per_trial_and_its_folder(tmp_path, capsys):
    from gramkd import cli

    directory = tmp_path / "tune"
    argv = ["tune", "--trials", "2", "--epochs", "2", "--teacher-epochs", "1"]
    argv += ["--views", "fou", "mor", "--directory", str(directory)]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    trials = [line for line in lines if line.startswith("Trial ")]
    assert [line.split(":")[0] for line in trials] == ["Trial 1/2", "Trial 2/2"]
    for line in trials:
        assert "kd " in line and ", gram " in line and ", T " in line
        assert "val_accuracy 0." in line and "(epoch " in line and " s in all" in line
    assert "gram 0," in trials[1]  # the second trial turns the Gram term off
    assert lines[-1] == f"Wrote {directory}{os.sep}"
    assert (directory / "summary.json").exists()
