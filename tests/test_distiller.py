"""Distiller: training on every data source, losses vs references, errors, saving."""

import keras
import numpy as np
import pytest
from helpers import (
    WIDTHS,
    DictSequence,
    build_distiller,
    make_data,
    make_net,
    modality_map,
    net_outputs,
    np_gram,
    np_logit_kd,
    sparse_ce,
    to_np,
)

from keras_gramkd import Distiller, GramTerm, KDTerm, ModalityGram
from keras_gramkd.relational import FitNetTerm


@pytest.mark.parametrize("source", ["numpy", "tf.data", "PyDataset"])
def test_fit_logs_each_term_on_every_data_source(source):
    x, y = make_data()
    distiller = build_distiller()
    if source == "numpy":
        data = {"x": x, "y": y, "batch_size": 16, "validation_data": (x, y)}
    elif source == "tf.data":
        import tensorflow as tf

        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
        data = {"x": ds, "validation_data": ds}
    else:
        data = {"x": DictSequence(x, y, 16), "validation_data": DictSequence(x, y, 16)}
    history = distiller.fit(epochs=2, verbose=0, **data).history
    expected = {"loss", "task_loss", "kd_loss", "gram_loss", "accuracy"}
    expected.add("skipped_samples")
    assert history["skipped_samples"] == [0.0, 0.0]
    assert set(history) == expected | {f"val_{k}" for k in expected}
    assert all(len(v) == 2 and np.all(np.isfinite(v)) for v in history.values())
    assert history["loss"][1] < history["loss"][0]


def test_loss_terms_match_numpy_references():
    x, y = make_data(n=16)
    weights = (0.7, 2.0, 3.0)
    distiller = build_distiller(weights, temperature=2.0)
    logs = distiller.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)
    t_logits, t_feats = net_outputs(distiller.teacher, "t", x)
    s_logits, s_feats = net_outputs(distiller.student, "s", x)
    s_logits64 = s_logits.astype(np.float64)
    log_probs = s_logits64 - np.log(np.exp(s_logits64).sum(-1, keepdims=True))
    task = -log_probs[np.arange(16), y].mean()
    kd = np_logit_kd(t_logits, s_logits, 2.0).mean()
    gram = np.mean((np_gram(t_feats, "l2") - np_gram(s_feats, "l2")) ** 2)
    assert logs["task_loss"] == pytest.approx(task, rel=1e-4)
    assert logs["kd_loss"] == pytest.approx(kd, rel=1e-4)
    assert logs["gram_loss"] == pytest.approx(gram, rel=1e-4)
    assert logs["loss"] == pytest.approx(0.7 * task + 2.0 * kd + 3.0 * gram, rel=1e-4)


def test_one_forward_pass_per_network_per_step():
    x, y = make_data(n=32)
    teacher = make_net("t", 16, counter=True)
    student = make_net("s", 4, counter=True)
    eager = {"loss": sparse_ce(), "run_eagerly": True}
    distiller = build_distiller(teacher=teacher, student=student, compile_args=eager)
    counters = [student.get_layer("s_counter_a"), teacher.get_layer("t_counter_a")]
    distiller.fit(x, y, batch_size=8, epochs=1, verbose=0)  # builds, traces, warms up
    for counter in counters:
        counter.calls = 0
    distiller.fit(x, y, batch_size=8, epochs=1, verbose=0)  # 4 steps
    assert [counter.calls for counter in counters] == [4, 4]


def test_zero_weights_skip_their_terms_and_the_teacher():
    x, y = make_data(n=16)
    teacher = make_net("t", 16, counter=True)
    eager = {"loss": sparse_ce(), "run_eagerly": True}
    distiller = build_distiller((1.0, 0.0, 0.0), teacher=teacher, compile_args=eager)
    teacher.get_layer("t_counter_a").calls = 0  # shape inference may have run it
    history = distiller.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    assert set(history) == {"loss", "task_loss", "skipped_samples"}
    assert history["loss"] == pytest.approx(history["task_loss"])
    assert teacher.get_layer("t_counter_a").calls == 0


def test_gram_weight_zero_needs_no_modalities_and_task_zero_needs_no_labels():
    x, y = make_data(n=16)
    distiller = Distiller(make_net("t", 8), make_net("s", 4), gram_weight=0.0)
    distiller.compile(optimizer="adam", loss=sparse_ce())
    assert set(distiller.fit(x, y, verbose=0).history) == {
        "loss",
        "task_loss",
        "kd_loss",
        "skipped_samples",
    }
    label_free = build_distiller((0.0, 1.0, 1.0), compile_args={})
    history = label_free.fit(x, batch_size=8, epochs=1, verbose=0).history
    assert set(history) == {"loss", "kd_loss", "gram_loss", "skipped_samples"}


def test_teacher_is_frozen_bit_identical_after_fit():
    x, y = make_data()
    teacher = make_net("t", 16, norm_and_dropout=True)
    before = [np.array(to_np(w)) for w in teacher.weights]
    distiller = build_distiller(teacher=teacher)
    distiller.fit(x, y, batch_size=8, epochs=2, verbose=0)
    after = [to_np(w) for w in teacher.weights]
    assert len(before) == len(after) > 0
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(b, a)
    assert not teacher.trainable
    assert len(distiller.trainable_weights) == len(distiller.student.trainable_weights)


def test_student_with_fewer_modalities_and_fewer_inputs():
    x, y = make_data()
    student = make_net("s", 4, modalities=("a", "c"))
    distiller = build_distiller(
        student=student, student_modalities=modality_map("s", ("a", "c"))
    )
    history = distiller.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert np.isfinite(history["gram_loss"][0])
    np.testing.assert_allclose(
        to_np(distiller.predict(x, verbose=0)),
        to_np(student.predict({"a": x["a"], "c": x["c"]}, verbose=0)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_stacked_modality_layer_spec():
    inputs = {m: keras.Input((w,), name=m) for m, w in {"a": 4, "b": 6}.items()}

    def net(prefix, width):
        embeds = [keras.layers.Dense(width)(inputs[m]) for m in ("a", "b")]
        tokens = keras.layers.Lambda(
            lambda t: keras.ops.stack(t, axis=1), name=f"{prefix}_tokens"
        )(embeds)
        logits = keras.layers.Dense(3)(keras.layers.Flatten()(tokens))
        return keras.Model(inputs, logits)

    distiller = build_distiller(
        teacher=net("t", 8),
        student=net("s", 2),
        teacher_modalities="t_tokens",
        student_modalities="s_tokens",
    )
    x, y = make_data()
    logs = distiller.evaluate({k: x[k] for k in "ab"}, y, return_dict=True, verbose=0)
    assert logs["gram_loss"] > 0


def test_predict_and_call_return_student_logits():
    x, _ = make_data(n=10)
    distiller = build_distiller()
    expected = to_np(distiller.student(x, training=False))
    np.testing.assert_allclose(to_np(distiller(x, training=False)), expected, rtol=1e-6)
    np.testing.assert_allclose(
        distiller.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6
    )


def test_zero_norm_embeddings_train_without_nan():
    student = make_net("s", 4)
    for m in "abc":
        layer = student.get_layer(f"s_{m}")
        layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    distiller = build_distiller(student=student)
    x, y = make_data()
    history = distiller.fit(x, y, batch_size=16, epochs=2, verbose=0).history
    assert np.all(np.isfinite(history["loss"]))
    assert all(np.all(np.isfinite(to_np(w))) for w in student.weights)


def test_custom_gram_loss_is_used():
    x, y = make_data(n=16)
    l2 = build_distiller().evaluate(x, y, batch_size=16, return_dict=True, verbose=0)
    raw = build_distiller(gram_loss=ModalityGram("none")).evaluate(
        x, y, batch_size=16, return_dict=True, verbose=0
    )
    assert raw["gram_loss"] != pytest.approx(l2["gram_loss"], rel=1e-3)


def test_save_and_load_round_trip(tmp_path):
    x, y = make_data()
    distiller = build_distiller(
        (1.0, 0.5, 2.0), temperature=3.0, gram_loss=ModalityGram("dim")
    )
    distiller.fit(x, y, batch_size=16, epochs=1, verbose=0)
    path = tmp_path / "distiller.keras"
    distiller.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, Distiller)
    config, restored_config = distiller.get_config(), restored.get_config()
    for key in ("task_weight", "terms"):
        assert restored_config[key] == config[key]
    assert (restored.kd_weight, restored.gram_weight, restored.temperature) == (
        distiller.kd_weight,
        distiller.gram_weight,
        distiller.temperature,
    )
    np.testing.assert_allclose(
        restored.predict(x, verbose=0), distiller.predict(x, verbose=0), atol=1e-6
    )
    logs = distiller.evaluate(x, y, return_dict=True, verbose=0)
    restored_logs = restored.evaluate(x, y, return_dict=True, verbose=0)
    assert restored_logs["gram_loss"] == pytest.approx(logs["gram_loss"], rel=1e-5)

    student_path = tmp_path / "student.keras"
    distiller.student.save(student_path)
    student = keras.saving.load_model(student_path)
    np.testing.assert_allclose(
        student.predict(x, verbose=0), distiller.predict(x, verbose=0), atol=1e-6
    )


# --- errors at construction, each naming the problem and the fix ---------------


def test_unknown_layer_name_suggests_close_names():
    with pytest.raises(
        ValueError, match=r"no layer named 's_aa'.*Did you mean \['s_a'"
    ):
        build_distiller(student_modalities={"a": "s_aa", "b": "s_b", "c": "s_c"})


def test_mismatched_modality_names():
    with pytest.raises(ValueError, match=r"Student modalities \['d'\] are not among"):
        build_distiller(student_modalities={"a": "s_a", "d": "s_b"})


def test_different_class_counts():
    with pytest.raises(
        ValueError, match="teacher outputs 3 classes but the student outputs 5"
    ):
        build_distiller(student=make_net("s", 4, n_classes=5))


@pytest.mark.parametrize("name", ["task_weight", "kd_weight", "gram_weight"])
@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "1.0"])
def test_bad_weights(name, bad):
    weights = {"task_weight": 1.0, "kd_weight": 1.0, "gram_weight": 1.0, name: bad}
    what = {"kd_weight": "weight of term 'kd'", "gram_weight": "weight of term 'gram'"}
    message = f"{what.get(name, name)} must be a finite number >= 0"
    with pytest.raises(ValueError, match=message):
        Distiller(
            make_net("t", 8),
            make_net("s", 4),
            modality_map("t"),
            modality_map("s"),
            **weights,
        )


@pytest.mark.parametrize("bad", [0, -2.0, float("nan")])
def test_bad_temperature(bad):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        build_distiller(temperature=bad)


def test_layer_names_on_subclassed_model():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x["a"])

    with pytest.raises(
        ValueError, match="no symbolic outputs.*functional API.*gram_weight=0"
    ):
        build_distiller(student=Subclassed())


def test_softmax_output_refused():
    with pytest.raises(
        ValueError, match="teacher's output layer 't_logits' applies a softmax"
    ):
        build_distiller(teacher=make_net("t", 8, output_activation="softmax"))


def test_gram_needs_modalities():
    needs = r"Gram term 'gram' needs .*teacher_modalities and student_modalities"
    with pytest.raises(ValueError, match=needs):
        Distiller(make_net("t", 8), make_net("s", 4))


def test_modality_widths_must_agree_within_a_network():
    inputs = {"a": keras.Input((4,), name="a"), "b": keras.Input((6,), name="b")}
    ea = keras.layers.Dense(3, name="s_a")(inputs["a"])
    eb = keras.layers.Dense(5, name="s_b")(inputs["b"])
    student = keras.Model(
        inputs, keras.layers.Dense(3)(keras.layers.Concatenate()([ea, eb]))
    )
    with pytest.raises(
        ValueError, match=r"(?s)the student's modality widths differ.*projection"
    ):
        build_distiller(student=student, student_modalities=modality_map("s", "ab"))


def test_stacked_spec_with_wrong_rank_and_bad_spec_type():
    with pytest.raises(ValueError, match=r"must output the stacked \(batch, M, d\)"):
        build_distiller(student_modalities="s_a")
    bad_type = "student_features of term 'gram'.*must be a layer name, a path"
    with pytest.raises(ValueError, match=bad_type):
        build_distiller(student_modalities=["s_a"])


def test_unknown_option_and_non_model():
    with pytest.raises(ValueError, match="Unrecognized keyword.*learning_rate"):
        build_distiller(learning_rate=0.1)
    with pytest.raises(TypeError, match="student must be a keras.Model"):
        Distiller(make_net("t", 8), "student.keras", gram_weight=0.0)


def test_missing_input_key_fails_at_first_batch():
    x, y = make_data()
    del x["b"]
    with pytest.raises(ValueError, match=r"teacher expects input\(s\) \['b'\]"):
        build_distiller(
            student=make_net("s", 4, modalities=("a", "c")),
            student_modalities=modality_map("s", "ac"),
        ).fit(x, y, verbose=0)


def test_compile_without_loss_fails_clearly():
    x, y = make_data()
    distiller = build_distiller(compile_args={})
    with pytest.raises(
        ValueError, match=r"task_weight > 0 needs a task loss: compile\(loss="
    ):
        distiller.fit(x, y, verbose=0)


@pytest.mark.slow  # torch.compile and XLA compile the step
def test_jit_compile_true_gives_the_eager_losses():
    # jit_compile=True is XLA on TensorFlow, jax.jit on JAX and torch.compile
    # on PyTorch: evaluate and two SGD steps must give the eager values.
    x, y = make_data(n=32)
    teacher, student = make_net("t", 8), make_net("s", 4)
    initial = student.get_weights()
    logs = []
    for eager in (True, False):
        student.set_weights(initial)
        distiller = Distiller(teacher, student, modality_map("t"), modality_map("s"))
        distiller.compile(
            keras.optimizers.SGD(0.1),
            sparse_ce(),
            run_eagerly=eager,
            jit_compile=not eager,
        )
        evaluated = distiller.evaluate(x, y, batch_size=32, return_dict=True, verbose=0)
        history = distiller.fit(
            x, y, batch_size=16, epochs=1, shuffle=False, verbose=0
        ).history
        logs.append((evaluated, {key: values[-1] for key, values in history.items()}))
    for key in ("loss", "task_loss", "kd_loss", "gram_loss"):
        for eager_log, compiled_log in zip(logs[0], logs[1], strict=True):
            assert compiled_log[key] == pytest.approx(eager_log[key], abs=1e-5), key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss": "ce"}, "name it: 'sparse_categorical_crossentropy'"),
        ({"loss": ["mse", "mae"]}, "compile takes one task loss"),
        ({"loss": "mse", "loss_weights": [2.0]}, "task_weight=... instead"),
    ],
)
def test_compile_takes_one_named_task_loss(kwargs, match):
    distiller = Distiller(make_net("t", 8), make_net("s", 4), gram_weight=0)
    with pytest.raises(ValueError, match=match):
        distiller.compile("adam", **kwargs)


def test_a_loss_given_by_name_has_its_labels_checked_as_classes():
    # compile(loss="sparse_categorical_crossentropy") wraps Keras' function as
    # compile does, and the Distiller still knows its labels are classes.
    x, y = make_data(n=16)
    y[0] = 7  # not one of the 3 classes
    distiller = Distiller(
        make_net("t", 8), make_net("s", 4), gram_weight=0, on_bad_sample="skip"
    )
    distiller.compile("adam", "sparse_categorical_crossentropy")
    logs = distiller.evaluate(x, y, return_dict=True, verbose=0)
    assert logs["skipped_samples"] == 1 and np.isfinite(logs["task_loss"])


class _CountedLoss(keras.losses.SparseCategoricalCrossentropy):
    """Counts the per-sample computations (`call`) of the task loss."""

    calls = 0

    def call(self, y_true, y_pred):
        type(self).calls += 1
        return super().call(y_true, y_pred)


@pytest.mark.parametrize(
    "from_logits", [pytest.param(True, marks=pytest.mark.slow), False]
)
def test_one_step_computes_the_per_sample_task_loss_once_on_logits(from_logits):
    # On logits the value that checks each row is also the loss; a loss of
    # probabilities is computed again on the final rows (a row whose loss is
    # not finite then reaches the gradient only as a constant).
    x, y = make_data(n=16)
    distiller = build_distiller(
        compile_args={"loss": _CountedLoss(from_logits=from_logits)}
    )
    distiller.compile("adam", _CountedLoss(from_logits=from_logits), run_eagerly=True)
    _CountedLoss.calls = 0
    distiller.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert _CountedLoss.calls == (1 if from_logits else 2)


class _AllCalls(keras.layers.Layer):
    """Identity that counts every call, symbolic ones included."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def call(self, x):
        self.calls += 1
        return x


@pytest.mark.parametrize("metrics", [None, ["accuracy"]])
def test_the_student_runs_once_per_step_and_never_symbolically(metrics):
    inputs = {m: keras.Input((WIDTHS[m],), name=m) for m in "abc"}
    counter = _AllCalls()
    embeds = [
        keras.layers.Dense(4, name=f"s_{m}")(counter(h) if m == "a" else h)
        for m, h in inputs.items()
    ]
    logits = keras.layers.Dense(3)(keras.layers.Concatenate()(embeds))
    student = keras.Model(inputs, logits)
    distiller = Distiller(
        make_net("t", 8),
        student,
        terms=[
            KDTerm(),
            GramTerm(modality_map("t"), modality_map("s")),
            FitNetTerm("t_a", "s_a", name="hint"),
        ],
    )
    distiller.compile(
        optimizer="adam", loss=sparse_ce(), metrics=metrics, run_eagerly=True
    )
    x, y = make_data(40)
    for fit, steps in enumerate((2, 5, 4)):
        counter.calls = 0
        distiller.fit(x, y, batch_size=40 // steps, verbose=0)
        # Keras builds compiled metrics once, with one symbolic pass (on JAX
        # and PyTorch), at the first fit.
        traced = keras.backend.backend() != "tensorflow"
        once = 1 if metrics and fit == 0 and traced else 0
        assert counter.calls == steps + once
        counter.calls = 0
        distiller.evaluate(x, y, batch_size=40 // steps, verbose=0)
        assert counter.calls == steps


@pytest.mark.parametrize("metrics", [None, ["accuracy"]])
def test_the_guard_decides_the_rows_once_per_step(metrics):
    """compute_loss decides the good rows and updates every metric; nothing
    checks the batch again afterwards (on JAX too, where Keras calls
    compute_metrics outside the gradient's trace)."""
    from keras_gramkd.guard import StepGuard

    calls = []

    class CountingGuard(StepGuard):
        def data_rows(self, *args, **kwargs):
            calls.append(1)
            return super().data_rows(*args, **kwargs)

    distiller = build_distiller(
        on_bad_sample="skip",
        compile_args={"loss": sparse_ce(), "metrics": metrics, "run_eagerly": True},
    )
    distiller._guard = CountingGuard(
        distiller._teacher, distiller._student, checks_mask=False
    )
    x, y = make_data(12)
    y[3] = 7  # not a class: left out of the loss and the metrics
    history = distiller.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert len(calls) == 3
    assert history.history["skipped_samples"] == [1.0]


def test_a_subclassed_unbuilt_teacher_trains_kd_only():
    """A subclassed teacher, not built before fit, with KD only: it builds in
    Keras' symbolic build, so on JAX its variables have values in the step."""

    class Teacher(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(8, activation="relu")
            self.out = keras.layers.Dense(3)

        def call(self, inputs):
            joined = keras.ops.concatenate([inputs[m] for m in "abc"], axis=-1)
            return self.out(self.hidden(joined))

    teacher = Teacher()
    distiller = Distiller(teacher=teacher, student=make_net("s", 4), gram_weight=0.0)
    distiller.compile(optimizer="adam", loss=sparse_ce())
    x, y = make_data(16)
    history = distiller.fit(x, y, batch_size=8, epochs=2, verbose=0).history
    assert np.all(np.isfinite(history["kd_loss"]))
    logits = to_np(teacher(x))
    expected = np_logit_kd(logits, to_np(distiller.student(x)), 4.0).mean()
    assert distiller.evaluate(x, y, verbose=0, return_dict=True)[
        "kd_loss"
    ] == pytest.approx(expected, rel=1e-4)
