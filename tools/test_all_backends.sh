#!/usr/bin/env bash
# Runs the whole test suite, docstring examples included, once per Keras backend.
# Usage: bash tools/test_all_backends.sh [pytest args]   (BACKENDS="jax" to pick)
set -euo pipefail
cd "$(dirname "$0")/.."
# On JAX, XLA's compiled programs go to an on-disk cache for the run: the tests
# and the processes they start compile many identical steps (JAX's own
# jax_compilation_cache_dir; the JAX fast tier took 277 s with it, 315 s without).
jax_cache=$(mktemp -d)
trap 'rm -rf "$jax_cache"' EXIT
for backend in ${BACKENDS:-tensorflow jax torch}; do
  echo "=== KERAS_BACKEND=$backend"
  KERAS_BACKEND=$backend \
    JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$jax_cache}" \
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
    python -m pytest -q -p no:cacheprovider \
    --doctest-modules keras_gramkd gramkd tests "$@"
done
