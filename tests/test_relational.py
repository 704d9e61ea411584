"""Relational terms: SP, RKD, PKT, FitNet hints and per-modality SP.

The ops against float64 numpy written from the papers' equations (with the
reference code's reductions and floors), their finiteness on degenerate
batches, and each term in a real `Distiller.fit`: the logged loss equals the
op on the same batch, skipped samples leave the relations, FitNet's regressor
trains and stays out of the student, and a cached teacher gives the live
teacher's losses."""

import keras
import numpy as np
import pytest
from helpers import (
    batch_losses,
    make_data,
    make_net,
    modality_map,
    net_outputs,
    sparse_ce,
    to_np,
    value_and_grad,
)

from keras_gramkd import (
    Distiller,
    FitNetTerm,
    KDTerm,
    ModalitySPTerm,
    PKTTerm,
    RKDTerm,
    SPTerm,
    relational_ops,
)
from keras_gramkd.cache import TeacherCache

# --- float64 references, from the papers' equations ---------------------------


def _f64(x):
    x = np.asarray(x, np.float64)
    return x.reshape(len(x), -1)


def _subset(t, s, w):
    """Rows of positive weight, and the pair weights wᵢwⱼ over them."""
    t, s = _f64(t), _f64(s)
    w = np.ones(len(t)) if w is None else np.asarray(w, np.float64)
    keep = w > 0
    return t[keep], s[keep], w[keep]


def _weighted_mean(values, w):
    weights = np.einsum("i,j->ij", w, w)
    if values.ndim == 3:
        weights = weights[:, :, None] * w[None, None, :]
    return np.sum(weights * values) / np.sum(weights)


def np_sp(t, s, w=None):
    t, s, w = _subset(t, s, w)

    def normalized_gram(f):
        g = f @ f.T
        return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)

    return _weighted_mean((normalized_gram(t) - normalized_gram(s)) ** 2, w)


def np_huber(x):
    a = np.abs(x)
    return np.where(a < 1.0, 0.5 * x**2, a - 0.5)


def np_distances(f):
    diff = f[:, None, :] - f[None, :, :]
    d = np.sqrt(np.maximum(np.sum(diff**2, axis=-1), 1e-12))
    np.fill_diagonal(d, 0.0)
    return d / d[d > 0].mean()


def np_rkd_distance(t, s, w=None):
    t, s, w = _subset(t, s, w)
    return _weighted_mean(np_huber(np_distances(s) - np_distances(t)), w)


def np_angles(f):
    e = f[None, :, :] - f[:, None, :]  # e[i, j] = f_j − f_i
    e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    return np.einsum("ijd,ikd->ijk", e, e)


def np_rkd_angle(t, s, w=None):
    t, s, w = _subset(t, s, w)
    return _weighted_mean(np_huber(np_angles(s) - np_angles(t)), w)


def np_pkt(t, s, w=None):
    t, s, w = _subset(t, s, w)

    def affinities(f):
        f = f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-7)
        k = (f @ f.T + 1.0) / 2.0
        return k / k.sum(axis=1, keepdims=True)

    kt, ks = affinities(t), affinities(s)
    return _weighted_mean(kt * np.log((kt + 1e-7) / (ks + 1e-7)), w)


def np_modality_sp(t_list, s_list, w=None, mask=None):
    n = len(t_list[0])
    w = np.ones(n) if w is None else np.asarray(w, np.float64)
    values = []
    for m, (t, s) in enumerate(zip(t_list, s_list, strict=True)):
        wm = w if mask is None else w * mask[:, m]
        if wm.sum() > 0:
            values.append(np_sp(t, s, wm))
    return np.mean(values)


OPS = {
    "sp": (relational_ops.similarity_preserving, np_sp),
    "rkd_distance": (relational_ops.rkd_distance, np_rkd_distance),
    "rkd_angle": (relational_ops.rkd_angle, np_rkd_angle),
    "pkt": (relational_ops.pkt, np_pkt),
}
SLOW_GRADIENTS = ("rkd_angle", "pkt")  # 2.6-2.8 s each on JAX: the slow tier


def rows(batch, width, seed):
    return np.random.default_rng(seed).normal(size=(batch, width)).astype("float32")


def degenerate(batch, width, seed):
    """Random rows with a row of zeros and a duplicated row."""
    f = rows(batch, width, seed)
    f[0] = 0.0
    f[-1] = f[1]
    return f


# --- the ops --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("batch,d_t,d_s", [(2, 3, 5), (5, 16, 4), (9, 7, 7)])
def test_op_matches_numpy_with_different_widths(name, batch, d_t, d_s):
    op, reference = OPS[name]
    t, s = rows(batch, d_t, 1), rows(batch, d_s, 2)
    np.testing.assert_allclose(float(op(t, s)), reference(t, s), rtol=2e-5, atol=1e-6)
    assert float(op(t, t)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_matches_numpy_with_sample_weights(name):
    """Weight-0 rows leave the relations: the loss is the sub-batch's; other
    weights weight the pairs (triplets) by their products."""
    op, reference = OPS[name]
    t, s = rows(7, 6, 3), rows(7, 3, 4)
    mask = np.array([1, 0, 1, 1, 0, 1, 1], "float32")
    np.testing.assert_allclose(
        float(op(t, s, mask)), reference(t[mask > 0], s[mask > 0]), rtol=2e-5
    )
    weights = np.array([0.5, 0.0, 2.0, 1.0, 0.0, 1.5, 1.0], "float32")
    np.testing.assert_allclose(
        float(op(t, s, weights)), reference(t, s, weights), rtol=2e-5
    )
    # Garbage in the excluded rows changes nothing.
    t2, s2 = t.copy(), s.copy()
    t2[1], s2[4] = 1e3, -7.0
    np.testing.assert_allclose(float(op(t2, s2, mask)), float(op(t, s, mask)), 1e-6)


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("batch", [2, pytest.param(6, marks=pytest.mark.slow)])
def test_zero_and_duplicate_rows_give_finite_loss_and_gradients(name, batch):
    op, reference = OPS[name]
    t, s = degenerate(batch, 5, 5), degenerate(batch, 3, 6)
    value, grad = value_and_grad(lambda x: op(t, x), s)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(value, reference(t, s), rtol=1e-4, atol=1e-6)
    _, t_grad = value_and_grad(lambda x: op(x, s), t)
    assert np.all(np.isfinite(t_grad))
    zeros = np.zeros((batch, 3), "float32")  # all rows identical (and zero)
    value, grad = value_and_grad(lambda x: op(t, x), zeros)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.slow) if name in SLOW_GRADIENTS else name
        for name in sorted(OPS)
    ],
)
def test_gradient_matches_finite_differences(name):
    op, reference = OPS[name]
    t, s = rows(4, 5, 7), rows(4, 3, 8)
    _, grad = value_and_grad(lambda x: op(t, x), s)
    expected = np.zeros(s.shape)
    step = 1e-6
    for index in np.ndindex(*s.shape):
        plus, minus = s.astype(np.float64), s.astype(np.float64)
        plus[index] += step
        minus[index] -= step
        expected[index] = (reference(t, plus) - reference(t, minus)) / (2 * step)
    np.testing.assert_allclose(grad, expected, rtol=2e-3, atol=2e-5)


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_inputs_compute_in_float32(name, dtype):
    op, reference = OPS[name]
    t = keras.ops.cast(rows(6, 8, 9), dtype)
    s = keras.ops.cast(rows(6, 4, 10), dtype)
    value = op(t, s)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    expected = reference(to_np(keras.ops.cast(t, "float32")), to_np(s).astype("f4"))
    np.testing.assert_allclose(float(value), expected, rtol=1e-4, atol=1e-6)


def test_higher_rank_features_are_flattened_per_sample():
    t = np.random.default_rng(0).normal(size=(4, 3, 2)).astype("float32")
    s = rows(4, 5, 1)
    for op, reference in OPS.values():
        np.testing.assert_allclose(float(op(t, s)), reference(t, s), rtol=2e-5)


def test_smooth_l1_matches_huber():
    x = np.array([-3.0, -1.0, -0.5, 0.0, 0.25, 1.0, 2.0], "float32")
    np.testing.assert_allclose(to_np(relational_ops.smooth_l1(x)), np_huber(x), 1e-7)


def test_modality_sp_matches_numpy():
    t = [rows(6, 8, 1), rows(6, 3, 2), rows(6, 5, 3)]
    s = [rows(6, 4, 4), rows(6, 4, 5), rows(6, 2, 6)]
    np.testing.assert_allclose(
        float(relational_ops.modality_similarity_preserving(t, s)),
        np_modality_sp(t, s),
        2e-5,
    )
    mask = np.ones((6, 3), "float32")
    mask[[0, 2], 1] = 0.0
    mask[:, 2] = 0.0  # missing everywhere: left out of the average
    weights = np.array([1, 1, 0, 1, 2, 1], "float32")
    np.testing.assert_allclose(
        float(relational_ops.modality_similarity_preserving(t, s, weights, mask)),
        np_modality_sp(t, s, weights, mask),
        rtol=2e-5,
    )
    stacked_t = np.stack([rows(5, 4, 7), rows(5, 4, 8)], axis=1)
    stacked_s = np.stack([rows(5, 2, 9), rows(5, 2, 10)], axis=1)
    np.testing.assert_allclose(
        float(relational_ops.modality_similarity_preserving(stacked_t, stacked_s)),
        np_modality_sp(
            list(stacked_t.transpose(1, 0, 2)), list(stacked_s.transpose(1, 0, 2))
        ),
        rtol=2e-5,
    )


# --- the terms in a Distiller -----------------------------------------------------


def fused(model):
    """The make_net model's Concatenate layer: the fused embedding."""
    (layer,) = [x for x in model.layers if isinstance(x, keras.layers.Concatenate)]
    return layer


def fused_np(model, x):
    view = keras.Model(model.input, fused(model).output)
    return to_np(view(x, training=False))


def distiller_with(term, teacher=None, student=None, **kwargs):
    distiller = Distiller(
        teacher or make_net("t", 16),
        student or make_net("s", 4),
        terms=[term],
        task_weight=0.0,
        **kwargs,
    )
    distiller.compile(optimizer=keras.optimizers.Adam(0.01))
    return distiller


RELATION_TERMS = {
    "sp": (SPTerm, np_sp),
    "pkt": (PKTTerm, np_pkt),
    "rkd": (
        RKDTerm,
        lambda t, s, w=None: np_rkd_distance(t, s, w) + 2.0 * np_rkd_angle(t, s, w),
    ),
}


@pytest.mark.parametrize("name", sorted(RELATION_TERMS))
def test_term_loss_in_history_is_the_op_on_the_batch_and_decreases(name):
    cls, reference = RELATION_TERMS[name]
    x, _ = make_data(n=24)
    teacher, student = make_net("t", 16), make_net("s", 4)
    term = cls(fused(teacher), fused(student))
    distiller = distiller_with(term, teacher, student)
    expected = reference(fused_np(teacher, x), fused_np(student, x))
    history = distiller.fit(x, batch_size=24, epochs=4, verbose=0).history
    losses = history[f"{name}_loss"]
    np.testing.assert_allclose(losses[0], expected, rtol=1e-4, atol=1e-7)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    np.testing.assert_allclose(history["loss"], losses, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(RELATION_TERMS))
def test_skipped_samples_are_left_out_of_the_relations(name):
    """A NaN row is zeroed by the Distiller; the term's relations exclude it,
    so the loss is the op on the other rows."""
    cls, reference = RELATION_TERMS[name]
    x, _ = make_data(n=12)
    teacher, student = make_net("t", 16), make_net("s", 4)
    distiller = distiller_with(
        cls("t_a", "s_a"), teacher, student, on_bad_sample="skip"
    )
    _, t_feats = net_outputs(teacher, "t", x)
    _, s_feats = net_outputs(student, "s", x)
    keep = np.arange(12) != 5
    expected = reference(t_feats[keep, 0], s_feats[keep, 0])
    bad = {k: v.copy() for k, v in x.items()}
    bad["b"][5, 0] = np.nan
    history = distiller.fit(bad, batch_size=12, epochs=1, verbose=0).history
    assert history["skipped_samples"][0] == 1
    np.testing.assert_allclose(history[f"{name}_loss"][0], expected, rtol=1e-4)


def test_rkd_parts_and_their_weights():
    x, _ = make_data(n=10)
    teacher, student = make_net("t", 16), make_net("s", 4)
    _, t_feats = net_outputs(teacher, "t", x)
    _, s_feats = net_outputs(student, "s", x)
    t, s = t_feats[:, 1], s_feats[:, 1]
    terms = [
        RKDTerm("t_b", "s_b", weight=25.0, angle_weight=0.0, name="rkd_d"),
        RKDTerm(
            "t_b",
            "s_b",
            weight=50.0,
            distance_weight=0.0,
            angle_weight=1.0,
            name="rkd_a",
        ),
        RKDTerm("t_b", "s_b", distance_weight=3.0, angle_weight=0.5),
    ]
    distiller = Distiller(teacher, student, terms=terms, task_weight=0.0)
    distiller.compile(optimizer="sgd")
    history = distiller.fit(x, batch_size=10, epochs=1, verbose=0).history
    d, a = np_rkd_distance(t, s), np_rkd_angle(t, s)
    np.testing.assert_allclose(history["rkd_d_loss"][0], d, rtol=1e-4)
    np.testing.assert_allclose(history["rkd_a_loss"][0], a, rtol=1e-4)
    np.testing.assert_allclose(history["rkd_loss"][0], 3 * d + 0.5 * a, rtol=1e-4)
    np.testing.assert_allclose(
        history["loss"][0], 25 * d + 50 * a + 3 * d + 0.5 * a, rtol=1e-4
    )


def test_fitnet_regressor_trains_with_the_student_and_stays_out_of_it(tmp_path):
    x, y = make_data(n=16)
    teacher, student = make_net("t", 16), make_net("s", 4)
    n_student_weights = len(student.weights)
    term = FitNetTerm("t_c", "s_c", weight=2.0)
    distiller = Distiller(teacher, student, terms=[KDTerm(), term])
    distiller.compile(optimizer=keras.optimizers.Adam(0.01), loss=sparse_ce())
    assert term.regressor is not None
    kernel, bias = (to_np(w) for w in term.regressor.weights)
    assert kernel.shape == (4, 16)
    trainable = {id(v) for v in distiller.trainable_variables}
    assert all(id(v) in trainable for v in term.regressor.trainable_variables)

    _, t_feats = net_outputs(teacher, "t", x)
    _, s_feats = net_outputs(student, "s", x)
    hint = np.mean((t_feats[:, 2] - (s_feats[:, 2] @ kernel + bias)) ** 2)
    history = distiller.fit(x, y, batch_size=16, epochs=3, verbose=0).history
    np.testing.assert_allclose(history["fitnet_loss"][0], hint, rtol=1e-4)
    assert history["fitnet_loss"][-1] < history["fitnet_loss"][0]
    assert not np.allclose(to_np(term.regressor.kernel), kernel)

    assert len(student.weights) == n_student_weights
    path = str(tmp_path / "student.keras")
    student.save(path)
    reloaded = keras.saving.load_model(path)
    assert len(reloaded.weights) == n_student_weights
    assert not any("regressor" in w.path for w in reloaded.weights)
    np.testing.assert_allclose(
        to_np(reloaded.predict(x, verbose=0)),
        to_np(student.predict(x, verbose=0)),
        rtol=1e-5,
        atol=1e-6,
    )

    # The Distiller's own file keeps the regressor.
    distiller_path = str(tmp_path / "distiller.keras")
    distiller.save(distiller_path)
    loaded = keras.saving.load_model(distiller_path)
    (loaded_term,) = [t for t in loaded.terms if isinstance(t, FitNetTerm)]
    np.testing.assert_allclose(
        to_np(loaded_term.regressor.kernel), to_np(term.regressor.kernel)
    )


def test_terms_round_trip_through_get_config():
    terms = [
        SPTerm("t_a", "s_a", weight=3000.0, name="sp_a"),
        PKTTerm("t_a", "s_a", weight=0.5),
        RKDTerm("t_a", "s_a", weight=25.0, distance_weight=1.5, angle_weight=0.0),
        FitNetTerm("t_a", "s_a", weight=2.0, name="hint"),
        ModalitySPTerm(modality_map("t"), modality_map("s", "ab"), weight=4.0),
    ]
    for term in terms:
        config = term.get_config()
        again = type(term).from_config(config)
        assert again.get_config() == config
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(term)
        )
        assert type(restored) is type(term) and restored.get_config() == config
    fitnet = FitNetTerm.from_config(terms[3].get_config())
    assert fitnet.name == "hint" and fitnet.weight == 2.0 and fitnet.regressor is None


def test_modality_sp_term_matches_numpy_with_a_modality_mask():
    x, _ = make_data(n=12)
    mask = np.ones((12, 3), "float32")
    mask[[1, 4, 7], 0] = 0.0
    mask[[2, 3], 2] = 0.0
    teacher, student = make_net("t", 16), make_net("s", 4, modalities="ab")
    term = ModalitySPTerm(modality_map("t"), modality_map("s", "ab"))
    distiller = distiller_with(term, teacher, student)
    assert distiller.modality_names == ["a", "b"]
    _, t_feats = net_outputs(teacher, "t", x)
    _, s_feats = net_outputs(student, "s", {k: x[k] for k in "ab"}, modalities="ab")
    expected = np_modality_sp(
        [t_feats[:, 0], t_feats[:, 1]], [s_feats[:, 0], s_feats[:, 1]], mask=mask[:, :2]
    )
    data = {**x, "modality_mask": mask[:, :2]}
    history = distiller.fit(data, batch_size=12, epochs=3, verbose=0).history
    np.testing.assert_allclose(history["modality_sp_loss"][0], expected, rtol=1e-4)
    assert history["modality_sp_loss"][-1] < history["modality_sp_loss"][0]


@pytest.mark.slow  # fast tier: under 3 min per backend
def test_fit_from_cache_gives_the_live_teachers_batch_losses():
    """The cached target is the teacher's feature per sample; the relation
    is formed per (shuffled) batch, as with the live teacher."""
    x, y = make_data()
    teacher = make_net("t", 16)
    distillers = []
    for _ in range(2):
        keras.utils.set_random_seed(1)
        student = make_net("s", 4)
        terms = [
            KDTerm(),
            RKDTerm(fused(teacher), fused(student)),
            ModalitySPTerm(modality_map("t"), modality_map("s")),
        ]
        distiller = Distiller(teacher, student, terms=terms)
        distiller.compile(optimizer="adam", loss=sparse_ce())
        distillers.append(distiller)
    live, cached = distillers
    cache = TeacherCache.build(cached, x, batch_size=16)
    assert sorted(cache.targets) == [
        "teacher/kd/logits",
        "teacher/modality_sp/features/a",
        "teacher/modality_sp/features/b",
        "teacher/modality_sp/features/c",
        "teacher/rkd/features",
    ]
    expected = batch_losses(live, x, y)
    found = batch_losses(cached, cache.attach(x), y)
    assert found.shape == expected.shape == (6, 5)
    np.testing.assert_allclose(found, expected, rtol=0, atol=1e-5)


# --- errors ---------------------------------------------------------------------


def test_bad_configurations_fail_clearly():
    with pytest.raises(ValueError, match="one feature address"):
        SPTerm(modality_map("t"), modality_map("s"))
    with pytest.raises(ValueError, match="needs student_features"):
        PKTTerm("t_a")
    with pytest.raises(ValueError, match="both 0"):
        RKDTerm("t_a", "s_a", distance_weight=0.0, angle_weight=0.0)
    with pytest.raises(ValueError, match="angle_weight"):
        RKDTerm("t_a", "s_a", angle_weight=-1.0)
    with pytest.raises(ValueError, match="not among the teacher's"):
        ModalitySPTerm(modality_map("t", "ab"), modality_map("s", "abc"))
    with pytest.raises(ValueError, match="align by name"):
        ModalitySPTerm("t_a", modality_map("s"))
    SPTerm(weight=0.0)  # an unused term needs no features
    with pytest.raises(ValueError, match="last axis only"):
        FitNetTerm("t_a", "s_a").check_features((None, 2, 8), (None, 4))


@pytest.mark.slow  # a fresh Python process
def test_saved_distiller_with_relational_terms_loads_in_a_fresh_process(tmp_path):
    """Importing the Distiller registers the relational terms too."""
    from helpers import run_python

    teacher, student = make_net("t", 16), make_net("s", 4)
    terms = [SPTerm("t_a", "s_a"), FitNetTerm("t_b", "s_b")]
    path = str(tmp_path / "distiller.keras")
    Distiller(teacher, student, terms=terms, task_weight=0.0).save(path)
    code = (
        "import keras, keras_gramkd.distiller\n"
        f"model = keras.saving.load_model({path!r})\n"
        "print([type(t).__name__ for t in model.terms])"
    )
    assert run_python(code).strip().splitlines()[-1] == "['SPTerm', 'FitNetTerm']"


@pytest.mark.slow  # fast tier: under 3 min per backend
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_terms_train_under_mixed_precision(policy):
    """float16 features, float32 losses and regressor; finite, and the
    logged values are the float64 references of the float16 features."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        x, _ = make_data(n=16)
        teacher, student = make_net("t", 16), make_net("s", 4)
        terms = [
            SPTerm("t_a", "s_a"),
            RKDTerm("t_b", "s_b"),
            PKTTerm("t_c", "s_c"),
            FitNetTerm("t_a", "s_a"),
            ModalitySPTerm(modality_map("t"), modality_map("s")),
        ]
        distiller = Distiller(teacher, student, terms=terms, task_weight=0.0)
        distiller.compile(optimizer="adam")
        assert terms[3].regressor.kernel.dtype == "float32"
        _, t_feats = net_outputs(teacher, "t", x)
        _, s_feats = net_outputs(student, "s", x)
        t, s = t_feats.astype("f4"), s_feats.astype("f4")
        history = distiller.fit(x, batch_size=16, epochs=2, verbose=0).history
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert all(np.all(np.isfinite(v)) for v in history.values())
    expected = {
        "sp_loss": np_sp(t[:, 0], s[:, 0]),
        "rkd_loss": np_rkd_distance(t[:, 1], s[:, 1])
        + 2 * np_rkd_angle(t[:, 1], s[:, 1]),
        "pkt_loss": np_pkt(t[:, 2], s[:, 2]),
        "modality_sp_loss": np_modality_sp(
            list(t.transpose(1, 0, 2)), list(s.transpose(1, 0, 2))
        ),
    }
    # The features in fit and in net_outputs may round differently (a
    # compiled graph): bfloat16 keeps 8 bits, so its tolerance is wider.
    rtol = 1e-3 if policy == "mixed_float16" else 1e-2
    for key, value in expected.items():
        np.testing.assert_allclose(history[key][0], value, rtol=rtol, err_msg=key)


@pytest.mark.parametrize("scale", [1e20, 3e30])
def test_relational_losses_do_not_overflow_at_any_feature_scale(scale):
    """SP, RKD and PKT are unchanged by one factor on a network's features."""
    rng = np.random.default_rng(3)
    teacher = rng.normal(size=(6, 5)).astype("float32")
    student = rng.normal(size=(6, 4)).astype("float32")
    weights = np.array([1, 1, 0, 1, 2, 1], "float32")
    for loss in (
        relational_ops.similarity_preserving,
        relational_ops.rkd_distance,
        relational_ops.rkd_angle,
        relational_ops.pkt,
    ):
        reference = float(loss(teacher, student, weights))
        scaled = float(loss(teacher * np.float32(scale), student, weights))
        assert np.isfinite(scaled), loss.__name__
        np.testing.assert_allclose(scaled, reference, rtol=2e-4, err_msg=loss.__name__)
