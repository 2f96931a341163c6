"""The ``mmcds`` command line: load, serve, score, analyse, demo, synth, train, calibrate,
evaluate."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from mmcds.settings import get_settings

app = typer.Typer(
    help="Multimodal clinical decision support over CDS Hooks, FHIR and DICOMweb.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def load(
    folder: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Folder to load")],
    fhir_url: Annotated[str | None, typer.Option(help="FHIR base URL")] = None,
    dicomweb_url: Annotated[str | None, typer.Option(help="DICOMweb root of the PACS")] = None,
    wait: Annotated[
        float, typer.Option(min=0, help="Seconds to wait for both servers to answer first")
    ] = 0,
) -> None:
    """Post FHIR transaction bundles and DICOM files from FOLDER to a FHIR server and a PACS."""
    from mmcds.fhir.client import FhirClient
    from mmcds.fhir.dicomweb import DicomWebClient
    from mmcds.fhir.load import load_folder

    s = get_settings()
    auth = (
        (s.dicomweb_user, s.dicomweb_password) if s.dicomweb_user and s.dicomweb_password else None
    )
    if wait:  # e.g. the compose stack's loader, started beside servers that take a minute
        _wait_for(
            [f"{(fhir_url or s.fhir_base_url).rstrip('/')}/metadata",
             f"{(dicomweb_url or s.dicomweb_url).rstrip('/')}/studies?limit=1"],
            auth, wait,
        )  # fmt: skip
    with (
        FhirClient(fhir_url or s.fhir_base_url, timeout=120) as fhir,
        DicomWebClient(dicomweb_url or s.dicomweb_url, auth=auth) as pacs,
    ):
        result = load_folder(folder, fhir, pacs, progress=typer.echo)
    typer.echo(
        f"loaded {result.bundles} bundle(s), {result.resources} resource(s), "
        f"{result.dicom} DICOM file(s)"
    )
    for error in result.errors:
        typer.echo(f"error: {error}", err=True)
    if result.errors:
        raise typer.Exit(1)


def _wait_for(urls: list[str], auth: tuple[str, str] | None, seconds: float) -> None:
    import time

    import httpx

    deadline = time.monotonic() + seconds
    for url in urls:
        while True:
            try:
                if httpx.get(url, auth=auth, timeout=5).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                typer.echo(f"error: {url} did not answer within {seconds:.0f} s", err=True)
                raise typer.Exit(1)
            time.sleep(2)


@app.command()
def serve(
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="Worker processes (each loads its own models)")
    ] = 1,
) -> None:
    """Run the CDS Hooks service (settings from MMCDS_* variables; see README)."""
    import uvicorn

    from mmcds.service.logs import configure_logging

    s = get_settings()
    if workers > 1 and s.replay_cache == "memory":
        raise typer.BadParameter(
            "--workers > 1 needs a replay cache shared by the processes: set "
            "MMCDS_REPLAY_CACHE=database (the default) or redis",
            param_hint="--workers",
        )
    configure_logging(s.log_level, s.log_format)
    # An import string + factory: each worker process builds its own app from the settings
    # (and configures its JSON logging there). log_config=None: uvicorn's loggers go through
    # the JSON handler. On SIGTERM uvicorn stops accepting, lets in-flight hooks finish (up to
    # the grace), then runs the shutdown that stops the outbox worker after its current round.
    uvicorn.run(
        "mmcds.service.api:app_from_settings",
        factory=True,
        host=s.host,
        port=s.port,
        workers=workers,
        log_config=None,
        timeout_graceful_shutdown=int(s.shutdown_grace_s),
    )


@app.command()
def feedback(
    since: Annotated[
        str | None, typer.Option(help="ISO date or instant; only outcomes from then on")
    ] = None,
    service: Annotated[str | None, typer.Option(help="Only this CDS service id")] = None,
    analysis: Annotated[str | None, typer.Option(help="Only feedback on this analysis")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line")] = False,
) -> None:
    """List clinicians' feedback on cards (accepted / overridden, with the reason), newest
    first, for monitoring."""
    import json
    from dataclasses import asdict
    from datetime import datetime

    from mmcds.service.feedback import FeedbackStore

    try:
        start = datetime.fromisoformat(since) if since else None
    except ValueError as exc:
        raise typer.BadParameter(f"not an ISO date: {since}", param_hint="--since") from exc
    store = FeedbackStore(get_settings().database_url)
    try:
        items = store.list(since=start, service_id=service, analysis_id=analysis, limit=limit)
    finally:
        store.close()
    for f in items:
        if as_json:
            row = asdict(f) | {"outcome_timestamp": f.outcome_timestamp.isoformat()}
            typer.echo(json.dumps(row))
            continue
        reason = f.override_reason.display or f.override_reason.code if f.override_reason else ""
        typer.echo(
            f"{f.outcome_timestamp.isoformat()}  {f.service_id}  {f.outcome:<10}  "
            f"card={f.card_uuid}  analysis={f.analysis_id or '-'}  {reason}".rstrip()
        )
    if not items and not as_json:
        typer.echo("no feedback recorded", err=True)


@app.command()
def score(
    data: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Cohort folder")],
    out: Annotated[Path, typer.Option(help="JSON-lines file of scores (appended; resumable)")],
    backend: Annotated[str, typer.Option(help="local, or ray (Ray Data + Ray Serve)")] = "local",
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N patients")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Ray Data workers")] = 2,
    batch_size: Annotated[int, typer.Option(min=1, help="Patients per Ray Data batch")] = 4,
) -> None:
    """Score every patient of a cohort folder; a rerun skips patients already in OUT."""
    from mmcds.training.score import score_cohort

    if backend not in ("local", "ray"):
        raise typer.BadParameter("backend must be 'local' or 'ray'")
    s = get_settings()
    summary = score_cohort(
        data, out, s, backend="ray" if backend == "ray" else "local", limit=limit,
        workers=workers, batch_size=batch_size,
    )  # fmt: skip
    typer.echo(
        f"scored {summary.scored} patient(s) in {summary.seconds:.1f} s "
        f"({summary.per_second:.2f}/s); {summary.already} already in {out}; {summary.total} total"
    )


@app.command("serve-models")
def serve_models(
    health_port: Annotated[
        int | None,
        typer.Option(
            min=1, max=65535, help="Serve /healthz, /readyz (models RUNNING), /metrics on it"
        ),
    ] = None,
) -> None:
    """Deploy the models as Ray Serve deployments on MMCDS_RAY_ADDRESS and keep them up."""
    import contextlib
    import signal
    import threading

    from mmcds.service.health import probe_app, start_probes
    from mmcds.serving.remote import deploy, models_status

    s = get_settings()
    deploy(s)  # joins Ray first: the probes' status calls must not start a Ray of their own
    if health_port:
        start_probes(
            probe_app({"models": models_status}, "mmcds models probes"), s.host, health_port
        )
    typer.echo("models deployed on Ray Serve (application mmcds-models); Ctrl-C to stop")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()


@app.command()
def analyse(
    patients: Annotated[list[str], typer.Argument(help="Patient ids on the FHIR server")],
    fhir_url: Annotated[str | None, typer.Option(help="FHIR base URL")] = None,
) -> None:
    """Analyse patients now, through the same path a hook runs, and print their cards as JSON.

    The reports are written back to the FHIR server (through the outbox) as a hook would.
    """
    import json

    from mmcds.service.analysis import AnalysisService, Trigger

    s = get_settings()
    service = AnalysisService(s)
    server = (fhir_url or s.fhir_base_url).rstrip("/")
    for patient in patients:
        result = service.analyse(Trigger(patient_id=patient, fhir_server=server))
        typer.echo(json.dumps({"patient": patient, "cards": result.cards}))


@app.command()
def outbox(
    retry: Annotated[
        list[str] | None,
        typer.Option("--retry", help="Re-drive this report now (after a fix); repeatable"),
    ] = None,
    state: Annotated[
        list[str] | None,
        typer.Option(help="Only these states: pending, delivered, rejected, dead"),
    ] = None,
    limit: Annotated[int, typer.Option(min=1)] = 50,
) -> None:
    """List write-back reports and their state; --retry KEY gives one a fresh retry budget and
    sends it at once (with the service's write-back credentials)."""
    from mmcds.service.analysis import AnalysisService
    from mmcds.service.outbox import STATES

    s = get_settings()
    service = AnalysisService(s)
    box = service.outbox
    for key in retry or []:
        if box.get(key) is None:
            typer.echo(f"error: no report {key} in the outbox", err=True)
            raise typer.Exit(1)
        box.retry(key)
        box.deliver(service.send, key=key)
    bad = set(state or ()) - set(STATES)
    if bad:
        raise typer.BadParameter(f"unknown state(s) {sorted(bad)}; use {', '.join(STATES)}")
    counts = box.counts()
    typer.echo("  ".join(f"{name}: {counts.get(name, 0)}" for name in STATES))
    for d in box.deliveries(tuple(state or STATES), limit=limit):
        what = f"DiagnosticReport/{d.report_id}" if d.report_id else (d.last_error or "")
        if d.note:
            what += f" ({d.note})"
        typer.echo(f"{d.key}  {d.status:<9}  attempts {d.attempts:<3}  {d.fhir_server}  {what}")
    settled = [box.get(k) for k in retry or []]
    if any(r is None or r.status != "delivered" for r in settled):
        raise typer.Exit(1)


@app.command()
def ingest(
    patients: Annotated[list[str] | None, typer.Argument(help="Patient ids (default: all)")] = None,
    fhir_url: Annotated[str | None, typer.Option(help="FHIR base URL")] = None,
    now: Annotated[bool, typer.Option(help="Analyse here and now instead of queueing")] = False,
) -> None:
    """Analyse a batch of patients ahead of their hooks: queue them for `mmcds worker` (or run
    them now), so hooks answer from the stored analyses."""
    from mmcds.fhir.client import FhirClient
    from mmcds.service.analysis import AnalysisService

    s = get_settings()
    server = (fhir_url or s.fhir_base_url).rstrip("/")
    if not patients:
        with FhirClient(server, timeout=s.fhir_timeout_s) as fhir:
            patients = [p["id"] for p in fhir.search("Patient", {"_count": "1000"})]
    service = AnalysisService(s)
    if service.queue is not None and not now:
        service.queue.open()
    try:
        for patient, state in zip(patients, service.ingest(server, patients, now=now), strict=True):
            typer.echo(f"{patient}: {state}")
    finally:
        if service.queue is not None and not now:
            service.queue.close()


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs at once in this process")] = 1,
    burst: Annotated[bool, typer.Option(help="Exit when the queue is empty")] = False,
    health_port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Serve /healthz, /readyz, /metrics on this port"),
    ] = None,
) -> None:
    """Run queued analyses (ingest, FHIR notifications, hooks that found no current answer)."""
    from mmcds.service.logs import configure_logging
    from mmcds.service.queue import QueueUnavailable
    from mmcds.service.worker import run_worker

    s = get_settings()
    configure_logging(s.log_level, s.log_format)
    try:
        run_worker(s, concurrency=concurrency, burst=burst, health_port=health_port)
    except QueueUnavailable as exc:  # no queue configured, or its PostgreSQL is down
        typer.echo(f"mmcds worker: {exc}", err=True)
        raise typer.Exit(1) from exc


@app.command()
def demo(
    patients: Annotated[int, typer.Option(min=1, max=20)] = 3,
    seed: Annotated[int, typer.Option()] = 7,
    fhir_url: Annotated[
        str | None, typer.Option(help="Use this FHIR server, not a sandbox")
    ] = None,
    dicomweb_url: Annotated[str | None, typer.Option(help="Use this PACS, not Orthanc")] = None,
) -> None:
    """The main job on embedded defaults: servers, data, service, hooks, cards, reports."""
    from mmcds.dev.demo import run_demo

    run_demo(patients=patients, seed=seed, fhir_url=fhir_url, dicomweb_url=dicomweb_url)


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Output folder")],
    patients: Annotated[int, typer.Option(min=1)] = 100,
    seed: Annotated[int, typer.Option()] = 0,
    sites: Annotated[str, typer.Option(help="Comma-separated site names")] = "A,B",
    label_noise: Annotated[float, typer.Option(min=0.0, max=0.5)] = 0.0,
) -> None:
    """Write a synthetic multimodal cohort whose ground truth is known."""
    from mmcds.synth import generate_cohort

    summary = generate_cohort(
        out,
        patients=patients,
        seed=seed,
        sites=tuple(s.strip() for s in sites.split(",") if s.strip()),
        label_noise=label_noise,
    )
    typer.echo(
        f"wrote {summary.patients} patients to {summary.out} in {summary.seconds:.1f} s "
        f"({summary.patients_per_second:.1f}/s)\ncounts: {summary.counts}\n"
        f"prevalence by site: {summary.prevalence}"
    )


@app.command()
def train(
    data: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Cohort folder")],
    out: Annotated[Path, typer.Option(help="Model folder to write")],
    seed: Annotated[int, typer.Option(help="Split, initialisation and shuffling seed")] = 0,
    epochs: Annotated[int, typer.Option(min=1, help="Fusion epochs (early stopping)")] = 80,
    pretrain_epochs: Annotated[
        int, typer.Option(min=0, help="Image encoder epochs; 0 = none")
    ] = 30,
    pretrain_seed: Annotated[
        int | None,
        typer.Option(
            help="Image encoders' training seed (default: --seed); the split stays --seed's, so "
            "two runs differ only in how the encoders trained (e.g. to see how much the "
            "heatmaps depend on one training run)"
        ),
    ] = None,
    localise: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Weight of the CNN's localisation term on training images with lesion masks "
            "(the cohort's masks/ folder); 0 = learn from labels only",
        ),
    ] = 0.1,
    calibration: Annotated[str, typer.Option(help="platt or temperature")] = "platt",
    limit: Annotated[int | None, typer.Option(min=10, help="Only the first N patients")] = None,
    cache: Annotated[str | None, typer.Option(help="Embedding cache URL")] = None,
    train_sites: Annotated[
        str | None,
        typer.Option(
            help="Comma list of sites to train and calibrate at (e.g. A); the test split keeps "
            "every site; recalibrate another site with `mmcds calibrate`"
        ),
    ] = None,
    site_calibration: Annotated[
        str,
        typer.Option(
            help="Per-site calibrators: bias_cv (own bias where CV helps) or platt (full Platt "
            "where the site has >= 50 validation patients)"
        ),
    ] = "bias_cv",
    findings: Annotated[
        str | None,
        typer.Option(
            help="Comma list of labels-file columns to learn (default: cohort.json's findings, "
            "else every finding column of labels.csv)"
        ),
    ] = None,
    catalogue: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="A site's finding catalogue (JSON, same shape as mmcds/data/findings.json) "
            "adding findings; default MMCDS_FINDING_CATALOGUE",
        ),
    ] = None,
    lexical: Annotated[
        bool | None,
        typer.Option(
            "--lexical/--no-lexical",
            help="Feed the text head TF-IDF + logistic regression logits over the notes, fitted "
            "on the training split (--no-lexical: MiniLM chunk embeddings only); default: on "
            "for a cohort without radiographs, off with them",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Train, calibrate and save a fusion model from DATA: whatever modalities it has (images,
    notes, labs, any mix) and the findings its labels file names."""
    from mmcds.fusion.calibrate import Method, SiteRule
    from mmcds.fusion.pretrain import PretrainSettings
    from mmcds.fusion.train import TrainSettings
    from mmcds.training.run import TrainOptions, train_cohort

    if calibration not in ("platt", "temperature"):
        raise typer.BadParameter("calibration must be 'platt' or 'temperature'")
    method: Method = "platt" if calibration == "platt" else "temperature"
    if site_calibration not in ("bias_cv", "platt"):
        raise typer.BadParameter("site-calibration must be 'bias_cv' or 'platt'")
    rule: SiteRule = "platt" if site_calibration == "platt" else "bias_cv"
    sites = tuple(s.strip() for s in train_sites.split(",") if s.strip()) if train_sites else None
    options = TrainOptions(
        seed=seed,
        pretrain=pretrain_epochs > 0,
        pretrain_settings=PretrainSettings(
            epochs=max(1, pretrain_epochs),
            seed=seed if pretrain_seed is None else pretrain_seed,
            localise=localise,
        ),
        train_settings=TrainSettings(epochs=epochs, seed=seed),
        calibration=method,
        limit=limit,
        cache_url=cache,
        site_calibration=rule,
        train_sites=sites or None,
        findings=tuple(f.strip() for f in findings.split(",") if f.strip()) if findings else None,
        finding_catalogue=str(catalogue) if catalogue else None,
        lexical=lexical,
    )
    train_cohort(data, out, get_settings(), options, echo=typer.echo)


@app.command()
def label(
    reports: Annotated[Path, typer.Option(exists=True, file_okay=False, help="<key>.txt reports")],
    labels: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Site labels CSV")],
    out: Annotated[Path, typer.Option(help="Cohort folder to write (for mmcds train)")],
    uncertain: Annotated[
        str,
        typer.Option(
            help="Uncertain (-1) labels: ignore (kept as unknown: masked in the loss and left "
            "out of that finding's figures, the patient kept), zeros, ones"
        ),
    ] = "ignore",
    catalogue: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Site finding catalogue")
    ] = None,
) -> None:
    """Turn a folder of reports and a site's structured labels into a notes-only cohort."""
    from mmcds.training.label import label_reports

    if uncertain not in ("ignore", "zeros", "ones"):
        raise typer.BadParameter("uncertain must be ignore, zeros or ones")
    site = str(catalogue) if catalogue else get_settings().finding_catalogue or None
    counts = label_reports(reports, labels, out, uncertain, site)  # type: ignore[arg-type]
    typer.echo(f"wrote {out}: {counts}")


@app.command()
def calibrate(
    model: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Model folder")],
    data: Annotated[
        Path, typer.Option(exists=True, file_okay=False, help="The site's labelled patients")
    ],
    out: Annotated[Path, typer.Option(help="Recalibrated model folder to write")],
    fraction: Annotated[
        float, typer.Option(min=0.05, max=0.95, help="Share of DATA fitted on; rest held out")
    ] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the calibration / held-out split")] = 0,
    site_rule: Annotated[
        str, typer.Option(help="platt (own scale and bias per site) or bias_cv")
    ] = "platt",
    cache: Annotated[str | None, typer.Option(help="Embedding cache URL")] = None,
) -> None:
    """Recalibrate MODEL per site on a deployment site's own labelled patients (DATA)."""
    from mmcds.fusion.calibrate import SiteRule
    from mmcds.training.recalibrate import recalibrate_cohort

    if site_rule not in ("bias_cv", "platt"):
        raise typer.BadParameter("site-rule must be 'platt' or 'bias_cv'")
    rule: SiteRule = "platt" if site_rule == "platt" else "bias_cv"
    recalibrate_cohort(
        model, data, out, get_settings(), fraction=fraction, seed=seed, site_rule=rule,
        cache_url=cache, echo=typer.echo,
    )  # fmt: skip


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Model folder")],
    data: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Cohort folder")],
    out: Annotated[Path, typer.Option(help="Report folder (metrics.json, report.html)")],
    split: Annotated[str, typer.Option(help="Split scored when DATA is the training cohort")] = (
        "test"
    ),
    bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples")] = 1000,
    cache: Annotated[str | None, typer.Option(help="Embedding cache URL")] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="tfidf: also fit TF-IDF + logistic regression on the model's training split's "
            "notes and score it beside the model (paired bootstrap)"
        ),
    ] = None,
) -> None:
    """Score DATA with a trained model: metrics.json and an HTML report with plots."""
    from mmcds.training.run import evaluate_cohort

    if baseline not in (None, "tfidf"):
        raise typer.BadParameter("baseline must be tfidf")
    metrics = evaluate_cohort(
        model, data, out, get_settings(), n_boot=bootstrap, cache_url=cache, split=split,
        baseline=baseline, echo=typer.echo,
    )  # fmt: skip
    for f, m in metrics["subsets"]["image+text+labs"].items():
        typer.echo(f"{f}: AUROC {m['auroc']} CI {m.get('auroc_ci')} ECE {m['ece']}")
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'report.html'}")
