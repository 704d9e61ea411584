"""A term object belongs to one Distiller: a second one is refused with the
fix, a copy from the config is a term of its own, and a Distiller whose
construction failed takes nothing."""

import keras
import numpy as np
import pytest
from helpers import make_data, make_net, modality_map, sparse_ce, to_np

from keras_gramkd import Distiller, GramTerm, KDTerm
from keras_gramkd.relational import FitNetTerm

TAKEN = (
    r"Term\(s\) \['kd', 'hint'\] already belong to another Distiller\. A term "
    r"holds its weight variable \(a FitNetTerm also its regressor\), so two "
    r"Distillers would share them: setting or training one would change the "
    r"other\. Give each Distiller its own term objects: build them again, or "
    r"copy one with type\(term\)\.from_config\(term\.get_config\(\)\)\."
)


def terms():
    return [KDTerm(weight=0.5), FitNetTerm("t_a", "s_a", weight=2.0, name="hint")]


def distiller(terms, student=None):
    keras.utils.set_random_seed(0)
    d = Distiller(make_net("t", 8), student or make_net("s", 4), terms=terms)
    d.compile(optimizer=keras.optimizers.SGD(0.1), loss=sparse_ce())
    return d


def test_a_term_given_to_a_second_distiller_is_refused():
    shared = terms()
    first = distiller(shared)
    with pytest.raises(ValueError, match=TAKEN):
        distiller(shared)
    with pytest.raises(ValueError, match=r"Term\(s\) \['hint'\] already belong"):
        distiller([KDTerm(), shared[1]])  # one taken term among fresh ones
    assert first.terms == shared  # the first Distiller keeps them
    x, y = make_data(16)
    logs = first.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)
    weighted = logs["task_loss"] + 0.5 * logs["kd_loss"] + 2.0 * logs["hint_loss"]
    assert logs["loss"] == pytest.approx(weighted, rel=1e-5)


def test_a_copy_from_the_config_is_a_term_of_its_own():
    shared = terms()
    first = distiller(shared)
    copies = [type(term).from_config(term.get_config()) for term in shared]
    second = distiller(copies)
    second.terms[0].weight = 3.0
    assert (first.terms[0].weight, second.terms[0].weight) == (0.5, 3.0)
    x, y = make_data(16)
    kernels = [to_np(d.terms[1].regressor.kernel) for d in (first, second)]
    np.testing.assert_array_equal(*kernels)  # same seed, same start
    second.fit(x, y, batch_size=16, epochs=1, verbose=0)
    np.testing.assert_array_equal(to_np(first.terms[1].regressor.kernel), kernels[0])
    assert not np.allclose(to_np(second.terms[1].regressor.kernel), kernels[0])
    again = Distiller.from_config(first.get_config())  # the config's own terms
    assert [t.weight for t in again.terms] == [0.5, 2.0]


def test_a_distiller_that_failed_to_build_takes_no_term():
    fresh = [KDTerm(), GramTerm(modality_map("t"), modality_map("x"))]
    with pytest.raises(ValueError, match="The student has no layer named 'x_a'"):
        distiller(fresh)
    fresh[1] = GramTerm(modality_map("t"), modality_map("s"))
    built = distiller(fresh)
    assert [term.in_distiller for term in built.terms] == [True, True]
