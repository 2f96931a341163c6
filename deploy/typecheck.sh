#!/usr/bin/env bash
# mypy and import-linter over the one import root `mmcds`. The folders encoders/, fusion/ and
# fhir/ are mapped into it by setuptools' package-dir, which neither mypy nor grimp understands;
# so both read a tree of symlinks laid out as the installed package is.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/mmcds"
for entry in mmcds/*; do ln -s "$repo/$entry" "$tree/mmcds/"; done
for sub in encoders fusion fhir; do ln -s "$repo/$sub" "$tree/mmcds/$sub"; done
cd "$tree"
"$repo/.venv/bin/mypy" --config-file "$repo/pyproject.toml" --cache-dir "$repo/.mypy_cache" -p mmcds
# lint-imports imports the root package from sys.path: put the symlink tree first.
PYTHONPATH="$tree" "$repo/.venv/bin/lint-imports" "$repo/pyproject.toml" --no-cache
