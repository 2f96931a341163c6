"""Batch scoring of a whole cohort folder: ``mmcds score``.

Each patient's bundle and DICOM files become a ``PatientRecord`` through the service's own
record builder, then go through the same ``Pipeline.analyse`` a hook runs. One JSON line per
patient is appended to the output file as soon as it is scored, so an interrupted run loses at
most the patients in flight: a rerun reads the file first and scores only the rest.

Backends: ``local`` runs in this process; ``ray`` spreads record building over Ray Data
workers (``map_batches`` with an actor pool), each calling the models' Ray Serve deployments,
which batch the encoders' work across workers.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from tqdm import tqdm

from mmcds.fhir.bundle_source import LocalDicom
from mmcds.fusion.pipeline import Pipeline
from mmcds.records import Analysis
from mmcds.settings import Settings
from mmcds.training.dataset import record_from_bundle

Backend = Literal["local", "ray"]


@dataclass(frozen=True)
class ScoreSummary:
    total: int
    already: int  # found finished in the output file and skipped
    scored: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0


def patient_keys(folder: Path) -> list[str]:
    bundles = folder / "bundles"
    if not bundles.is_dir():
        raise FileNotFoundError(f"{folder} has no bundles/ folder (write one with `mmcds synth`)")
    return sorted(p.stem for p in bundles.glob("*.json"))


def finished(out: Path) -> set[str]:
    """Patients already in ``out``. A last line cut off by an interruption is dropped from the
    file (it is rescored), so appending after it cannot glue two records together."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with out.open("r+b") as f:
            f.truncate(len(complete))
    return {json.loads(line)["patient_key"] for line in complete.splitlines() if line.strip()}


def score_row(key: str, analysis: Analysis) -> dict[str, Any]:
    a = analysis.assessment
    return {
        "patient_key": key,
        "model_version": a.model_version,
        "trained": a.trained,
        "subset": a.subset,
        "findings": {
            f.finding: {"probability": f.probability, "status": f.status, "level": f.level.value}
            for f in a.findings
        },
        "identifier": analysis.identifier,
    }


class CohortScorer:
    """Scores patients of one cohort folder with one pipeline; also a Ray Data actor."""

    def __init__(self, folder: str, pipeline: Pipeline | Callable[[], Pipeline]) -> None:
        self.folder = Path(folder)
        self.dicom = LocalDicom.from_folder(self.folder)
        self.pipeline = pipeline if isinstance(pipeline, Pipeline) else pipeline()

    def score(self, key: str) -> dict[str, Any]:
        bundle = json.loads((self.folder / "bundles" / f"{key}.json").read_text())
        return score_row(key, self.pipeline.analyse(record_from_bundle(bundle, self.dicom)))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        # Patients of a batch in parallel threads: their encoder calls meet in the
        # deployments' batches instead of queueing one patient at a time.
        with ThreadPoolExecutor(max_workers=len(batch["key"]) or 1) as pool:
            rows = list(pool.map(self.score, [str(k) for k in batch["key"]]))
        return {"row": [json.dumps(r) for r in rows]}


def _remote_pipeline(settings: Settings) -> Callable[[], Pipeline]:
    def build() -> Pipeline:
        from mmcds.serving.remote import RemotePipeline

        return RemotePipeline(settings)

    return build


def _ray_rows(
    folder: Path, keys: list[str], settings: Settings, workers: int, batch_size: int
) -> Iterator[str]:
    import ray

    dataset = ray.data.from_items([{"key": k} for k in keys]).map_batches(
        CohortScorer,
        fn_constructor_kwargs={"folder": str(folder), "pipeline": _remote_pipeline(settings)},
        batch_size=batch_size,
        concurrency=workers,
        num_cpus=settings.ray_cpus / 2,  # the workers mostly wait on the deployments
    )
    for batch in dataset.iter_batches(batch_size=1, batch_format="numpy"):
        yield from (str(r) for r in batch["row"])


def _local_rows(folder: Path, keys: list[str], pipeline: Pipeline) -> Iterator[str]:
    scorer = CohortScorer(str(folder), pipeline)
    for key in keys:
        yield json.dumps(scorer.score(key))


def score_cohort(
    folder: Path,
    out: Path,
    settings: Settings,
    *,
    backend: Backend = "local",
    limit: int | None = None,
    workers: int = 2,
    batch_size: int = 4,
    progress: bool = True,
    pipeline: Pipeline | None = None,
) -> ScoreSummary:
    keys = patient_keys(folder)[:limit]
    done = finished(out)
    todo = [k for k in keys if k not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    # Set-up (loading models, joining Ray and deploying) is not part of the throughput.
    if backend == "ray":
        from mmcds.serving.remote import connect

        connect(settings)  # joins or starts Ray; deploys the models if they are not there yet
        started = time.perf_counter()
        rows: Iterable[str] = _ray_rows(folder, todo, settings, workers, batch_size)
    else:
        local = pipeline or Pipeline.from_settings(settings)
        started = time.perf_counter()
        rows = _local_rows(folder, todo, local)
    scored = 0
    with (
        out.open("a", encoding="utf-8") as sink,
        tqdm(total=len(keys), initial=len(keys) - len(todo), disable=not progress,
             desc=f"scoring ({backend})", unit="patient") as bar,
    ):  # fmt: skip
        for row in rows:
            _append(sink, row)
            scored += 1
            bar.update(1)
    return ScoreSummary(len(keys), len(keys) - len(todo), scored, time.perf_counter() - started)


def _append(sink: IO[str], row: str) -> None:
    sink.write(row + "\n")
    sink.flush()
    os.fsync(sink.fileno())  # a finished patient stays finished if the machine goes down
