#!/usr/bin/env bash
# Runs the whole test suite, docstring examples included, once per Keras backend.
# Usage: bash tools/test_all_backends.sh [pytest args]   (BACKENDS="jax" to pick)
set -euo pipefail
cd "$(dirname "$0")/.."
for backend in ${BACKENDS:-tensorflow jax torch}; do
  echo "=== KERAS_BACKEND=$backend"
  KERAS_BACKEND=$backend python -m pytest -q -p no:cacheprovider \
    --doctest-modules keras_gramkd gramkd tests "$@"
done
