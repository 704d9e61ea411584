"""Features anywhere in nested encoders: paths, layer objects, token pooling,
one forward pass, the user's models untouched, and the errors of a bad spec."""

import json

import keras
import numpy as np
import pytest
from helpers import (
    NESTED_PATHS,
    WIDTHS,
    make_data,
    make_nested_net,
    make_net,
    nested_features,
    np_gram,
    np_logit_kd,
    sparse_ce,
    to_np,
)

from keras_gramkd import Distiller, Feature
from keras_gramkd.features import pool_tokens


def nested_distiller(pool="mean", teacher=None, student=None, **kwargs):
    teacher = teacher or make_nested_net("t", 8)
    student = student or make_nested_net("s", 4)
    spec = {**NESTED_PATHS, "b": Feature(NESTED_PATHS["b"], pool=pool)}
    compile_args = {"run_eagerly": kwargs.pop("run_eagerly", False)}
    distiller = Distiller(teacher, student, spec, dict(spec), temperature=2.0, **kwargs)
    distiller.compile(optimizer="adam", loss=sparse_ce(), **compile_args)
    return distiller


@pytest.mark.parametrize("pool", ["mean", "first", "max"])
def test_paths_through_nested_models_match_numpy(pool):
    x, y = make_data(n=16)
    distiller = nested_distiller(pool)
    logs = distiller.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)
    t_feats, _ = nested_features(distiller.teacher, x, pool)
    s_feats, _ = nested_features(distiller.student, x, pool)
    gram = np.mean((np_gram(t_feats, "l2") - np_gram(s_feats, "l2")) ** 2)
    assert logs["gram_loss"] == pytest.approx(gram, rel=1e-4)
    t_logits = to_np(distiller.teacher(x))
    s_logits = to_np(distiller.student(x))
    kd = np_logit_kd(t_logits, s_logits, 2.0).mean()
    assert logs["kd_loss"] == pytest.approx(kd, rel=1e-4)


def test_layer_objects_address_like_their_paths():
    x, y = make_data(n=16)
    teacher, student = make_nested_net("t", 8), make_nested_net("s", 4)
    by_path = nested_distiller(teacher=teacher, student=student)

    def objects(model):
        return {
            "a": model.get_layer("a_enc").get_layer("embed"),
            "b": model.get_layer("b_enc").get_layer("conv"),
            "c": model.get_layer("c_enc").get_layer("inner").get_layer("embed"),
        }

    by_object = Distiller(teacher, student, objects(teacher), objects(student))
    by_object.compile(optimizer="adam", loss=sparse_ce())
    logs = [
        d.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)
        for d in (by_path, by_object)
    ]
    assert logs[0]["gram_loss"] == pytest.approx(logs[1]["gram_loss"], rel=1e-6)
    gram = by_object.get_config()["terms"][1]["config"]
    config = gram["student_features"]
    assert {k: v["address"] for k, v in config.items()} == NESTED_PATHS


@pytest.mark.slow  # fast tier: under 3 min per backend
def test_one_forward_pass_per_network_with_nested_encoders():
    x, y = make_data(n=32)
    teacher, student = make_nested_net("t", 8, True), make_nested_net("s", 4, True)
    distiller = nested_distiller(teacher=teacher, student=student, run_eagerly=True)
    counters = [
        model.get_layer(encoder).get_layer("count")
        for model in (student, teacher)
        for encoder in ("a_enc", "b_enc")
    ]
    distiller.fit(x, y, batch_size=8, epochs=1, verbose=0)  # builds and warms up
    for counter in counters:
        counter.calls = 0
    distiller.fit(x, y, batch_size=8, epochs=1, verbose=0)  # 4 steps
    assert [counter.calls for counter in counters] == [4, 4, 4, 4]


@pytest.mark.slow  # fast tier: under 3 min per backend
def test_compiled_steps_give_the_eager_losses():
    x, y = make_data(n=16)
    teacher, student = make_nested_net("t", 8), make_nested_net("s", 4)
    logs = []
    for run_eagerly in (True, False):
        distiller = nested_distiller(
            teacher=teacher, student=student, run_eagerly=run_eagerly
        )
        logs.append(
            distiller.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)
        )
    for key in ("loss", "task_loss", "kd_loss", "gram_loss"):
        assert logs[1][key] == pytest.approx(logs[0][key], abs=1e-5)


def test_the_users_student_is_left_untouched(tmp_path):
    x, y = make_data(n=32)
    student = make_nested_net("s", 4)
    before = json.dumps(student.get_config(), sort_keys=True, default=str)
    n_layers = len(student.layers)
    distiller = nested_distiller(student=student)
    distiller.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert distiller.student is student and len(student.layers) == n_layers
    assert json.dumps(student.get_config(), sort_keys=True, default=str) == before
    path = tmp_path / "student.keras"
    student.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        to_np(reloaded(x)), to_np(distiller.predict(x, verbose=0)), atol=1e-5
    )


def test_token_pooling_matches_numpy():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(2, 5, 3)).astype("float32")
    grid = rng.normal(size=(2, 4, 3, 6)).astype("float32")
    np.testing.assert_allclose(to_np(pool_tokens(tokens)), tokens.mean(1), 1e-6)
    np.testing.assert_allclose(to_np(pool_tokens(tokens, "first")), tokens[:, 0])
    np.testing.assert_allclose(to_np(pool_tokens(tokens, "max")), tokens.max(1))
    np.testing.assert_allclose(
        to_np(pool_tokens(grid)), grid.mean((1, 2)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(to_np(pool_tokens(grid, "max")), grid.max((1, 2)))


def image_net(prefix, width):
    """One (6, 5, 1) image modality through a Conv2D `conv` (batch, 6, 5, w)
    and one dense modality."""
    image = keras.Input((6, 5, 1), name="image")
    a = keras.Input((4,), name="a")
    conv = keras.layers.Conv2D(width, 3, padding="same", name="conv")(image)
    embed = keras.layers.Dense(width, name="embed")(a)
    h = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling2D()(conv), embed])
    return keras.Model({"image": image, "a": a}, keras.layers.Dense(3)(h))


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_feature_maps_are_pooled_per_modality(pool):
    rng = np.random.default_rng(1)
    x = {
        "image": rng.normal(size=(8, 6, 5, 1)).astype("float32"),
        "a": rng.normal(size=(8, 4)).astype("float32"),
    }
    y = rng.integers(0, 3, 8).astype("int32")
    teacher, student = image_net("t", 6), image_net("s", 3)
    spec = {"image": Feature("conv", pool), "a": "embed"}
    distiller = Distiller(teacher, student, spec, spec, kd_weight=0.0)
    distiller.compile(optimizer="adam", loss=sparse_ce())
    logs = distiller.evaluate(x, y, batch_size=8, return_dict=True, verbose=0)

    def feats(model):
        conv = to_np(model.get_layer("conv")(x["image"]))
        conv = conv.mean((1, 2)) if pool == "mean" else conv.max((1, 2))
        return np.stack([conv, to_np(model.get_layer("embed")(x["a"]))], 1)

    gram = np.mean((np_gram(feats(teacher), "l2") - np_gram(feats(student), "l2")) ** 2)
    assert logs["gram_loss"] == pytest.approx(gram, rel=1e-4)


# --- errors at construction ---------------------------------------------------


def shared_projection_net():
    """One Dense `proj` called once per modality: every 'modality' would read
    the same tensor."""
    inputs = {m: keras.Input((4,), name=m) for m in "ab"}
    proj = keras.layers.Dense(4, name="proj")
    embeds = [proj(inputs[m]) for m in "ab"]
    logits = keras.layers.Dense(3)(keras.layers.Concatenate()(embeds))
    return keras.Model(inputs, logits)


def twice_called_encoder_net():
    inner = keras.Input((4,))
    encoder = keras.Model(inner, keras.layers.Dense(4, name="embed")(inner), name="enc")
    inputs = {m: keras.Input((4,), name=m) for m in "ab"}
    embeds = [encoder(inputs[m]) for m in "ab"]
    logits = keras.layers.Dense(3)(keras.layers.Concatenate()(embeds))
    return keras.Model(inputs, logits)


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embed = keras.layers.Dense(4, name="embed")

    def call(self, x):
        return self.embed(x)


def subclassed_encoder_net():
    inputs = {m: keras.Input((4,), name=m) for m in "ab"}
    encoder = Subclassed(name="sub")
    embeds = [encoder(inputs["a"]), keras.layers.Dense(4, name="b_embed")(inputs["b"])]
    logits = keras.layers.Dense(3)(keras.layers.Concatenate()(embeds))
    return keras.Model(inputs, logits)


def two_modality_teacher():
    inputs = {m: keras.Input((4,), name=m) for m in "ab"}
    embeds = [keras.layers.Dense(4, name=f"t_{m}")(inputs[m]) for m in "ab"]
    logits = keras.layers.Dense(3)(keras.layers.Concatenate()(embeds))
    return keras.Model(inputs, logits)


T_AB = {"a": "t_a", "b": "t_b"}


@pytest.mark.parametrize(
    "student, spec, error",
    [
        (
            "nested",
            {**NESTED_PATHS, "a": "a_enc/embd"},
            r"no layer named 'a_enc/embd'\. Did you mean \['a_enc/embed'",
        ),
        (
            "nested",
            {**NESTED_PATHS, "c": "embed"},
            r"no layer named 'embed'\. Did you mean \['a_enc/embed', "
            r"'c_enc/inner/embed'\]",
        ),
        (
            "nested",
            {**NESTED_PATHS, "c": "c_enc/inner/embd"},
            r"Did you mean \['c_enc/inner/embed'",
        ),
        ("shared", {"a": "proj", "b": "proj"}, r"'proj' of the student is called 2"),
        (
            "twice",
            {"a": "enc/embed", "b": "enc"},
            r"'enc' of the student is "
            r"called 2 times.*ambiguous.*its own layer",
        ),
        (
            "nested",
            {**NESTED_PATHS, "b": "a_enc/embed"},
            r"modalities 'a' and 'b' both read 'a_enc/embed'.*its own embedding",
        ),
        (
            "subclassed",
            {"a": "sub/embed", "b": "b_embed"},
            r"no layer named 'sub/embed'.*'sub' is a Subclassed, not a functional "
            r"or Sequential model",
        ),
    ],
    ids=["typo", "leaf", "deep-typo", "shared", "twice", "same", "subclassed"],
)
def test_bad_addresses_fail_at_construction(student, spec, error):
    builders = {
        "nested": lambda: make_nested_net("s", 4),
        "shared": shared_projection_net,
        "twice": twice_called_encoder_net,
        "subclassed": subclassed_encoder_net,
    }
    teacher_spec = NESTED_PATHS if student == "nested" else T_AB
    teacher = make_nested_net("t", 8) if student == "nested" else two_modality_teacher()
    with pytest.raises(ValueError, match=error):
        Distiller(teacher, builders[student](), teacher_spec, spec)


def test_a_layer_object_and_its_path_for_two_modalities_fail():
    student = make_nested_net("s", 4)
    layer = student.get_layer("a_enc").get_layer("embed")
    spec = {**NESTED_PATHS, "b": layer}
    with pytest.raises(ValueError, match="modalities 'a' and 'b' both read"):
        Distiller(make_nested_net("t", 8), student, NESTED_PATHS, spec)


def test_a_foreign_layer_object_fails():
    foreign = keras.layers.Dense(4, name="elsewhere")
    with pytest.raises(ValueError, match="'elsewhere'.*is not part of the student"):
        Distiller(
            make_nested_net("t", 8),
            make_nested_net("s", 4),
            NESTED_PATHS,
            {**NESTED_PATHS, "a": foreign},
        )


def test_teacher_and_student_must_be_separate():
    net = make_net("t", 4)
    with pytest.raises(ValueError, match="teacher and the student are the same"):
        Distiller(net, net, gram_weight=0.0)
    shared = keras.layers.Dense(4, name="shared_encoder")

    def with_shared(prefix):
        inputs = {m: keras.Input((WIDTHS[m],), name=m) for m in "ab"}
        embeds = [shared(inputs["a"]), keras.layers.Dense(4)(inputs["b"])]
        h = keras.layers.Concatenate()(embeds)
        return keras.Model(inputs, keras.layers.Dense(3)(h), name=prefix)

    with pytest.raises(ValueError, match=r"share layer\(s\) \['shared_encoder'\]"):
        Distiller(with_shared("t"), with_shared("s"), gram_weight=0.0)


def test_bad_pooling_fails_clearly():
    with pytest.raises(ValueError, match="Unknown pooling 'avg'"):
        Feature("conv", pool="avg")
    teacher, student = image_net("t", 6), image_net("s", 3)
    spec = {"image": Feature("conv", "first"), "a": "embed"}
    with pytest.raises(ValueError, match=r"pool='first' takes token 0 of a \(batch"):
        Distiller(teacher, student, spec, spec)
