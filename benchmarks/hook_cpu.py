"""CPU per warm hook, the service's ASGI app called in-process, against the bare endpoint.

    .venv/bin/python benchmarks/hook_cpu.py [--n 600] [--clients 8] [--rounds 4] [--profile]

No sockets, no uvicorn, no load generator: each call is a hand-made ASGI request, so what is
timed is the app's own CPU for one warm ``patient-view`` hook (bounded body, ES384 JWT check,
replay claim in the SQLite replay cache, the stored answer read with
``MMCDS_CURRENCY_CHECK=notifications``, review link, response) and the same for the bare
FastAPI endpoint of ``hook_load_apps.py`` returning a card of the same size. ``process_time``
counts every thread of the process (the replay claim's writer too). On a shared machine the
CPU a run gets varies by the minute: each side runs ``--rounds`` times, taking turns, and the
least CPU of each is printed (the least disturbed run). ``--profile`` prints cProfile's view
of one round of hooks. Nothing here contacts the FHIR server named in the hooks. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from joserfc.jwk import ECKey
from starlette.types import ASGIApp, Message

from mmcds.service.analysis_store import StoredAnswer
from mmcds.service.api import create_app
from mmcds.service.auth import sign_hook_jwt
from mmcds.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hook_load_apps  # noqa: E402 - the bare endpoint, as hook_load.py serves it

ISSUER, KID = "https://ehr.cpu.mmcds.local", "cpu-key"
FHIR = "http://fhir.cpu.mmcds.local/fhir/R4"  # allow-listed, never called
BASE = "http://127.0.0.1:8999"
PATH = "/cds-services/mmcds-patient-view"


def stored_card() -> dict[str, Any]:
    """A card of the demo's shape and about its size (2.3 KB)."""
    line = (
        "**Pneumonia**: moderate (41%, calibrated). Evidence: right lower zone opacity on the "
        "radiograph; note of 2026-11-30: 'productive cough, fever 38.6'; CRP 96 mg/L (high).\n\n"
    )
    return {
        "uuid": str(uuid.uuid4()),
        "summary": "AI summary (UNTRAINED model, no clinical meaning): review inputs manually",
        "indicator": "info",
        "detail": line * 11,
        "source": {"label": "mmcds fusion-demo", "url": f"{BASE}/model-card"},
        "overrideReasons": [
            {"code": c, "system": "urn:mmcds:override-reason", "display": c}
            for c in ("disagree", "already-known", "poor-input")
        ],
    }


async def call(app: ASGIApp, body: bytes, token: str) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8999"),
            (b"authorization", f"Bearer {token}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8999),
        "state": {},
    }
    received = False
    status = 0

    async def receive() -> Message:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def cpu_of(app: ASGIApp, body: bytes, tokens: list[str], clients: int) -> float:
    """CPU seconds of the process while ``clients`` concurrent callers send ``tokens``."""
    todo = iter(tokens)

    async def client() -> None:
        for token in todo:
            status = await call(app, body, token)
            if status != 200:
                raise RuntimeError(f"answered {status}")

    started = time.process_time()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600, help="hooks per round")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--replay", default="database", choices=["database", "memory"])
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    key = ECKey.generate_key("P-384", parameters={"kid": KID})
    tmp = tempfile.mkdtemp(prefix="mmcds-hook-cpu-")
    settings = Settings(
        public_base_url=BASE,
        fhir_allowlist=[FHIR],
        fhir_base_url=FHIR,
        trusted_issuers={ISSUER: json.dumps({"keys": [key.as_dict(private=False)]})},
        database_url=f"sqlite:///{tmp}/service.db",
        currency_check="notifications",
        replay_cache=args.replay,
        home=Path(tmp),
    )
    app = create_app(settings)
    app.state.analysis.analyses.put_answer(StoredAnswer(FHIR, "p1", "a" * 64, "f", [stored_card()]))
    card_file = Path(tmp) / "card.json"
    card_file.write_text(json.dumps({"cards": [stored_card()]}))
    os.environ["HOOK_LOAD_CARD"] = str(card_file)
    bare = hook_load_apps.bare()
    body = json.dumps(
        {
            "hookInstance": str(uuid.uuid4()),
            "hook": "patient-view",
            "fhirServer": FHIR,
            "context": {"userId": "Practitioner/b", "patientId": "p1"},
        }
    ).encode()

    def tokens(n: int) -> list[str]:  # signed before timing, a fresh jti each
        return [
            sign_hook_jwt(key, issuer=ISSUER, audience=f"{BASE}{PATH}", kid=KID) for _ in range(n)
        ]

    async def measure() -> dict[str, Any]:
        hook_s, bare_s = [], []
        async with app.router.lifespan_context(app):
            await cpu_of(app, body, tokens(50), args.clients)  # warm-up
            await cpu_of(bare, body, tokens(50), args.clients)
            for r in range(args.rounds):
                signed = tokens(args.n)
                profile = cProfile.Profile() if args.profile and r == 0 else None
                if profile is not None:
                    profile.enable()
                hook_s.append(await cpu_of(app, body, signed, args.clients))
                if profile is not None:
                    profile.disable()
                    stats = pstats.Stats(profile, stream=sys.stderr)
                    stats.sort_stats("cumulative").print_stats(50)
                bare_s.append(await cpu_of(bare, body, signed, args.clients))
        per = [round(s / args.n * 1000, 3) for s in hook_s]
        per_bare = [round(s / args.n * 1000, 3) for s in bare_s]
        return {
            "clients": args.clients,
            "hooks_per_round": args.n,
            "replay_cache": args.replay,
            "hook_cpu_ms": min(per),
            "bare_cpu_ms": min(per_bare),
            "hook_cpu_ms_rounds": per,
            "bare_cpu_ms_rounds": per_bare,
            "load_average": os.getloadavg(),
        }

    print(json.dumps(asyncio.run(measure()), indent=1))


if __name__ == "__main__":
    main()
