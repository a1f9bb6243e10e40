#!/usr/bin/env bash
# One GPU benchmark call for issue 16 (H100/H200, jax with CUDA preinstalled).
#
#   bash bench/gpu_run.sh [STEP...]                 # on the GPU machine, from the repository root
#   GPU_RUN_TINY=1 PYTHON=$PWD/.venv/bin/python bash bench/gpu_run.sh   # CPU smoke run, tiny sizes
#
# STEPs (default: default skeleton probe levers), each an s4eca_jax.bench run of the
# rrsisd config, bf16, batch 32, --train_only, stand-in weights, synthetic batches:
#   default   the defaults (on GPU: cuDNN flash attention, the adapters' depthwise convs as
#             XLA's grouped convolution, frozen weights in bf16, no remat)
#   profile   the defaults with --profile: 3 steps traced; bench/profile_summary.py's table
#   levers    image-encoder remat dots_no_batch (the memory lever; frozen bf16 is the default)
#   frozen_f32 (frozen weights in f32, the default before 2026-11-28), shifted (depthwise
#             as shifted sums, the GPU default before 2026-11-28),
#             bf16_residual (model.f32_residual=False), compact_norms
#             (model.norm_residuals=compact: the image encoder's norms keep their normed
#             input in bf16 for the backward, the TPU default), shared_norms (=shared: only
#             the norms whose output feeds several ops), fused_qkv, xla_attention: one
#             lever each
#   skeleton  bench --skeleton: our image encoder alone as the step's cost skeleton (no
#             adapters, frozen, forward + input gradient), the work the probe times
#   probe     the shared encoder-skeleton probe (bench/_probe/encoder_anchor.py, a
#             git-ignored copy: cp /work/shared/bench/encoder_anchor.py bench/_probe/; carry
#             bench/_probe to the device), which measures its own matmul rate
# Targets: train step >= 405 images/s on an H100 with peak <= 21 GiB; skeleton >= 55% of
# the in-run matmul rate.
#
# Writes to $OUT (default /tmp/gpu_run) at most 8 files (what the device tool brings back):
# env.txt (nvidia-smi, versions), summary.txt (the lines that matter), profile.txt,
# logs.tgz (every log and JSON) and profile.tgz (the trace and HLO of `profile`), rebuilt
# after each step.
# WHEELS=DIR installs the package's pure-Python dependencies from wheels there first.
# DEADLINE (seconds, default 520) bounds the whole script: each step gets at most LIMIT
# seconds (default 240) and never more than what is left, so one slow step cannot eat the
# device budget (15 min in all).
#
# On an H200 (2026-11-27) the full rrsisd step was still compiling after 200-262 s, three
# times. Most of that was the model's init program (one unrolled threefry per leaf: 64 s
# to compile on a 2-core CPU, against 43 s for the train step); s4eca_jax.bench now makes
# stand-in weights on the host instead (run_setup.stand_in_params), and the step compiled
# in 40-96 s on an H200 (2026-11-28). Compiled steps go to a persistent cache in
# /tmp/gpu_run_jax_cache; XLA_GPU_AUTOTUNE=0 (XLA's --xla_gpu_autotune_level=0: no
# GEMM/conv autotuning) is there to try if a compile does not fit.
set -u
cd "$(dirname "$0")/.."
T0=$SECONDS
DEADLINE=${DEADLINE:-520}
left() {  # seconds this step may take: min(LIMIT, what is left of DEADLINE)
  local rest=$((DEADLINE - (SECONDS - T0) - 5))
  [ "$rest" -lt "$LIMIT" ] && echo "$rest" || echo "$LIMIT"
}
OUT=${OUT:-/tmp/gpu_run}
LOGS=/tmp/gpu_run_logs
mkdir -p "$OUT" "$LOGS"
PYTHON=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/gpu_run_jax_cache}
if [ -n "${XLA_GPU_AUTOTUNE:-}" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=$XLA_GPU_AUTOTUNE"
fi

if [ -n "${WHEELS:-}" ]; then
  $PYTHON -m pip install -q --no-index --no-deps "$WHEELS"/*.whl > /tmp/gpu_run_pip.log 2>&1 \
    || { echo "pip failed:"; cat /tmp/gpu_run_pip.log; } >> "$OUT/summary.txt"
fi
{ nvidia-smi 2>&1 || echo "no nvidia-smi"
  $PYTHON -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} > "$OUT/env.txt" 2>&1

if [ -n "${GPU_RUN_TINY:-}" ]; then
  CONFIG=configs/rrsisd.py:variant=tiny; BATCH=8; STEPS=2; MATMUL=256; LIMIT=300
  PROBE_ARGS="--tiny"
else
  CONFIG=configs/rrsisd.py; BATCH=32; STEPS=${STEPS:-20}; MATMUL=8192; LIMIT=${LIMIT:-240}
  PROBE_ARGS="--skip_compile"  # torch.compile, if torch is there, costs minutes
fi

say() { echo "$*" | tee -a "$OUT/summary.txt"; }
pack() {  # the trace apart: if it passes the 16 MiB a file may have, the logs still come back
  tar -czf "$OUT/logs.tgz" -C "$LOGS" --exclude=./profile . 2>/dev/null
  [ -d "$LOGS/profile" ] && tar -czf "$OUT/profile.tgz" -C "$LOGS" profile 2>/dev/null
  return 0
}

bench() {  # bench NAME ARGS...: one s4eca_jax.bench run, log and JSON in $LOGS
  local name=$1; shift
  local limit; limit=$(left)
  if [ "$limit" -lt 30 ]; then say "== $name: skipped, ${limit}s left"; return; fi
  say "== $name (limit ${limit}s, at $((SECONDS - T0))s): $*"
  PYTHONUNBUFFERED=1 timeout "$limit" $PYTHON -m s4eca_jax.bench --config "$CONFIG" \
    --batch_size "$BATCH" --steps "$STEPS" --matmul_size "$MATMUL" --train_only \
    --json "$LOGS/bench_$name.json" "$@" > "$LOGS/bench_$name.log" 2>&1
  echo "exit $?" >> "$LOGS/bench_$name.log"
  grep -E "^bench: [ptl]|train step|eval forward|^skeleton|MFU|peak memory|exit" "$LOGS/bench_$name.log" \
    | tee -a "$OUT/summary.txt"
  pack
}

probe() {
  local limit; limit=$(left)
  if [ "$limit" -lt 60 ]; then say "== probe: skipped, ${limit}s left"; return; fi
  say "== probe (limit ${limit}s, at $((SECONDS - T0))s)"
  ( cd "$LOGS" && OUT="$LOGS" PYTHONUNBUFFERED=1 timeout "$limit" $PYTHON \
      "$OLDPWD/bench/_probe/encoder_anchor.py" $PROBE_ARGS ) > "$LOGS/probe.log" 2>&1
  echo "exit $?" >> "$LOGS/probe.log"
  grep -E "matmul|jax\[|RESULT|exit" "$LOGS/probe.log" | cut -c1-400 | tee -a "$OUT/summary.txt"
  pack
}

for step in "${@:-default skeleton probe levers}"; do
  for step in $step; do
    case $step in
      default) bench default ;;
      skeleton) bench skeleton --skeleton ;;
      profile)
        rm -rf "$LOGS/profile"
        bench profile --profile "$LOGS/profile"
        $PYTHON bench/profile_summary.py "$LOGS/profile" --top 40 > "$OUT/profile.txt" 2>&1
        head -30 "$OUT/profile.txt"; pack ;;
      levers) bench levers --config.image_encoder.remat=dots_no_batch ;;
      frozen_f32) bench frozen_f32 --config.frozen_dtype=float32 ;;
      shifted) bench shifted --config.model.visual_adapter.depthwise=shifted ;;
      bf16_residual) bench bf16_residual --config.model.f32_residual=False ;;
      compact_norms) bench compact_norms --config.model.norm_residuals=compact ;;
      shared_norms) bench shared_norms --config.model.norm_residuals=shared ;;
      fused_qkv) bench fused_qkv --config.model.fused_qkv=True ;;
      xla_attention) bench xla_attention --config.model.attention=xla ;;
      probe) probe ;;
      *) say "unknown step $step (see the list at the top of bench/gpu_run.sh)" ;;
    esac
  done
done
say "== done at $((SECONDS - T0))s"
