#!/usr/bin/env bash
# Installs what the tests need into ./.venv (idempotent) and runs the test suite.
#   bash launch/test.sh            # whole suite
#   bash launch/test.sh -k vit -x  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test
# pytest exits 5 when no test ran: that is a failure here, as is any other non-zero code.
exec .venv/bin/python -m pytest "$@"
