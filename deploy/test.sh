#!/usr/bin/env bash
# The project's checks: lint, format, types, then the test suite against real servers.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy mmcds encoders fusion fhir
.venv/bin/pytest -q "$@"
