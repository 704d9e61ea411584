"""On JAX, a model's variables keep their values when `fit`, `evaluate` or
`predict` fails.

Keras' JAX trainer detaches every variable's value at the start of an epoch
(it passes the values through its stateless step instead) and attaches the
new values when the epoch ends. An exception in between, say in the first
step while it is traced, leaves them detached: the model, and every model
that shares its layers (a Distiller's teacher), then fail with
`'NoneType' object is not callable`. `VariableKeeper` puts the values back
before the exception leaves: those from before the loop's first step if it
never ran, else the trainer's latest state (its public `jax_state_sync`).
Other backends keep their values and need nothing.

Example:

>>> import keras
>>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
>>> keeper = VariableKeeper(model)
>>> keeper.run(
...     lambda extra: model.predict(keras.ops.ones((1, 2)), callbacks=extra, verbose=0)
... ).shape
(1, 1)
"""

import keras


class VariableKeeper(keras.callbacks.Callback):
    """Restores `model`'s variables (on JAX) when the call given to `run`
    raises; `run` hands that call the callbacks to add (itself on JAX, none
    on the other backends).

    It holds references to the values from the start of each loop (an epoch,
    an evaluation, a prediction) until that loop's first step has finished,
    when the trainer's own state takes over; nothing is copied.
    """

    async_safe = True

    def __init__(self, model):
        super().__init__()
        self._keras_model = model
        self._saved = []

    def _variables(self):
        model = self._keras_model
        optimizer = getattr(model, "optimizer", None)
        optimizer_variables = optimizer.variables if optimizer is not None else []
        return [*model.variables, *model.metrics_variables, *optimizer_variables]

    def _save(self, *args, **kwargs):
        self._saved = [(v, v.value) for v in self._variables()]

    def _release(self, *args, **kwargs):
        self._saved = []

    on_epoch_begin = on_test_begin = on_predict_begin = _save
    on_train_batch_end = on_test_batch_end = on_predict_batch_end = _release

    def run(self, call):
        """`call(extra_callbacks)`, restoring the variables if it raises."""
        if keras.backend.backend() != "jax":
            return call([])
        try:
            return call([self])
        except BaseException:
            self._restore()
            raise
        finally:
            self._saved = []

    def _restore(self):
        # Once a step has run, JAX has reused the saved buffers (Keras donates
        # the state to its step) and the trainer's state is the newer one.
        if self._saved and not any(value.is_deleted() for _, value in self._saved):
            for variable, value in self._saved:
                variable.assign(value)
        else:
            self._keras_model.jax_state_sync()
