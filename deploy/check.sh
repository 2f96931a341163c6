#!/usr/bin/env bash
# Check the deployment files with tools from the package registries (no Docker, no cluster):
# the Dockerfiles with hadolint, the compose file against the Compose specification's JSON
# schema, each Kustomize overlay rendered and validated against the Kubernetes API schemas.
# tests/deploy/test_deploy_files.py runs the same checks (and more) inside the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
"$bin/hadolint" deploy/docker/Dockerfile.*
"$bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/docker/compose.yaml
for overlay in deploy/k8s/overlays/*/; do
  "$bin/kubectl" kustomize "$overlay" | "$bin/kubernetes-validate" --strict --quiet -
  echo "ok -- $overlay renders and validates"
done
