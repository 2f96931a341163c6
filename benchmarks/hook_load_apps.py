"""The two apps ``hook_load.py`` serves with real uvicorn processes (``--factory``).

- ``service``: the mmcds CDS Hooks app, settings from ``MMCDS_*`` variables (as ``mmcds serve``).
- ``bare``: the baseline, a bare FastAPI endpoint that parses the JSON body and returns the card
  in ``HOOK_LOAD_CARD`` (a file): the same response size, none of the work.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from mmcds.service.api import create_app
from mmcds.settings import Settings


def service() -> FastAPI:
    return create_app(Settings())


def bare() -> FastAPI:
    cards = json.loads(Path(os.environ["HOOK_LOAD_CARD"]).read_text())
    app = FastAPI()

    @app.post("/cds-services/{service_id}")
    async def hook(service_id: str, request: Request) -> Any:
        await request.json()
        return cards

    return app
