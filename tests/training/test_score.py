"""`mmcds score`: one line per patient, and an interrupted run resumes without rescoring."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmcds.fusion.pipeline import Pipeline
from mmcds.settings import Settings
from mmcds.synth import generate_cohort
from mmcds.training.score import finished, score_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("score-cohort")
    generate_cohort(out, patients=8, seed=41)
    return out


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("score-models")
    return Settings(model_dir=root, database_url=f"sqlite:///{root / 'cache.db'}")


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_resume_skips_finished_patients_and_drops_a_cut_line(
    cohort: Path, settings: Settings, tmp_path: Path
) -> None:
    pipeline = Pipeline.from_settings(settings)
    out = tmp_path / "scores.jsonl"
    first = score_cohort(cohort, out, settings, limit=3, progress=False, pipeline=pipeline)
    assert (first.scored, first.already, first.total) == (3, 0, 3)
    kept = out.read_text()
    with out.open("a") as f:
        f.write('{"patient_key": "cut-off')  # what a kill in the middle of a write leaves
    second = score_cohort(cohort, out, settings, progress=False, pipeline=pipeline)
    assert (second.scored, second.already, second.total) == (5, 3, 8)
    assert out.read_text().startswith(kept)  # the finished lines are untouched
    rows = _lines(out)
    keys = [r["patient_key"] for r in rows]
    assert len(keys) == len(set(keys)) == 8
    assert set(rows[0]["findings"]) and all(
        0.0 <= f["probability"] <= 1.0 for r in rows for f in r["findings"].values()
    )
    again = score_cohort(cohort, out, settings, progress=False, pipeline=pipeline)
    assert (again.scored, again.already) == (0, 8)


@pytest.mark.slow
def test_a_killed_score_command_resumes_where_it_stopped(
    cohort: Path, settings: Settings, tmp_path: Path
) -> None:
    out = tmp_path / "scores.jsonl"
    env = os.environ | {
        "MMCDS_MODEL_DIR": str(settings.model_dir),
        "MMCDS_DATABASE_URL": settings.database_url,
    }
    mmcds = str(Path(sys.executable).parent / "mmcds")
    command = [mmcds, "score", "--data", str(cohort), "--out", str(out)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while (out.read_bytes().count(b"\n") if out.exists() else 0) < 2:  # read, don't repair
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C in the middle of the run
    proc.wait(timeout=60)
    done_before = finished(out)
    assert 2 <= len(done_before) < 8, "the run must have been cut short"
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(done_before)} already in" in resumed.stdout
    assert f"scored {8 - len(done_before)} patient(s)" in resumed.stdout
    keys = [r["patient_key"] for r in _lines(out)]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 8
