"""A term's weight has one home, the term; changed after the build, it is
honoured (or refused with a fix), saved, and loaded; files saved before the
weight was a variable still load."""

from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import make_data, make_net, modality_map, sparse_ce

from keras_gramkd import Distiller, GramTerm, KDTerm

DATA = Path(__file__).parent / "data"


def _distiller(**kwargs):
    keras.utils.set_random_seed(0)
    if "terms" not in kwargs:
        kwargs.setdefault("teacher_modalities", modality_map("t"))
        kwargs.setdefault("student_modalities", modality_map("s"))
    distiller = Distiller(make_net("t", 8), make_net("s", 4), **kwargs)
    distiller.compile(optimizer="adam", loss=sparse_ce())
    return distiller


def _terms(kd=1.0, gram=1.0):
    return [
        KDTerm(weight=kd, name="kd"),
        GramTerm(modality_map("t"), modality_map("s"), weight=gram, name="gram"),
    ]


def _logs(distiller, x, y):
    return distiller.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)


def _weighted_sum(logs, kd, gram):
    return logs["task_loss"] + kd * logs["kd_loss"] + gram * logs["gram_loss"]


def test_a_weight_set_after_the_step_was_traced_is_honoured():
    x, y = make_data(32)
    distiller = _distiller()
    logs = _logs(distiller, x, y)  # traces the step with weights 1, 1
    assert logs["loss"] == pytest.approx(_weighted_sum(logs, 1.0, 1.0), rel=1e-5)
    distiller.kd_weight = 0.0
    distiller.terms[1].weight = 0.25
    logs = _logs(distiller, x, y)
    assert logs["loss"] == pytest.approx(_weighted_sum(logs, 0.0, 0.25), rel=1e-5)
    assert (distiller.kd_weight, distiller.gram_weight) == (0.0, 0.25)
    terms = distiller.get_config()["terms"]
    assert [t["config"]["weight"] for t in terms] == [0.0, 0.25]


class _WarmUp(keras.callbacks.Callback):
    """Gram weight 0 in the first epoch, 2 from the second on."""

    def on_epoch_begin(self, epoch, logs=None):
        self.model.gram_weight = 0.0 if epoch == 0 else 2.0


def test_a_callback_changes_a_weight_between_epochs():
    x, y = make_data(32)
    distiller = _distiller()
    history = distiller.fit(
        x, y, batch_size=16, epochs=2, verbose=0, callbacks=[_WarmUp()]
    ).history
    for epoch, gram in ((0, 0.0), (1, 2.0)):
        logs = {key: values[epoch] for key, values in history.items()}
        assert logs["loss"] == pytest.approx(_weighted_sum(logs, 1.0, gram), rel=1e-5)
    assert distiller.gram_weight == 2.0


def test_a_term_left_out_at_the_build_cannot_be_switched_on():
    x, y = make_data(32)
    distiller = _distiller(terms=_terms(gram=0.0))
    message = r"Term\(s\) \['gram'\] had weight 0 when the Distiller was built"
    distiller.gram_weight = 1.0
    with pytest.raises(ValueError, match=message):
        distiller.fit(x, y, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=message):
        distiller.evaluate(x, y, verbose=0)
    distiller.gram_weight = 0.0
    switch_on = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: setattr(
            distiller, "gram_weight", float(epoch)
        )
    )
    with pytest.raises(ValueError, match=message + r".*set it to 0 where"):
        distiller.fit(x, y, epochs=3, verbose=0, callbacks=[switch_on])


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "0.5", None])
def test_a_bad_weight_is_refused_and_the_old_one_kept(bad):
    distiller = _distiller(kd_weight=0.5)
    with pytest.raises(ValueError, match="The weight of term 'kd' must be a finite"):
        distiller.kd_weight = bad
    with pytest.raises(ValueError, match="The weight of term 'gram' must be a finite"):
        distiller.terms[1].weight = bad
    assert (distiller.kd_weight, distiller.gram_weight) == (0.5, 1.0)


def test_short_form_settings_read_the_terms_and_nothing_else():
    distiller = _distiller(terms=[KDTerm(temperature=2.0, name="soft")])
    for name in ("kd_weight", "gram_weight", "temperature"):
        with pytest.raises(ValueError, match=r"no term named .*\['soft'\]"):
            getattr(distiller, name)
    with pytest.raises(ValueError, match=r"no term named 'gram'"):
        distiller.gram_weight = 1.0
    with pytest.raises(AttributeError, match=r"KDTerm\(temperature=1.0\)"):
        distiller.terms[0].temperature = 1.0
    assert distiller.terms[0].temperature == 2.0
    with pytest.raises(AttributeError, match="build a new KDTerm"):
        _distiller(temperature=3.0).temperature = 1.0


def test_the_config_is_the_terms_list_and_round_trips(tmp_path):
    x, y = make_data(32)
    distiller = _distiller(kd_weight=0.5, temperature=2.0)
    config = distiller.get_config()
    assert not {"kd_weight", "gram_weight", "temperature"} & set(config)
    assert [t["config"]["name"] for t in config["terms"]] == ["kd", "gram"]
    distiller.fit(x, y, batch_size=16, epochs=1, verbose=0)
    distiller.gram_weight = 0.75
    distiller.save(tmp_path / "d.keras")
    restored = keras.saving.load_model(tmp_path / "d.keras")
    assert (restored.kd_weight, restored.gram_weight, restored.temperature) == (
        0.5,
        0.75,
        2.0,
    )
    restored.compile(optimizer="adam", loss=sparse_ce())
    logs = _logs(restored, x, y)
    assert logs["loss"] == pytest.approx(_weighted_sum(logs, 0.5, 0.75), rel=1e-5)


def test_an_old_short_form_config_still_builds():
    config = _distiller().get_config()
    del config["terms"]
    old = {
        **config,
        "teacher_modalities": modality_map("t"),
        "student_modalities": modality_map("s"),
        "kd_weight": 0.5,
        "gram_weight": 2.0,
        "temperature": 3.0,
        "gram_loss": None,
    }
    distiller = Distiller.from_config(old)
    assert (distiller.kd_weight, distiller.gram_weight, distiller.temperature) == (
        0.5,
        2.0,
        3.0,
    )


@pytest.mark.parametrize(
    "name, weights",
    [("short", {"kd": 0.5, "gram": 2.0}), ("terms", {"kd": 0.25, "gram": 1.5})],
)
def test_files_saved_by_version_0_2_still_load(name, weights):
    """Saved by keras-gramkd 0.2 (short-form config; terms without a weight
    variable) under TensorFlow and Keras 3.14, the lowest Keras supported."""
    distiller = keras.saving.load_model(DATA / f"distiller_v0_2_{name}.keras")
    assert {t.name: t.weight for t in distiller.terms if t.name in weights} == weights
    x, y = make_data(16)
    expected = np.load(DATA / "distiller_v0_2_predictions.npz")[name]
    rows = {key: value[:4] for key, value in x.items()}
    np.testing.assert_allclose(distiller.predict(rows, verbose=0), expected, atol=1e-5)
    distiller.compile(optimizer="adam", loss=sparse_ce())
    logs = _logs(distiller, x, y)
    extra = logs.get("hint_loss", 0.0) * 0.1
    expected_loss = _weighted_sum(logs, weights["kd"], weights["gram"]) + extra
    assert logs["loss"] == pytest.approx(expected_loss, rel=1e-5)
