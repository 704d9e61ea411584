"""Mistakes in a user's term, a term list, a feature address or a saved file
get an error that names the problem and the fix, on every backend."""

import keras
import numpy as np
import pytest
from helpers import make_data, make_net, modality_map, sparse_ce, to_np
from keras import ops

from keras_gramkd import DistillationTerm, Distiller, GramTerm, KDTerm
from keras_gramkd.export import export_student


class IntegerLoss(DistillationTerm):
    def loss(self, targets, student, sample_weight=None, mask=None):
        return ops.cast(ops.sum(student.logits), "int32")


class PerSampleLoss(DistillationTerm):
    def loss(self, targets, student, sample_weight=None, mask=None):
        return ops.mean(student.logits, axis=-1)


class LayerMadeInLoss(DistillationTerm):
    def loss(self, targets, student, sample_weight=None, mask=None):
        if not hasattr(self, "projection"):
            self.projection = keras.layers.Dense(3)
        fitted = self.projection(student.logits)
        return ops.mean(ops.square(fitted - targets["logits"]))


@pytest.mark.parametrize(
    "term, error, message",
    [
        (IntegerLoss, TypeError, r"Term 'mine' returned a loss of dtype int32.*"),
        (
            PerSampleLoss,
            ValueError,
            r"Term 'mine' returned a loss of shape \(8,\); a term's loss is a "
            r"scalar\. Reduce per-sample values with self\.reduce",
        ),
        (
            LayerMadeInLoss,
            ValueError,
            r"Term 'mine' created variables inside its loss \(\['dense.*/kernel', "
            r"'dense.*/bias'\]\).*check_features",
        ),
    ],
)
def test_a_users_term_mistake_is_named_before_any_weight_changes(term, error, message):
    x, y = make_data(16)
    teacher, student = make_net("t", 8), make_net("s", 4)
    before = [to_np(w) for w in student.weights]
    distiller = Distiller(teacher, student, terms=[KDTerm(), term(name="mine")])
    distiller.compile(optimizer="adam", loss=sparse_ce())
    with pytest.raises(error, match=message):
        distiller.fit(x, y, batch_size=8, verbose=0)
    for old, new in zip(before, student.weights, strict=True):
        np.testing.assert_array_equal(to_np(new), old)


def test_one_term_instead_of_a_list():
    with pytest.raises(TypeError, match=r"single term KDTerm\. .*terms=\[KDTerm"):
        Distiller(make_net("t", 8), make_net("s", 4), terms=KDTerm())
    with pytest.raises(TypeError, match=r"terms must be a list .*got str"):
        Distiller(make_net("t", 8), make_net("s", 4), terms="kd")


def test_an_input_layer_is_not_a_feature():
    with pytest.raises(ValueError, match=r"'a' is an input of the teacher, not a"):
        Distiller(
            make_net("t", 8),
            make_net("s", 4),
            terms=[GramTerm({**modality_map("t"), "a": "a"}, modality_map("s"))],
        )


def test_a_corrupt_keras_file_is_named_as_corrupt(tmp_path):
    path = tmp_path / "student.keras"
    path.write_bytes(b"half a file")
    with pytest.raises(ValueError, match=r"student\.keras is not a readable \.keras"):
        export_student(path, tmp_path / "out")


@pytest.mark.parametrize("name", ["kd_loss", "task_loss", "skipped_samples"])
def test_a_compiled_metric_may_not_take_a_distiller_metrics_name(name):
    distiller = Distiller(
        make_net("t", 8), make_net("s", 4), modality_map("t"), modality_map("s")
    )
    metric = keras.metrics.SparseCategoricalAccuracy(name=name)
    with pytest.raises(ValueError, match=rf"compiled metric is named '{name}'.*'my_"):
        distiller.compile(optimizer="adam", loss=sparse_ce(), metrics=[metric])
    distiller.compile(
        optimizer="adam",
        loss=sparse_ce(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name=f"my_{name}")],
    )
    x, y = make_data(16)
    logs = distiller.evaluate(x, y, return_dict=True, verbose=0)
    assert {name, f"my_{name}"} <= set(logs)
