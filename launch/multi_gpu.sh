#!/usr/bin/env bash
# One host with N GPUs: ONE process drives all N (JAX's single-controller model within a
# host): one input pipeline, no coordinator, and XLA's collectives run over NVLink inside
# the process. One process per GPU (config.distributed with a coordinator) works too but
# only adds start-up, N input pipelines and host-side collectives on one machine.
#   bash launch/multi_gpu.sh [--dry-run] [--gpus N] CONFIG WORKDIR [--config.FIELD=VALUE ...]
#   bash launch/multi_gpu.sh --gpus 4 configs/rrsisd.py ~/runs/rrsisd --config.data_dir=~/tfds
# --gpus N uses GPUs 0..N-1 (CUDA_VISIBLE_DEVICES); default: every GPU. The mesh is the
# config's (default: data over all GPUs); config.batch_size must divide by N.
set -euo pipefail
dry_run=0 gpus=""
while [[ "${1:-}" == --* ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --gpus) gpus=$2; shift 2 ;;
    --gpus=*) gpus=${1#--gpus=}; shift ;;
    *) break ;;
  esac
done
if (( $# < 2 )); then
  echo "usage: bash launch/multi_gpu.sh [--dry-run] [--gpus N] CONFIG WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
config=$1 workdir=$2; shift 2
repo="$(cd "$(dirname "$0")/.." && pwd)"
python=${PYTHON:-$([[ -x "$repo/.venv/bin/python" ]] && echo "$repo/.venv/bin/python" || echo python3)}
env=()
if [[ -n "$gpus" ]]; then
  env+=("CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((gpus - 1)))")
fi
# Let XLA take most of each GPU's memory up front (its default is 75%).
env+=("XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}")
command=(env "${env[@]}" "$python" -m s4eca_jax.train "--config=$config" "--workdir=$workdir" "$@")
if (( dry_run )); then printf '%q ' "${command[@]}"; echo; exit 0; fi
exec "${command[@]}"
