"""KerasTuner search over the Distiller's loss weights, temperature and learning rate.

`DistillerHyperModel` is a `keras_tuner.HyperModel`: give it a trained teacher and a
function that builds a student, and any KerasTuner tuner (`RandomSearch`,
`BayesianOptimization`, `Hyperband`) searches

    task_weight     fixed at 1
    kd_weight       uniform in [0, 4]
    use_gram        True / False: False sets gram_weight = 0, so the search tells
                    whether the Gram term pays at all on your data
    gram_weight     log-uniform in [1e-2, 1e2] (only when use_gram is True)
    temperature     one of 1, 2, 4, 8
    learning_rate   log-uniform in [1e-4, 1e-2] (Adam)

plus whatever hyperparameters `build_student(hp)` declares. `search_space` fixes a
value or changes a range.

**The objective is a student metric** (``val_accuracy`` by default), never
``val_loss``: the Distiller's loss is ``task_weight·task + kd_weight·kd +
gram_weight·gram``, so its scale is set by the very weights being tuned (a trial with
gram_weight=0.01 has a smaller loss than one with 100 whatever the student learnt),
and comparing it across trials ranks weights, not students.

**The teacher is shared**: built and trained once by you, used frozen by every trial,
never retrained, copied or written to disk by the tuner. KerasTuner checkpoints the
model at each best epoch with ``model.save_weights``; the models this hypermodel builds
are `StudentCheckpointDistiller`s, whose ``save_weights``/``load_weights`` cover the
student only, so each ``trial_*/checkpoint.weights.h5`` is a student checkpoint (load
it with ``student.load_weights``). ``tuner.get_best_models(1)[0]`` rebuilds the
Distiller around the shared teacher and loads that checkpoint: its ``.student`` is the
best trained student.

`keras_tuner` is imported on first use of `DistillerHyperModel` (install it with
``pip install "keras-gramkd[tune]"``), so importing this package is cheap.

**Which term pays**: `search_terms` searches the term families (KD alone, and KD
plus the modality Gram, per-modality SP, SP, RKD, PKT or FitNet) with the same
trial budget each, then confirms each family's best settings against the best KD
on fresh paired seeds (`TermSearchResult`).

The modules: `space` (the short form's search space), `families` (the term
families' spaces), `hypermodel` (`DistillerHyperModel`, `TermFamilyHyperModel`:
the one module that imports keras_tuner), `search` (tuners, trials, the
student-only checkpoints), `term_search` (`search_terms`), `term_result`
(`TermSearchResult`) and `cli` (`gramkd tune`).
"""

from keras_gramkd.tuning.families import FAMILIES, PUBLISHED_SCALES, FamilySpace
from keras_gramkd.tuning.search import (
    FORBIDDEN_OBJECTIVES,
    TUNE_EXTRA_HINT,
    TUNERS,
    StudentCheckpointDistiller,
    best_with_and_without_gram,
    completed_trials,
    make_tuner,
)
from keras_gramkd.tuning.space import DEFAULT_SEARCH_SPACE, resolve_search_space
from keras_gramkd.tuning.term_result import TermSearchResult
from keras_gramkd.tuning.term_search import search_terms

__all__ = [
    "DEFAULT_SEARCH_SPACE",
    "FAMILIES",
    "FORBIDDEN_OBJECTIVES",
    "TUNERS",
    "TUNE_EXTRA_HINT",
    "DistillerHyperModel",
    "FamilySpace",
    "PUBLISHED_SCALES",
    "StudentCheckpointDistiller",
    "TermFamilyHyperModel",
    "TermSearchResult",
    "best_with_and_without_gram",
    "completed_trials",
    "make_tuner",
    "resolve_search_space",
    "run_tune",
    "search_terms",
]


def __getattr__(name):
    # DistillerHyperModel subclasses keras_tuner.HyperModel: its module imports
    # keras_tuner, so it loads on first use (ImportError naming the extra). The
    # command line loads the demo's data and models: also on first use, so that
    # `import keras_gramkd` registers StudentCheckpointDistiller cheaply.
    if name in ("DistillerHyperModel", "TermFamilyHyperModel"):
        from keras_gramkd.tuning import hypermodel

        return getattr(hypermodel, name)
    if name == "run_tune":
        from keras_gramkd.tuning import cli

        return getattr(cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
