#!/usr/bin/env bash
# Installs what the tests need into ./.venv (idempotent) and runs the test suite.
#   bash launch/test.sh            # whole suite
#   bash launch/test.sh -k vit -x  # extra arguments go to pytest
#   bash launch/test.sh -n 0       # in this one process (pytest-xdist: 2 workers by default)
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test
# pytest exits 5 when no test ran: that is a failure here, as is any other non-zero code.
# Two worker processes, one test file each at a time (module fixtures are built once):
# while one compiles in a single thread, the other uses the second core.
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
