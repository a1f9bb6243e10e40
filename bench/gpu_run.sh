#!/usr/bin/env bash
# One GPU benchmark call for issue 16 (H100/H200, jax with CUDA preinstalled).
#
#   bash bench/gpu_run.sh                 # on the GPU machine, from the repository root
#   GPU_RUN_TINY=1 bash bench/gpu_run.sh  # CPU smoke run of the same steps, tiny sizes
#
# Needs bench/_probe/encoder_anchor.py (a git-ignored copy of the shared encoder skeleton
# probe: cp /work/shared/bench/encoder_anchor.py bench/_probe/; carry bench/_probe to the
# device). WHEELS=DIR installs the package's pure-Python dependencies from wheels there
# first (no index). Writes everything to $OUT (default /tmp/gpu_run): nvidia-smi.txt,
# probe.log + anchor.json (skeleton images/s and MFU against the in-run matmul rate),
# bench_*.log + bench_*.json (s4eca_jax.bench: rrsisd, bf16, batch 32, random encoders,
# synthetic batches; images/s, MFU, peak memory). Targets: train step >= 405 images/s
# with peak <= 21 GiB; skeleton >= 55% of the matmul rate. Each step has a time limit, so
# one slow step cannot eat the device budget (15 min in all).
# On an H200 (2026-11-27) the full rrsisd step was still compiling after 200-262 s, three
# times: compiled steps go to a persistent cache in $OUT/jax_cache (reused by a rerun on
# the same warm machine), and XLA_GPU_AUTOTUNE=0 (XLA's --xla_gpu_autotune_level=0: no
# GEMM/conv autotuning, a faster compile, maybe a slower step) is there to try if the
# compile still does not fit.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_run}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/jax_cache}
if [ -n "${XLA_GPU_AUTOTUNE:-}" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=$XLA_GPU_AUTOTUNE"
fi

if [ -n "${WHEELS:-}" ]; then
  $PYTHON -m pip install -q --no-index --no-deps "$WHEELS"/*.whl > "$OUT/pip.log" 2>&1
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/nvidia-smi.txt"
$PYTHON -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  > "$OUT/versions.txt" 2>&1

if [ -n "${GPU_RUN_TINY:-}" ]; then
  CONFIG=configs/rrsisd.py:variant=tiny; BATCH=8; STEPS=2; MATMUL=256; LIMIT=300
  PROBE_ARGS="--tiny"
else
  CONFIG=configs/rrsisd.py; BATCH=32; STEPS=20; MATMUL=8192; LIMIT=${LIMIT:-240}
  PROBE_ARGS="--skip_compile"  # torch.compile, if torch is there, costs minutes
fi

run() {  # run NAME ARGS...: one bench configuration, log and JSON in $OUT
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  timeout "$LIMIT" $PYTHON -m s4eca_jax.bench --config "$CONFIG" --batch_size "$BATCH" \
    --steps "$STEPS" --matmul_size "$MATMUL" --json "$OUT/bench_$name.json" "$@" \
    > "$OUT/bench_$name.log" 2>&1
  echo "exit $?" >> "$OUT/bench_$name.log"
  grep -E "train step|eval forward|MFU|peak memory|exit" "$OUT/bench_$name.log" | tee -a "$OUT/summary.txt"
}

# 1. The encoder skeleton (the probe measures its own matmul rate).
echo "== probe" | tee -a "$OUT/summary.txt"
( cd "$OUT" && OUT="$OUT" timeout "$LIMIT" $PYTHON "$OLDPWD/bench/_probe/encoder_anchor.py" \
    $PROBE_ARGS ) > "$OUT/probe.log" 2>&1
grep -E "matmul|jax\[|RESULT" "$OUT/probe.log" | tee -a "$OUT/summary.txt"

# 2. The full train step: defaults (bf16, cuDNN flash attention), then the levers.
run default
run levers --config.frozen_dtype=bfloat16
run xla_attention --config.frozen_dtype=bfloat16 --config.model.attention=xla --train_only
