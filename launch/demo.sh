#!/usr/bin/env bash
# The main job on an embedded default, from a fresh clone on a CPU machine (5.5 minutes
# on this project's 2-core host on 2026-11-28, 16 on a slower day, the install
# included): install into ./.venv, write synthetic scenes in the RRSIS-D layout, build
# them with the rrsis_d builder, train configs/demo.py (real MiniLM-L6 text encoder,
# small random frozen ViT, S4ECA adapters and decoder), evaluate on val, predict, and
# print where the tables and pictures are.
#   bash launch/demo.sh            # -> workdirs/demo/s4eca, workdirs/demo/results.md
#   bash launch/demo.sh --ablate   # also the language-blind run, reported side by side
# Other arguments go to python -m s4eca_jax.demo (see --help). A rerun reuses the data,
# the trained runs and the compiled steps.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m s4eca_jax.demo "$@"
