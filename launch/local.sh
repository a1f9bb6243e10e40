#!/usr/bin/env bash
# One host, one process, all of its devices (CPU, one GPU, several GPUs or one TPU VM).
#   bash launch/local.sh [--dry-run] CONFIG WORKDIR [--config.FIELD=VALUE ...]
#   bash launch/local.sh configs/rrsisd.py ~/runs/rrsisd --config.data_dir=~/tfds
# --dry-run prints the command instead of running it. PYTHON (default: the project's
# .venv, else python3) picks the interpreter. Exit 75: stopped with a checkpoint, rerun.
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if (( $# < 2 )); then
  echo "usage: bash launch/local.sh [--dry-run] CONFIG WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
config=$1 workdir=$2; shift 2
repo="$(cd "$(dirname "$0")/.." && pwd)"
python=${PYTHON:-$([[ -x "$repo/.venv/bin/python" ]] && echo "$repo/.venv/bin/python" || echo python3)}
command=("$python" -m s4eca_jax.train "--config=$config" "--workdir=$workdir" "$@")
if (( dry_run )); then printf '%q ' "${command[@]}"; echo; exit 0; fi
exec "${command[@]}"
