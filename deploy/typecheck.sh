#!/usr/bin/env bash
# mypy over the one import root `mmcds`. The folders encoders/, fusion/ and fhir/ are mapped into
# it by setuptools' package-dir, which mypy does not understand; so mypy reads a tree of
# symlinks laid out as the installed package is.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/mmcds"
for entry in mmcds/*; do ln -s "$PWD/$entry" "$tree/mmcds/"; done
for sub in encoders fusion fhir; do ln -s "$PWD/$sub" "$tree/mmcds/$sub"; done
cd "$tree" && "$OLDPWD/.venv/bin/mypy" --config-file "$OLDPWD/pyproject.toml" --cache-dir "$OLDPWD/.mypy_cache" -p mmcds
