#!/usr/bin/env bash
# The project's checks: lint, format, types, then the test suite against real servers.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
bash deploy/typecheck.sh
.venv/bin/pytest -q "$@"
