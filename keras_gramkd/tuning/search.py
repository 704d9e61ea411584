"""The search around a `DistillerHyperModel`: tuners, objectives, trials, checkpoints.

Nothing here imports keras_tuner at import time: `import_keras_tuner` does, with
a message naming the extra when it is missing.
"""

import inspect

import keras

from keras_gramkd.distiller import Distiller

TUNE_EXTRA_HINT = (
    'KerasTuner is not installed; install it with: pip install "keras-gramkd[tune]"'
)
TUNERS = ("random", "bayesian", "hyperband")
FORBIDDEN_OBJECTIVES = ("loss", "val_loss")


def import_keras_tuner():
    """`keras_tuner`, or an ImportError that says how to install it."""
    try:
        import keras_tuner
    except ImportError as error:
        raise ImportError(TUNE_EXTRA_HINT) from error
    if keras.backend.backend() == "tensorflow":
        # KerasTuner 1.4 imports tensorboard in every trial on this backend, and
        # TensorFlow >= 2.20 no longer installs it.
        try:
            import tensorboard  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "KerasTuner needs tensorboard on the TensorFlow backend; install it "
                'with: pip install tensorboard (or pip install "keras-gramkd[tune]")'
            ) from error
    return keras_tuner


def objective_name(objective):
    """The metric name of a KerasTuner objective (a string or `kt.Objective`)."""
    return objective if isinstance(objective, str) else getattr(objective, "name", None)


def check_objective(objective):
    """Returns `objective`; raises ValueError for a loss, which cannot rank trials."""
    if objective_name(objective) in FORBIDDEN_OBJECTIVES:
        raise ValueError(
            f"objective={objective_name(objective)!r} cannot rank Distiller trials: "
            "the loss is task_weight·task + kd_weight·kd + gram_weight·gram, so its "
            "scale is set by the weights being tuned. Use a student metric such as "
            "'val_accuracy' (or 'val_task_loss' with direction 'min')."
        )
    return objective


@keras.saving.register_keras_serializable(package="keras_gramkd")
class StudentCheckpointDistiller(Distiller):
    """A `Distiller` whose `save_weights` / `load_weights` cover the student only.

    KerasTuner checkpoints each trial with ``model.save_weights`` and restores it
    with ``model.load_weights``; with this class those files hold the student's
    weights and nothing of the (shared, frozen) teacher. A file it writes is the
    same as ``distiller.student.save_weights(path)``. Everything else is
    `Distiller`; save the whole model with ``model.save(...)``.

    Example:

    >>> import keras, numpy as np, os, tempfile
    >>> def net(prefix, width):
    ...     a = keras.Input((4,), name="a")
    ...     logits = keras.layers.Dense(3)(keras.layers.Dense(width)(a))
    ...     return keras.Model({"a": a}, logits)
    >>> distiller = StudentCheckpointDistiller(net("t", 16), net("s", 4), gram_weight=0)
    >>> path = os.path.join(tempfile.mkdtemp(), "student.weights.h5")
    >>> distiller.save_weights(path)
    >>> student = net("s2", 4)
    >>> student.load_weights(path)
    >>> bool(np.allclose(student.weights[0], distiller.student.weights[0]))
    True
    """

    def save_weights(self, filepath, *args, **kwargs):
        return self.student.save_weights(filepath, *args, **kwargs)

    def load_weights(self, filepath, *args, **kwargs):
        return self.student.load_weights(filepath, *args, **kwargs)


def make_tuner(hypermodel, tuner="random", max_trials=10, max_epochs=None, **kwargs):
    """A KerasTuner tuner ranking trials by ``hypermodel.objective``.

    Args:
        hypermodel: a `DistillerHyperModel`.
        tuner: "random", "bayesian" or "hyperband".
        max_trials: trials for random and Bayesian search (Hyperband derives its
            trial count from `max_epochs` and ``factor``). Bayesian search starts
            with ``num_initial_points`` random trials (default a third of
            `max_trials`, at least 2); it needs ``keras-tuner[bayesian]``.
        max_epochs: Hyperband's largest per-trial epoch budget (required for it).
        **kwargs: tuner arguments: directory, project_name, overwrite, seed, ...

    Example:

    >>> tuner = make_tuner(hypermodel, "random", max_trials=3,
    ...     directory="tuning", overwrite=False)  # doctest: +SKIP
    """
    kt = import_keras_tuner()
    if tuner not in TUNERS:
        raise ValueError(f"Unknown tuner {tuner!r}; choose one of {TUNERS}.")
    objective = hypermodel.objective
    if tuner == "hyperband":
        if max_epochs is None:
            raise ValueError("Hyperband needs max_epochs (the largest epoch budget).")
        return kt.Hyperband(
            hypermodel, objective=objective, max_epochs=max_epochs, **kwargs
        )
    if tuner == "bayesian":
        # KerasTuner's default (3 random points per hyperparameter) would make a
        # small search entirely random.
        kwargs.setdefault("num_initial_points", max(2, max_trials // 3))
        oracle_class = kt.oracles.BayesianOptimizationOracle
    else:
        oracle_class = kt.oracles.RandomSearchOracle
    # The oracle's arguments go to the oracle, the rest to the tuner, as
    # kt.RandomSearch and kt.BayesianOptimization split them.
    names = inspect.signature(oracle_class).parameters
    oracle_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    oracle = _gram_balanced(oracle_class)(
        objective=objective, max_trials=max_trials, **oracle_kwargs
    )
    return kt.Tuner(oracle=oracle, hypermodel=hypermodel, **kwargs)


def _gram_balanced(oracle_class):
    """`oracle_class`, with trials that alternate the Gram term on and off.

    When the search space searches `use_gram`, each new trial takes the value
    tried less often so far (on first), so any two trials compare the Gram
    term on and off: random draws alone gave `gram=0` to both trials of a
    2-trial search. A trial switched on draws its `gram_weight` at random.
    Everything else is the oracle's own choice.
    """

    class GramBalancedOracle(oracle_class):
        def populate_space(self, trial_id):
            result = super().populate_space(trial_id)
            values = result.get("values")
            space = {hp.name: hp for hp in self.hyperparameters.space}
            searched = type(space.get("use_gram")).__name__ == "Boolean"
            if values is None or not searched:
                return result
            tried = [
                t.hyperparameters.values.get("use_gram") for t in self.trials.values()
            ]
            want = tried.count(True) <= tried.count(False)
            if values["use_gram"] != want:
                values["use_gram"] = want
                if want:
                    seed = self.seed + len(self.trials)
                    values["gram_weight"] = space["gram_weight"].random_sample(seed)
                else:
                    values.pop("gram_weight", None)
            return result

    GramBalancedOracle.__name__ = f"GramBalanced{oracle_class.__name__}"
    return GramBalancedOracle


def completed_trials(tuner):
    """The tuner's completed trials, best first (by the tuner's objective)."""
    trials = tuner.oracle.get_best_trials(num_trials=len(tuner.oracle.trials))
    return [t for t in trials if t.score is not None]


def best_with_and_without_gram(tuner, hypermodel):
    """(best trial with gram_weight > 0, best with gram_weight == 0); None if none."""
    with_gram = without_gram = None
    for trial in completed_trials(tuner):
        gram = hypermodel.distiller_config(trial.hyperparameters)["gram_weight"]
        if gram > 0 and with_gram is None:
            with_gram = trial
        if gram == 0 and without_gram is None:
            without_gram = trial
    return with_gram, without_gram
