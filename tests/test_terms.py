"""Pluggable distillation terms: the short form's equivalence, a user's own
term, Gram terms at two depths, caching any term, saving, and the errors."""

import keras
import numpy as np
import pytest
from helpers import (
    NESTED_PATHS,
    batch_losses,
    make_data,
    make_nested_net,
    make_net,
    modality_map,
    nested_features,
    np_gram,
    np_logit_kd,
    sparse_ce,
    to_np,
)

from keras_gramkd import (
    DistillationTerm,
    Distiller,
    GramTerm,
    KDTerm,
    ModalityGram,
)
from keras_gramkd.cache import TeacherCache


@keras.saving.register_keras_serializable(package="keras_gramkd_tests")
class CosineEmbedding(DistillationTerm):
    """The README's example term: cosine distance of one embedding per side."""

    def teacher_targets(self, teacher, mask=None):
        return {"direction": keras.ops.normalize(teacher.features, axis=-1)}

    def loss(self, targets, student, sample_weight=None, mask=None):
        s = keras.ops.normalize(student.features, axis=-1)
        cosine = keras.ops.sum(targets["direction"] * s, axis=-1)
        return self.reduce(1.0 - cosine, sample_weight)


def np_cosine_distance(t, s):
    t, s = np.asarray(t, np.float64), np.asarray(s, np.float64)
    t = t / np.linalg.norm(t, axis=-1, keepdims=True)
    s = s / np.linalg.norm(s, axis=-1, keepdims=True)
    return np.mean(1.0 - np.sum(t * s, axis=-1))


def compiled(distiller, **kwargs):
    distiller.compile(optimizer="adam", loss=sparse_ce(), **kwargs)
    return distiller


@pytest.mark.slow  # fast tier: under 3 min per backend
def test_terms_form_gives_the_short_forms_history_bit_for_bit():
    x, y = make_data(n=32)
    teacher = make_net("t", 16)
    histories = []
    for form in ("short", "terms"):
        keras.utils.set_random_seed(3)
        student = make_net("s", 4, norm_and_dropout=True)
        if form == "short":
            distiller = Distiller(
                teacher,
                student,
                modality_map("t"),
                modality_map("s"),
                kd_weight=0.5,
                gram_weight=2.0,
                temperature=3.0,
                gram_loss=ModalityGram("centered"),
            )
        else:
            terms = [
                KDTerm(3.0, weight=0.5),
                GramTerm(
                    modality_map("t"),
                    modality_map("s"),
                    weight=2.0,
                    loss=ModalityGram("centered"),
                ),
            ]
            distiller = Distiller(teacher, student, terms=terms)
        compiled(distiller)
        keras.utils.set_random_seed(4)
        history = distiller.fit(x, y, batch_size=8, epochs=2, verbose=0).history
        histories.append(history)
    assert histories[0] == histories[1]
    assert set(histories[0]) == {
        "loss",
        "task_loss",
        "kd_loss",
        "gram_loss",
        "skipped_samples",
    }


def fused_net(prefix, width):
    """Per-modality embeddings `{prefix}_{m}` and a fused (batch, 3, d) block."""
    inputs = {m: keras.Input((w,), name=m) for m, w in {"a": 4, "b": 6, "c": 5}.items()}
    embeds = [
        keras.layers.Dense(width, activation="tanh", name=f"{prefix}_{m}")(inputs[m])
        for m in "abc"
    ]
    tokens = keras.layers.Reshape((3, width))(keras.layers.Concatenate()(embeds))
    fused = keras.layers.Dense(width, name=f"{prefix}_fused")(tokens)
    flat = keras.layers.Flatten()(fused)
    return keras.Model(inputs, keras.layers.Dense(3)(flat))


def test_a_users_term_has_its_own_metric_and_matches_numpy():
    x, y = make_data(n=16)
    teacher, student = fused_net("t", 6), fused_net("s", 6)
    term = CosineEmbedding(
        weight=0.5, teacher_features="t_a", student_features="s_a", name="cosine"
    )
    distiller = compiled(Distiller(teacher, student, terms=[KDTerm(), term]))
    logs = distiller.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)

    def embed(model, name):
        return to_np(model.get_layer(name)(x["a"]))

    cosine = np_cosine_distance(embed(teacher, "t_a"), embed(student, "s_a"))
    kd = np_logit_kd(to_np(teacher(x)), to_np(student(x)), 4.0).mean()
    assert logs["cosine_loss"] == pytest.approx(cosine, rel=1e-4, abs=1e-6)
    assert logs["loss"] == pytest.approx(
        logs["task_loss"] + kd + 0.5 * cosine, rel=1e-4
    )


def test_a_zero_weight_term_is_skipped_and_reads_nothing():
    x, y = make_data(n=16)
    term = CosineEmbedding(
        weight=0.0, teacher_features="no_such", student_features="no_such"
    )
    distiller = compiled(
        Distiller(make_net("t", 4), make_net("s", 4), terms=[KDTerm(), term])
    )
    history = distiller.fit(x, y, batch_size=8, verbose=0).history
    assert set(history) == {"loss", "task_loss", "kd_loss", "skipped_samples"}


def test_gram_terms_at_two_depths_in_one_forward_pass():
    x, y = make_data(n=16)
    teacher, student = make_nested_net("t", 8), make_nested_net("s", 4)
    terms = [
        KDTerm(weight=1.0),
        GramTerm(NESTED_PATHS, NESTED_PATHS, weight=1.0, name="gram_encoders"),
        GramTerm("fusion", "fusion", weight=3.0, name="gram_fused"),
    ]
    distiller = compiled(Distiller(teacher, student, terms=terms))
    logs = distiller.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)
    t_enc, t_fused = nested_features(teacher, x)
    s_enc, s_fused = nested_features(student, x)

    def gram_loss(t, s):
        return np.mean((np_gram(t, "l2") - np_gram(s, "l2")) ** 2)

    assert logs["gram_encoders_loss"] == pytest.approx(gram_loss(t_enc, s_enc), 1e-4)
    assert logs["gram_fused_loss"] == pytest.approx(gram_loss(t_fused, s_fused), 1e-4)
    total = (
        logs["task_loss"]
        + logs["kd_loss"]
        + logs["gram_encoders_loss"]
        + 3.0 * logs["gram_fused_loss"]
    )
    assert logs["loss"] == pytest.approx(total, rel=1e-5)


@pytest.mark.slow  # fast tier: under 3 min per backend
def test_the_cache_serves_any_term_without_knowing_its_class():
    x, y = make_data(n=40)
    teacher = fused_net("t", 6)
    distillers = []
    for _ in range(2):
        keras.utils.set_random_seed(1)
        terms = [
            KDTerm(2.0),
            GramTerm(modality_map("t"), modality_map("s"), name="gram_enc"),
            GramTerm("t_fused", "s_fused", weight=2.0, name="gram_fused"),
            CosineEmbedding(
                teacher_features="t_b", student_features="s_b", name="cosine"
            ),
        ]
        distillers.append(compiled(Distiller(teacher, fused_net("s", 6), terms=terms)))
    live, from_cache = distillers
    cache = TeacherCache.build(from_cache, x, batch_size=16)
    assert sorted(cache.targets) == [
        "teacher/cosine/direction",
        "teacher/gram_enc/gram",
        "teacher/gram_fused/gram",
        "teacher/kd/logits",
    ]
    expected = batch_losses(live, x, y)
    got = batch_losses(from_cache, cache.attach(x), y)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # fast tier: under 3 min per backend
def test_terms_round_trip_through_a_keras_file(tmp_path):
    x, y = make_data(n=16)
    terms = [
        KDTerm(2.0, weight=0.3),
        GramTerm(
            modality_map("t"), modality_map("s"), loss=ModalityGram("dim"), name="g"
        ),
        CosineEmbedding(
            teacher_features="t_fused", student_features="s_fused", name="cosine"
        ),
    ]
    distiller = compiled(Distiller(fused_net("t", 6), fused_net("s", 6), terms=terms))
    distiller.fit(x, y, batch_size=8, verbose=0)
    path = tmp_path / "distiller.keras"
    distiller.save(path)
    restored = keras.saving.load_model(path)
    assert [type(t).__name__ for t in restored.terms] == [
        "KDTerm",
        "GramTerm",
        "CosineEmbedding",
    ]
    assert restored.get_config()["terms"] == distiller.get_config()["terms"]
    logs = distiller.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)
    again = restored.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)
    for key in ("kd_loss", "g_loss", "cosine_loss"):
        assert again[key] == pytest.approx(logs[key], rel=1e-5)


def test_bad_term_lists_fail_clearly():
    teacher, student = make_net("t", 4), make_net("s", 4)
    with pytest.raises(ValueError, match=r"either terms=\[...\] or the short form"):
        Distiller(teacher, student, terms=[KDTerm()], kd_weight=0.5)
    with pytest.raises(ValueError, match=r"Several terms are named \['kd'\]"):
        Distiller(teacher, student, terms=[KDTerm(), KDTerm(2.0)])
    with pytest.raises(TypeError, match="list of keras_gramkd.DistillationTerm"):
        Distiller(teacher, student, terms=[keras.losses.KLDivergence()])
    with pytest.raises(ValueError, match="may not be named 'task'"):
        Distiller(teacher, student, terms=[KDTerm(name="task")])
    with pytest.raises(ValueError, match="weight of term 'kd' must be a finite"):
        KDTerm(weight=-1.0)
    with pytest.raises(NotImplementedError, match="must implement loss"):
        compiled(
            Distiller(teacher, student, terms=[DistillationTerm(name="bare")])
        ).evaluate(*make_data(n=8), verbose=0)
