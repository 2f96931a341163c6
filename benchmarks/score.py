"""Cohort scoring throughput, local vs Ray (Ray Data + Ray Serve), and resumption. Prints JSON.

    .venv/bin/python benchmarks/score.py [--patients 200] [--seed 5] [--workers 2]

Writes a synthetic cohort, then in the same run:
- local: ``mmcds score --backend local`` in a subprocess (models in-process);
- ray, interrupted: ``mmcds score --backend ray`` in a subprocess, stopped with SIGINT once a
  third of the patients are written;
- ray, resumed: the same command again; it must score only the rest, and the file must end
  with each patient exactly once.
Each run has its own fresh embedding cache (SQLite file), so no run profits from another's.
Throughput excludes set-up (loading models; starting Ray and deploying the models), which is
reported beside it: the ``scored ... in S s`` line the command prints.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mmcds.synth import generate_cohort

MMCDS = str(Path(sys.executable).parent / "mmcds")
SUMMARY = re.compile(r"scored (\d+) patient\(s\) in ([\d.]+) s \(([\d.]+)/s\); (\d+) already")


def _lines(out: Path) -> int:
    return out.read_bytes().count(b"\n") if out.exists() else 0


def _command(cohort: Path, out: Path, backend: str, workers: int) -> list[str]:
    return [MMCDS, "score", "--data", str(cohort), "--out", str(out), "--backend", backend,
            "--workers", str(workers)]  # fmt: skip


def _env(root: Path, name: str) -> dict[str, str]:
    return os.environ | {
        "MMCDS_MODEL_DIR": str(root / "models"),
        "MMCDS_DATABASE_URL": f"sqlite:///{root / f'{name}.db'}",
        "MMCDS_RAY_CPUS": "0.25",  # five deployments + workers on a small machine
        "MMCDS_RAY_MAX_REPLICAS": "2",
    }


def _run(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    match = SUMMARY.search(done.stdout)
    assert match, done.stdout + done.stderr
    scored, seconds, rate, already = match.groups()
    return {
        "scored": int(scored),
        "already": int(already),
        "scoring_s": float(seconds),
        "patients_per_s": float(rate),
        "setup_s": round(time.perf_counter() - started - float(seconds), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mmcds-score-bench-"))
    cohort = root / "cohort"
    generate_cohort(cohort, patients=args.patients, seed=args.seed)
    result: dict[str, Any] = {"patients": args.patients, "cpus": os.cpu_count()}

    result["local"] = _run(_command(cohort, root / "local.jsonl", "local", 1), _env(root, "l"))

    out = root / "ray.jsonl"
    command, env = _command(cohort, out, "ray", args.workers), _env(root, "r")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while _lines(out) < args.patients // 3 and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    interrupted_at = _lines(out)
    result["ray_interrupted_after"] = interrupted_at
    result["ray_resumed"] = _run(command, env)
    keys = [json.loads(line)["patient_key"] for line in out.read_text().splitlines()]
    result["ray_file_patients"] = len(keys)
    result["ray_file_unique"] = len(set(keys))
    result["resumed_without_rescoring"] = (
        len(keys) == len(set(keys)) == args.patients
        and result["ray_resumed"]["already"] >= interrupted_at
        and result["ray_resumed"]["scored"] == args.patients - result["ray_resumed"]["already"]
    )
    local_rate = result["local"]["patients_per_s"]
    result["ray_vs_local_throughput"] = round(
        result["ray_resumed"]["patients_per_s"] / local_rate, 3
    )
    local_rows = {json.loads(x)["patient_key"]: json.loads(x) for x in
                  (root / "local.jsonl").read_text().splitlines()}  # fmt: skip
    worst = 0.0
    for line in out.read_text().splitlines():
        row = json.loads(line)
        for f, v in row["findings"].items():
            ref = local_rows[row["patient_key"]]["findings"][f]["probability"]
            worst = max(worst, abs(v["probability"] - ref))
    result["max_abs_probability_difference_ray_vs_local"] = worst
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
