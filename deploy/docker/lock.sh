#!/usr/bin/env bash
# Regenerate deploy/docker/requirements.lock: the exact versions pip resolves for ".[ray]"
# today, without torch (each image installs its own build of the pinned torch first) and
# without the NVIDIA wheels that come with a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/../.."
report=$(mktemp)
trap 'rm -f "$report"' EXIT
.venv/bin/pip install -q --dry-run --ignore-installed --report "$report" ".[ray]"
.venv/bin/python - "$report" > deploy/docker/requirements.lock <<'PYEOF'
import json, sys
skip = {"mmcds", "torch"}
pins = sorted(
    (f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.load(open(sys.argv[1]))["install"]
     if i["metadata"]["name"].lower() not in skip and not i["metadata"]["name"].lower().startswith("nvidia-")),
    key=str.lower,
)
print("# The images' Python dependencies, exact; torch is installed first, per image.")
print("# Regenerate after changing pyproject.toml: bash deploy/docker/lock.sh")
print("\n".join(pins))
PYEOF
