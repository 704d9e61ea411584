#!/usr/bin/env bash
# The GPU run of the benchmarks: step time on the three backends and the
# scaling sweep at GPU sizes, each writing a JSON file.
#
#   bash benchmarks/gpu.sh [--dry-run] [--out DIR] [--backends tensorflow,jax,torch]
#
# On a machine with a CUDA GPU and a network it makes a virtual environment
# (.venv-gpu, reused when present), installs the CUDA builds of JAX, TensorFlow
# and PyTorch and this package, and runs, one backend at a time (each process
# has the GPU to itself; JAX and TensorFlow allocate GPU memory as needed):
#
#   step_time.py  demo and synthetic cases, jit_compile false and true; and
#                 the synthetic case at batch 4096 (step_time_b4096-*.json)
#   scaling.py    --sizes gpu: M 2-32, d 128-2048, batch 256-4096
#
# Every stage runs under `timeout` so that the whole run (installs excepted)
# stays within 10 minutes (BUDGET_S); a stage that times out is reported and
# the next one runs. The JSON files go to DIR (default runs/benchmarks/gpu);
# `python benchmarks/report.py DIR` prints the README's tables from them.
#
# --dry-run runs the same pipeline on the CPU with the Python already in use
# ($PYTHON, default python), no installs, at tiny sizes: a test of this script
# (tests/test_benchmarks.py) that takes well under a minute per backend.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
DRY_RUN=0
OUT=""
BACKENDS="tensorflow,jax,torch"
BUDGET_S="${BUDGET_S:-600}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT="$2"; shift ;;
        --backends) BACKENDS="$2"; shift ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
OUT="${OUT:-$ROOT/runs/benchmarks/gpu}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

if [ "$DRY_RUN" = 1 ]; then
    PY="${PYTHON:-python}"
    export CUDA_VISIBLE_DEVICES=""  # the CPU, even where a GPU is present
    STEP_ARGS=(--quick --cases demo --variants a,d,e --jit-compile false
               --rounds 1 --repeats 1 --warmup 1 --steps 2)
    SCALING_ARGS=(--quick --axes middle --rounds 1 --steps 2)
else
    if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu.sh: no CUDA GPU here (nvidia-smi); use --dry-run on a CPU." >&2
        exit 1
    fi
    nvidia-smi -L
    VENV="${VENV:-$ROOT/.venv-gpu}"
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    PY="$VENV/bin/python"
    if ! "$PY" -c "import jax, tensorflow, torch, keras_gramkd" 2>/dev/null; then
        echo "== installing (not counted in the 10 minutes)"
        "$PY" -m pip install -q --upgrade pip
        "$PY" -m pip install -q "jax[cuda12]" "tensorflow[and-cuda]" torch
        "$PY" -m pip install -q -e "$ROOT[all]"
    fi
    "$PY" - <<'EOF'
import jax, tensorflow as tf, torch
print("jax", jax.__version__, jax.devices())
print("tensorflow", tf.__version__, tf.config.list_physical_devices("GPU"))
print("torch", torch.__version__, torch.cuda.is_available())
EOF
    STEP_ARGS=(--cases demo,synthetic --variants a,c,d,e,kd_only
               --jit-compile false,true --rounds 3 --repeats 2 --warmup 1)
    SCALING_ARGS=(--sizes gpu --axes M,d,batch --rounds 3 --steps 10)
fi

# One process per stage: each has the device to itself.
export XLA_PYTHON_CLIENT_PREALLOCATE=false TF_FORCE_GPU_ALLOW_GROWTH=true
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
IFS=, read -r -a BACKEND_LIST <<<"$BACKENDS"
STAGES=$(((3 - DRY_RUN) * ${#BACKEND_LIST[@]}))
START=$(date +%s)
FAILED=0
run_stage() {  # name, then the command; each stage gets its share of what is left
    local name="$1"; shift
    local left=$((BUDGET_S - ($(date +%s) - START)))
    local share=$((left / STAGES))
    STAGES=$((STAGES - 1))
    if [ "$share" -lt 10 ]; then share=10; fi
    echo "== $name (at most ${share} s)"
    local status=0
    (cd "$HERE" && timeout "$share" "$@") >"$OUT/$name.log" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        echo "   $name failed or timed out (exit $status): tail of $OUT/$name.log" >&2
        tail -n 20 "$OUT/$name.log" >&2
        FAILED=1
    fi
}
for backend in "${BACKEND_LIST[@]}"; do
    run_stage "step_time-$backend" "$PY" step_time.py --backend "$backend" \
        "${STEP_ARGS[@]}" --json "$OUT/step_time-$backend.json"
    if [ "$DRY_RUN" = 0 ]; then  # the synthetic case at the largest GPU batch
        run_stage "step_time-$backend-b4096" "$PY" step_time.py --backend \
            "$backend" --cases synthetic --variants a,d,e,kd_only --jit-compile true \
            --rounds 3 --repeats 1 --batch-size 4096 \
            --json "$OUT/step_time_b4096-$backend.json"
    fi
    run_stage "scaling-$backend" "$PY" scaling.py --backend "$backend" \
        "${SCALING_ARGS[@]}" --json "$OUT/scaling-$backend.json"
done
echo "== done in $(($(date +%s) - START)) s; JSON files in $OUT"
ls "$OUT"/*.json
exit "$FAILED"
