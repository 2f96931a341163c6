#!/usr/bin/env bash
# Set up a fresh machine for mmcds: system packages, the Python environment, the FHIR sandbox.
# Idempotent: a second run only checks. Needs root (or sudo) for apt-get the first time.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Orthanc with DICOMweb and GDCM (JPEG 2000) from Debian: the PACS used by the demo and tests.
if ! command -v Orthanc >/dev/null 2>&1 || [ ! -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq orthanc orthanc-dicomweb orthanc-gdcm >/dev/null
fi

# Chromium from Debian: the browser the review-page tests drive through Playwright
# (executable_path=/usr/bin/chromium); Playwright's own browser downloads are never used.
if ! command -v chromium >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

command -v node >/dev/null 2>&1 || { echo "Node.js 20 is required for the FHIR sandbox" >&2; exit 1; }

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
bash deploy/install-torch.sh .venv/bin/python
.venv/bin/pip install -q -e ".[dev,ray]"

# The FHIR sandbox's npm packages, exactly as locked.
if [ ! -d deploy/sandbox/node_modules ] || [ deploy/sandbox/package-lock.json -nt deploy/sandbox/node_modules ]; then
  (cd deploy/sandbox && npm ci --no-audit --no-fund --loglevel=error)
fi
# axe-core for the browser tests' accessibility check, exactly as locked.
if [ ! -d deploy/browser/node_modules ] || [ deploy/browser/package-lock.json -nt deploy/browser/node_modules ]; then
  (cd deploy/browser && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "mmcds set-up complete"
