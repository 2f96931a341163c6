#!/usr/bin/env bash
# Install torch==2.13.0 into the environment of PYTHON ($1), choosing the build for this host:
#   - a host with an NVIDIA GPU: PyPI's default build of 2.13.0, which is the CUDA one;
#   - a host without one: the CPU build from PyTorch's CPU wheel index when it answers
#     (MMCDS_TORCH_CPU_INDEX to use a mirror), so pip never downloads the multi-GB CUDA build;
#   - neither GPU nor that index (an offline host with wheels on disk, like the project's
#     machines): the pinned version as pip resolves it, i.e. a local CPU wheel from find-links
#     where there is one. If that still turned out a CUDA build, say so.
# Idempotent: an environment that already has 2.13.0 is left as it is.
set -euo pipefail
PY=${1:-.venv/bin/python}
VERSION=2.13.0
CPU_INDEX=${MMCDS_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

installed=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
if [ "${installed%%+*}" = "$VERSION" ]; then
  echo "torch $installed already installed"
  exit 0
fi

has_gpu() {
  [ -e /proc/driver/nvidia/version ] || { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
}

index_answers() {
  "$PY" - "$1" <<'PYEOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5).close()
except Exception:
    sys.exit(1)
PYEOF
}

if has_gpu; then
  echo "NVIDIA GPU found: installing the CUDA build of torch $VERSION"
  "$PY" -m pip install -q "torch==$VERSION"
elif index_answers "$CPU_INDEX"; then
  echo "no GPU: installing the CPU build of torch $VERSION from $CPU_INDEX"
  
  "$PY" -m pip install -q "torch==$VERSION" --index-url "$CPU_INDEX"
else
  echo "no GPU and no CPU wheel index reachable: installing the pinned torch $VERSION as pip resolves it"
  "$PY" -m pip install -q "torch==$VERSION"
fi

"$PY" - <<'PYEOF'
import torch
cuda = torch.version.cuda
print(f"torch {torch.__version__}: {'CUDA ' + cuda if cuda else 'CPU'} build")
if cuda and not torch.cuda.is_available():
    print("warning: a CUDA build of torch on a host without a usable GPU (several GB for nothing);"
          " reinstall it from the CPU index: MMCDS_TORCH_CPU_INDEX=<mirror> bash deploy/install-torch.sh")
PYEOF
