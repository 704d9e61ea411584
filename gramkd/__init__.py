"""The `gramkd` command line of keras_gramkd (`gramkd ...` or `python -m gramkd ...`).

A launcher apart from the library: it parses the arguments and sets the Keras
backend (``--backend``) before anything imports keras, so ``gramkd --help``
answers at once. Only the chosen subcommand imports `keras_gramkd`.
"""
