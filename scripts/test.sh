#!/usr/bin/env bash
# The test suite: sets up .venv, then runs pytest.  Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m slow      # the real-SmolLM2 tests (slow; also run by CI)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
