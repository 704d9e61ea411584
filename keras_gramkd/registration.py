"""Registers the package's saveable classes with Keras once keras is imported.

Keras finds a custom class in a saved file (a `Distiller`, its terms, the
`ModalityDropout` layer) only if the module that registers it was imported.
`import keras_gramkd` imports no keras, so that the `gramkd` command can pick
the backend first; instead it asks to be told when keras is imported (a
post-import hook on the ``keras`` module: a `sys.meta_path` finder that wraps
keras' own loader, the standard-library mechanism for this) and imports
`REGISTERING_MODULES` then. If keras is already imported, it imports them at
once. Either way, after ``import keras_gramkd``,
``keras.saving.load_model("distiller.keras")`` works.
"""

import importlib
import importlib.abc
import importlib.util
import sys

# The Distiller's module imports every module that registers a class but the
# tuner's StudentCheckpointDistiller (whose module imports no keras_tuner).
REGISTERING_MODULES = ("keras_gramkd.distiller", "keras_gramkd.tuning.search")


def register_with_keras():
    """Imports the modules whose classes Keras must find when loading files."""
    for module in REGISTERING_MODULES:
        importlib.import_module(module)


class _KerasImportHook(importlib.abc.MetaPathFinder):
    """Finds ``keras`` as usual, and registers our classes once it has loaded."""

    def find_spec(self, name, path=None, target=None):
        if name != "keras":
            return None
        sys.meta_path.remove(self)  # one shot; also lets find_spec below see keras
        spec = importlib.util.find_spec("keras")
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def load_then_register(module):
            load(module)
            register_with_keras()

        spec.loader.exec_module = load_then_register
        return spec


def install():
    """Registers now if keras is imported, else when it is."""
    if "keras" in sys.modules:
        register_with_keras()
    elif not any(isinstance(f, _KerasImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _KerasImportHook())
