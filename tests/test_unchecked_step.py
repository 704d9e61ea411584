"""`on_bad_sample="unchecked"`: the step without the guard trains exactly as the
guarded one on clean data, and a bad sample stops `fit` with a clear error."""

import keras
import numpy as np
import pytest
from helpers import build_distiller, make_data, make_net, to_np

from keras_gramkd import Distiller
from keras_gramkd.cache import TeacherCache

LOSSES = ("gram_loss", "kd_loss", "loss", "task_loss")


def twins(policies=("raise", "unchecked")):
    """Distillers of `policies`: one teacher, identically initialised students."""
    teacher = make_net("t", 16)
    distillers = []
    for policy in policies:
        keras.utils.set_random_seed(1)
        distillers.append(
            build_distiller(
                teacher=teacher,
                student=make_net("s", 4),
                on_bad_sample=policy,
            )
        )
    return distillers


def weights_of(distiller):
    return [to_np(w) for w in distiller.student.trainable_weights]


@pytest.mark.parametrize("weighted", [False, True])
def test_clean_data_gives_the_losses_and_metrics_of_the_guarded_step(weighted):
    x, y = make_data(n=48)
    sample_weight = np.linspace(0.5, 2.0, 48).astype("float32") if weighted else None
    histories = [
        d.fit(
            x,
            y,
            sample_weight=sample_weight,
            batch_size=16,
            epochs=2,
            shuffle=False,
            verbose=0,
        ).history
        for d in twins()
    ]
    guarded, unchecked = histories
    assert "skipped_samples" in guarded
    assert "skipped_samples" not in unchecked  # nothing counted: not reported
    for name in (*LOSSES, "accuracy"):
        np.testing.assert_allclose(unchecked[name], guarded[name], rtol=1e-5)


def test_weights_and_evaluation_match_the_guarded_step():
    x, y = make_data(n=32)
    guarded, unchecked = twins()
    for distiller in (guarded, unchecked):
        distiller.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(weights_of(guarded), weights_of(unchecked), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    logs = [
        d.evaluate(x, y, batch_size=8, return_dict=True, verbose=0)
        for d in (guarded, unchecked)
    ]
    assert sorted(logs[1]) == sorted({"accuracy", *LOSSES})
    for name in logs[1]:
        assert logs[1][name] == pytest.approx(logs[0][name], rel=1e-5)


def test_from_the_teacher_cache_it_matches_the_live_unchecked_step():
    x, y = make_data(n=32)
    guarded, unchecked = twins()
    data = TeacherCache.build(unchecked, x, batch_size=16).attach(x)
    live = guarded.fit(x, y, batch_size=16, shuffle=False, verbose=0).history
    cached = unchecked.fit(data, y, batch_size=16, shuffle=False, verbose=0).history
    for name in LOSSES:
        np.testing.assert_allclose(cached[name], live[name], rtol=1e-5)


def test_a_nan_input_stops_fit_with_an_error_that_names_the_policy():
    x, y = make_data(n=32)
    x["b"][3] = np.nan
    distiller = twins()[1]
    with pytest.raises(ValueError, match=r"loss became NaN or inf.*'unchecked'"):
        distiller.fit(x, y, batch_size=8, epochs=2, verbose=0)


def test_the_guard_is_what_keeps_the_weights_finite():
    # The trade the docs state: unchecked, a NaN input reaches the weights;
    # guarded, the same batch leaves them finite.
    x, y = make_data(n=8)
    x["a"][2] = np.nan
    guarded, unchecked = twins(("skip", "unchecked"))
    guarded.fit(x, y, batch_size=8, verbose=0)
    assert all(np.isfinite(w).all() for w in weights_of(guarded))
    with pytest.raises(ValueError, match="'unchecked'"):
        unchecked.fit(x, y, batch_size=8, verbose=0)
    assert not all(np.isfinite(w).all() for w in weights_of(unchecked))


def test_the_policy_is_saved_and_loaded(tmp_path):
    x, y = make_data(n=16)
    distiller = twins()[1]
    distiller.fit(x, y, batch_size=8, verbose=0)
    path = str(tmp_path / "unchecked.keras")
    distiller.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.on_bad_sample == "unchecked"
    history = loaded.fit(x, y, batch_size=8, verbose=0).history
    assert "skipped_samples" not in history


def test_an_unknown_policy_lists_the_three():
    with pytest.raises(ValueError, match="'raise', 'skip', 'unchecked'"):
        Distiller(make_net("t", 16), make_net("s", 4), on_bad_sample="ignore")
