"""The replay cache is shared: a token accepted by one service process is refused by every
other. ``mmcds serve --workers 2`` end to end (real processes, real HTTP), and each shared
cache (SQLite, PostgreSQL, Redis) across separate processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from joserfc.jwk import ECKey
from stall import Schema, while_locked

from mmcds.dev.servers import free_port
from mmcds.service.auth import sign_hook_jwt

ISSUER = "https://ehr.test.mmcds.local"
KID = "test-key-1"
PUBLIC = "http://cds.replicas.test"  # the one URL a load balancer puts before the replicas
PATH = "/cds-services/mmcds-patient-view"
MMCDS = str(Path(sys.executable).parent / "mmcds")

Start = Callable[..., str]


@pytest.fixture
def start_service(ehr_key: ECKey, tmp_path: Path) -> Iterator[Start]:
    """Starts ``mmcds serve`` with the given settings; its base URL once it answers."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, **settings: str) -> str:
        port = free_port()
        env = {
            **os.environ,
            "MMCDS_HOME": str(tmp_path / "home"),
            "MMCDS_PORT": str(port),
            "MMCDS_PUBLIC_BASE_URL": PUBLIC,
            "MMCDS_TRUSTED_ISSUERS": json.dumps(
                {ISSUER: json.dumps({"keys": [ehr_key.as_dict(private=False)]})}
            ),
            "MMCDS_FHIR_ALLOWLIST": json.dumps([f"http://127.0.0.1:{free_port()}/fhir/R4"]),
            **{f"MMCDS_{k.upper()}": v for k, v in settings.items()},
        }
        log = (tmp_path / f"serve-{port}.log").open("wb")
        proc = subprocess.Popen(
            [MMCDS, "serve", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: its workers are stopped with it
        )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError((tmp_path / f"serve-{port}.log").read_text()[-3000:])
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return url
            except httpx.TransportError:
                time.sleep(0.3)
        raise AssertionError(f"mmcds serve did not answer on {url}")

    yield start
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _call(url: str, token: str) -> int:
    # No patientId: an accepted token stops at validation (400), before any FHIR call.
    body = {"hook": "patient-view", "hookInstance": "i", "context": {"userId": "Practitioner/1"}}
    with httpx.Client() as fresh:  # a new connection each time, as separate EHR calls are
        return fresh.post(
            f"{url}{PATH}", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ).status_code


def _workers(url: str) -> set[int]:
    """Process ids holding ``url``'s listening socket: uvicorn's workers (Linux /proc)."""
    port = int(url.rsplit(":", 1)[1])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                inodes.add(fields[9])
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = {os.readlink(fd) for fd in (proc / "fd").iterdir()}
        except OSError:
            continue
        if any(f"socket:[{i}]" in links for i in inodes):
            pids.add(int(proc.name))
    return pids


def _token(key: ECKey) -> str:
    return sign_hook_jwt(key, issuer=ISSUER, audience=f"{PUBLIC}{PATH}", kid=KID)


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    if request.param == "sqlite":
        return {"replay_cache": "database", "database_url": f"sqlite:///{tmp_path / 's.db'}"}
    if request.param == "postgresql":
        return {"replay_cache": "database", "database_url": request.getfixturevalue("postgres_url")}
    redis = pytest.importorskip("redis")
    try:
        redis.Redis.from_url("redis://127.0.0.1:6379/0", socket_connect_timeout=2).ping()
    except redis.RedisError as err:
        if os.environ.get("CI"):
            pytest.fail(f"Redis unavailable in CI: {err}")
        pytest.skip(f"Redis unavailable: {err}")
    return {
        "replay_cache": "redis",
        "redis_url": "redis://127.0.0.1:6379/0",
        "database_url": f"sqlite:///{tmp_path / 's.db'}",
    }


CHECK = """
import sys
from mmcds.service.replay import replay_cache
from mmcds.settings import Settings
cache = replay_cache(Settings())
print(cache.check_and_add(sys.argv[1], float(sys.argv[2])))
"""


def test_each_shared_cache_refuses_a_key_seen_by_another_process(
    shared: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "MMCDS_HOME": str(tmp_path),
        **{f"MMCDS_{k.upper()}": v for k, v in shared.items()},
    }
    key, expires = f"{ISSUER}|{time.time_ns()}", str(time.time() + 300)

    def in_a_process(k: str, exp: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", CHECK, k, exp], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip()

    assert in_a_process(key, expires) == "True"
    assert in_a_process(key, expires) == "False"
    # an entry past its expiry no longer blocks (tokens are refused on exp before this)
    old = f"{ISSUER}|old-{time.time_ns()}"
    assert in_a_process(old, str(time.time() - 1)) == "True"
    assert in_a_process(old, str(time.time() + 300)) == "True"


def test_serve_workers_shares_the_replay_cache(start_service: Start, ehr_key: ECKey) -> None:
    url = start_service("--workers", "2")  # default settings: replay cache in the database
    assert len(_workers(url)) >= 3  # the supervisor and its two workers hold the socket
    # 20 tokens, each sent twice on new connections: with a per-process cache, the second
    # send would land on the other worker (and be accepted) about half the time.
    results = []
    for _ in range(20):
        token = _token(ehr_key)
        results.append((_call(url, token), _call(url, token)))
    assert results == [(400, 401)] * 20


def test_serve_refuses_workers_with_a_per_process_cache(tmp_path: Path) -> None:
    env = {**os.environ, "MMCDS_HOME": str(tmp_path), "MMCDS_REPLAY_CACHE": "memory"}
    done = subprocess.run(
        [MMCDS, "serve", "--workers", "2"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "MMCDS_REPLAY_CACHE" in done.stdout + done.stderr


def test_concurrent_async_claims_of_one_key_admit_exactly_one(
    shared: dict[str, str], tmp_path: Path
) -> None:
    """The hook path's claims (``check_and_add_async``): concurrent hooks share one database
    transaction, and a token sent twice within one batch is still accepted once."""
    import asyncio

    from mmcds.service.replay import replay_cache
    from mmcds.settings import Settings

    settings = Settings(home=tmp_path, **shared)  # type: ignore[arg-type]
    cache = replay_cache(settings)
    expires = time.time() + 300
    same = f"{ISSUER}|same-{time.time_ns()}"
    others = [f"{ISSUER}|other-{time.time_ns()}-{i}" for i in range(10)]

    async def claim_all() -> list[bool]:
        keys = [same] * 10 + others
        return list(await asyncio.gather(*(cache.check_and_add_async(k, expires) for k in keys)))

    results = asyncio.run(claim_all())
    assert sum(results[:10]) == 1  # the repeated key: exactly one claim wins
    assert results[10:] == [True] * 10  # distinct keys in the same batch are all new
    assert asyncio.run(claim_all()) == [False] * 20  # and all of them are now seen
    # the sync path (other entry points) sees the async claims
    assert cache.check_and_add(same, expires) is False


def test_a_stalled_replay_cache_refuses_within_the_deadline(
    pg_schema: Schema, ehr_key: ECKey
) -> None:
    """A replay cache that stops answering (a real PostgreSQL whose jti table another session
    holds locked) must not hold hooks: past the deadline the token is refused (fail closed),
    and the event loop stays free meanwhile."""
    import asyncio

    from mmcds.errors import AuthError
    from mmcds.service.auth import JwtVerifier
    from mmcds.service.replay import DatabaseReplayCache

    cache = DatabaseReplayCache(pg_schema.url)
    jwks = json.dumps({"keys": [ehr_key.as_dict(private=False)]})
    verifier = JwtVerifier({ISSUER: jwks}, replay=cache, replay_timeout_s=0.3)
    audience = PUBLIC + PATH

    async def verify() -> dict[str, object]:
        token = sign_hook_jwt(ehr_key, issuer=ISSUER, audience=audience, kid=KID)
        return await verifier.verify_async(f"Bearer {token}", audience)

    try:
        assert asyncio.run(verify())["jti"]  # a working cache admits
        stalled = asyncio.run(while_locked(pg_schema, "mmcds_seen_jti", verify))
        assert isinstance(stalled.error, AuthError) and "in time" in str(stalled.error)
        assert stalled.elapsed_s < 0.3 + 0.2 and stalled.loop_ticks >= 10
        assert asyncio.run(verify())["jti"]  # and admits again once it answers
    finally:
        cache.engine.dispose()
