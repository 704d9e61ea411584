"""A Feature's pool is honoured wherever it can apply: on a term's single
address (relational terms, FitNet) as on a modality of a dict; refused where
it cannot (the stacked modalities of a Gram term); saved under its own key,
while configs and files saved before still load as they were."""

import json
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import NESTED_PATHS, make_data, make_nested_net, to_np
from test_relational import RELATION_TERMS

from keras_gramkd import Distiller, Feature, GramTerm
from keras_gramkd.cache import TeacherCache
from keras_gramkd.relational import FitNetTerm, ModalitySPTerm, SPTerm

DATA = Path(__file__).parent / "data"
TOKENS = NESTED_PATHS["b"]  # "b_enc/conv": (batch, 4, width) tokens
NP_POOL = {
    None: lambda h: h,
    "mean": lambda h: h.mean(1),
    "first": lambda h: h[:, 0],
    "max": lambda h: h.max(1),
}


def tokens_np(model, x):
    """The nested net's `b_enc/conv` tokens (batch, 4, width), layer by layer."""
    h = x["b"]
    for layer in model.get_layer("b_enc").layers:
        h = layer(h)
        if layer.name == "conv":
            return to_np(h).astype(np.float64)


def networks():
    keras.utils.set_random_seed(0)
    return make_nested_net("t", 8), make_nested_net("s", 4)


def term_losses(term, teacher, student, x):
    """The term's loss on x as one batch, and the compiled Distiller."""
    distiller = Distiller(teacher, student, terms=[term], task_weight=0.0)
    distiller.compile(optimizer="sgd")
    logs = distiller.evaluate(x, batch_size=len(x["a"]), return_dict=True, verbose=0)
    return logs[f"{term.name}_loss"], distiller


def np_fitnet(t, s, regressor):
    kernel, bias = (to_np(w).astype(np.float64) for w in regressor.weights)
    return np.mean((t - (s @ kernel + bias)) ** 2)


@pytest.mark.parametrize("pool", ["mean", "first", "max"])
@pytest.mark.parametrize("name", sorted(RELATION_TERMS))
def test_a_relation_term_pools_its_single_address(name, pool):
    cls, reference = RELATION_TERMS[name]
    x, _ = make_data(n=12)
    teacher, student = networks()
    term = cls(Feature(TOKENS, pool=pool), Feature(TOKENS, pool=pool))
    loss, _ = term_losses(term, teacher, student, x)
    t, s = tokens_np(teacher, x), tokens_np(student, x)
    expected = reference(NP_POOL[pool](t), NP_POOL[pool](s))
    np.testing.assert_allclose(loss, expected, rtol=1e-4, atol=1e-7)
    unpooled = reference(t, s)  # what the term read before: the raw tokens
    assert abs(expected - unpooled) > 1e-3 * abs(unpooled)


@pytest.mark.parametrize("pool", [None, "mean", "first", "max"])
def test_fitnet_pools_its_single_address_or_reads_it_as_it_is(pool):
    x, _ = make_data(n=12)
    teacher, student = networks()
    term = FitNetTerm(Feature(TOKENS, pool=pool), Feature(TOKENS, pool=pool))
    loss, _ = term_losses(term, teacher, student, x)
    t, s = tokens_np(teacher, x), tokens_np(student, x)
    expected = np_fitnet(NP_POOL[pool](t), NP_POOL[pool](s), term.regressor)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-7)


def test_a_pooled_side_may_meet_an_unpooled_vector():
    """FitNet pooling the teacher's tokens onto the student's (batch, d) vector."""
    x, _ = make_data(n=12)
    teacher, student = networks()
    term = FitNetTerm(Feature(TOKENS, pool="max"), "a_enc/embed")
    loss, _ = term_losses(term, teacher, student, x)
    embed = student.get_layer("a_enc").get_layer("embed")
    s = to_np(embed(x["a"])).astype(np.float64)
    expected = np_fitnet(tokens_np(teacher, x).max(1), s, term.regressor)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls", [GramTerm, ModalitySPTerm])
def test_a_pool_on_stacked_modalities_is_refused(cls):
    message = (
        rf"In {cls.__name__} '\w+', student_features is one address with "
        r"pool='mean'; a single address must output the stacked \(batch, M, d\) "
        r"embeddings, whose middle axis is the modalities, so it cannot be "
        r"pooled. Leave the pool out, or pass a dict modality name -> "
        r"Feature\(address, pool=...\) to pool each modality's tokens."
    )
    with pytest.raises(ValueError, match=message):
        cls("tokens", Feature("tokens", pool="mean"))
    term = cls("tokens", "tokens")  # as the layer outputs it: accepted
    assert (term.teacher_features.pool, term.student_features.pool) == (None, None)


def test_configs_round_trip_the_pool_under_its_own_key():
    term = FitNetTerm(Feature(TOKENS, pool="first"), "s_fused", name="hint")
    config = term.get_config()
    assert config["teacher_features"] == {"address": TOKENS, "pooling": "first"}
    assert config["student_features"] == {"address": "s_fused", "pooling": None}
    again = FitNetTerm.from_config(json.loads(json.dumps(config)))
    assert again.get_config() == config
    gram = GramTerm({"a": "t_a", "b": Feature("t_b", pool="max")}, {"a": "s_a"})
    spec = gram.get_config()["teacher_features"]
    assert spec == {
        "a": {"address": "t_a", "pooling": "mean"},  # a modality's default
        "b": {"address": "t_b", "pooling": "max"},
    }
    assert GramTerm.from_config(gram.get_config()).get_config() == gram.get_config()


def test_an_old_config_keeps_reading_a_single_address_as_it_is():
    """Configs saved before this change hold "pool": "mean" on every feature."""
    x, _ = make_data(n=12)
    teacher, student = networks()
    old = {
        "name": "hint",
        "weight": 1.0,
        "teacher_features": {"address": TOKENS, "pool": "mean"},
        "student_features": {"address": TOKENS, "pool": "mean"},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        term = FitNetTerm.from_config(old)
        gram = GramTerm.from_config(
            {
                "teacher_features": {"a": {"address": "t_a", "pool": "first"}},
                "student_features": {"address": "s_stack", "pool": "mean"},
            }
        )
    assert (term.teacher_features.pool, term.student_features.pool) == (None, None)
    assert (gram.teacher_features["a"].pool, gram.student_features.pool) == (
        "first",
        None,
    )
    loss, _ = term_losses(term, teacher, student, x)
    expected = np_fitnet(tokens_np(teacher, x), tokens_np(student, x), term.regressor)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-7)


def test_an_old_config_with_another_pool_on_a_single_address_warns():
    old = {"teacher_features": {"address": TOKENS, "pool": "max"}}
    message = (
        r"Feature 'b_enc/conv' has the config key 'pool' \('max'\), written "
        r"before pooling applied to a term's single address: that pool was "
        r"ignored then and is ignored now \(the layer's output is read as it "
        r"is\). To pool it, give Feature\('b_enc/conv', pool='max'\) \(config "
        r"key 'pooling'\)."
    )
    with pytest.warns(UserWarning, match=message):
        term = SPTerm.from_config({**old, "student_features": "s"})
    assert term.teacher_features.pool is None


def test_a_file_saved_before_loads_with_its_old_pooling():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        distiller = keras.saving.load_model(DATA / "distiller_v0_2_terms.keras")
    terms = {term.name: term for term in distiller.terms}
    hint = terms["hint"].get_config()
    assert hint["teacher_features"] == {"address": "t_a", "pooling": None}
    gram = terms["gram"].get_config()["student_features"]
    assert gram["a"] == {"address": "s_a", "pooling": "mean"}


def test_a_cache_is_keyed_by_the_pool(tmp_path):
    x, _ = make_data(n=12)
    teacher, student = networks()

    def distiller(pool):
        term = SPTerm(Feature(TOKENS, pool=pool), Feature(TOKENS, pool="mean"))
        return Distiller(teacher, student, terms=[term], task_weight=0.0)

    cache = TeacherCache.build(distiller("first"), x, batch_size=12)
    t = tokens_np(teacher, x)
    np.testing.assert_allclose(cache.targets["teacher/sp/features"], t[:, 0], 1e-5)
    with pytest.raises(ValueError, match=r"'pooling': 'first'.*'pooling': 'max'"):
        cache.attach(x, distiller("max"))
    attached = cache.attach(x, distiller("first"))
    assert sorted(attached) == ["a", "b", "c", "teacher/sp/features"]


def test_a_cache_saved_before_still_serves_its_single_address(tmp_path):
    """A cache file's term settings in the older feature form ("pool": "mean")."""
    x, _ = make_data(n=12)
    teacher, student = networks()

    def distiller(pool):
        term = SPTerm(Feature(TOKENS, pool=pool), Feature(TOKENS, pool="mean"))
        return Distiller(teacher, student, terms=[term], task_weight=0.0)

    path = tmp_path / "cache.npz"
    TeacherCache.build(distiller(None), x, batch_size=12).save(path)
    with np.load(path) as data:
        arrays = dict(data)
    metadata = json.loads(arrays["metadata"].tobytes().decode())
    features = metadata["term_settings"]["sp"]["teacher_features"]
    assert features == {"address": TOKENS, "pooling": None}
    metadata["term_settings"]["sp"]["teacher_features"] = {
        "address": TOKENS,
        "pool": "mean",
    }
    arrays["metadata"] = np.frombuffer(json.dumps(metadata).encode(), np.uint8)
    np.savez(path, **arrays)
    cache = TeacherCache.load(path)
    attached = cache.attach(x, distiller(None))
    np.testing.assert_allclose(
        attached["teacher/sp/features"], tokens_np(teacher, x), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match=r"'pooling': None.*'pooling': 'mean'"):
        cache.attach(x, distiller("mean"))
