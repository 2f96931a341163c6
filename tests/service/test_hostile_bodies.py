"""Bodies the parser cannot take get a 400 with a message, never a 5xx; CORS preflight needs no
JWT; the OpenAPI document describes the bodies, and a schemathesis run over it finds no 5xx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from joserfc.jwk import ECKey

from mmcds.dev.servers import free_port
from mmcds.fusion.pipeline import Pipeline
from mmcds.service.api import create_app
from mmcds.service.auth import sign_hook_jwt
from mmcds.settings import Settings

ISSUER = "https://ehr.test.mmcds.local"  # tests/service/conftest.py
KID = "test-key-1"
BASE = "http://testserver"
PATHS = ["/cds-services/mmcds-patient-view", "/cds-services/mmcds-order-sign/feedback"]

HOSTILE: dict[str, tuple[bytes, str, str]] = {
    # name: (body, content type, words the 400 must carry)
    "nested-5000": (b'{"a":' * 5000 + b"1" + b"}" * 5000, "application/json", "nested"),
    "nested-arrays": (b"[" * 5000 + b"]" * 5000, "application/json", "nested"),
    "huge-integer": (b'{"hook": ' + b"9" * 20000 + b"}", "application/json", "number"),
    "huge-float": (b'{"hook": 1e999999}', "application/json", "number"),
    "nan": (b'{"hook": NaN}', "application/json", "NaN"),
    "duplicate-keys": (b'{"hook": "patient-view", "hook": "x"}', "application/json", "duplicate"),
    "text-plain": (b'{"hook": "patient-view"}', "text/plain", "Content-Type"),
    "form": (b"hook=patient-view", "application/x-www-form-urlencoded", "Content-Type"),
    "no-content-type": (b'{"hook": "patient-view"}', "", "Content-Type"),
    "not-utf8": (b'{"hook": "\xff\xfe"}', "application/json", "UTF-8"),
    "not-an-object": (b'["patient-view"]', "application/json", "object"),
    "truncated": (b'{"hook": "patient-view", "context": {', "application/json", "JSON"),
    "empty": (b"", "application/json", "JSON"),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_body_gets_400_with_a_message(name: str, path: str, call_hook: Any) -> None:
    body, content_type, words = HOSTILE[name]
    assert len(body) < 1_000_000  # well under the size bound: the parser is what is tested
    headers = {"Authorization": f"Bearer {call_hook.token(path)}"}
    if content_type:
        headers["Content-Type"] = content_type
    response = call_hook.client.post(path, content=body, headers=headers)
    assert response.status_code == 400, (name, response.status_code, response.text[:200])
    assert words.lower() in response.json()["error"].lower()


def test_cors_preflight_needs_no_jwt(call_hook: Any) -> None:
    for path in ["/cds-services", *PATHS]:
        preflight = call_hook.client.options(
            path,
            headers={
                "Origin": "https://ehr.example.org",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] in ("*", "https://ehr.example.org")
        allowed = preflight.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "content-type" in allowed
    discovery = call_hook.client.get("/cds-services", headers={"Origin": "https://ehr.example"})
    assert discovery.headers["access-control-allow-origin"] == "*"


def test_openapi_describes_request_and_response_bodies(call_hook: Any) -> None:
    document = call_hook.client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    for path, body, answer in [
        ("/cds-services/{service_id}", "HookRequest", "CardsResponse"),
        ("/cds-services/{service_id}/feedback", "FeedbackRequest", "FeedbackAnswer"),
    ]:
        post = document["paths"][path]["post"]
        ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{body}"
        ok = post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        assert ok == f"#/components/schemas/{answer}"
        assert {"400", "401", "413"} <= set(post["responses"])
    assert {"hook", "hookInstance", "context"} <= set(schemas["HookRequest"]["properties"])
    assert {"uuid", "summary", "indicator", "source"} <= set(schemas["Card"]["required"])
    assert "412" in document["paths"]["/cds-services/{service_id}"]["post"]["responses"]


@pytest.fixture(scope="module")
def api_schema(ehr_key: ECKey, pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The service's own OpenAPI document, over ASGI. Its FHIR server is down (a hook that
    passes every check answers 412 quickly rather than analysing)."""
    import json

    root: Path = tmp_path_factory.mktemp("schemathesis")
    dead = f"http://127.0.0.1:{free_port()}/fhir/R4"
    jwks = json.dumps({"keys": [ehr_key.as_dict(private=False)]})
    app = create_app(
        Settings(
            public_base_url=BASE,
            fhir_allowlist=[dead],
            fhir_base_url=dead,
            trusted_issuers={ISSUER: jwks},
            database_url=f"sqlite:///{root / 'service.db'}",
            model_dir=root / "models",
            fhir_timeout_s=0.5,
            replay_cache="memory",
        ),
        pipeline,
    )
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_schemathesis_finds_no_server_error(api_schema: Any, ehr_key: ECKey) -> None:
    """Every operation of the OpenAPI document, with generated parameters and bodies."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/cds-services",
        "/cds-services/{service_id}",
        "/cds-services/{service_id}/feedback",
    }
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def run(case: Any) -> None:
            # Signed for the exact endpoint, so generated bodies get past the JWT check and
            # reach the parser, the validators and the hook's own rules.
            audience = f"{BASE}{case.formatted_path}"
            token = sign_hook_jwt(ehr_key, issuer=ISSUER, audience=audience, kid=KID)
            response = case.call(headers={"Authorization": f"Bearer {token}"})
            # /readyz answers 503 by design here: this app's FHIR server is a dead port.
            not_ready = case.formatted_path == "/readyz" and response.status_code == 503
            assert response.status_code < 500 or not_ready, (
                case.method,
                case.formatted_path,
                response.text[:300],
            )

        run()
