"""A real OAuth 2 token endpoint for the tests: authlib's authorization server (Flask).

SMART Backend Services as an EHR runs it: ``client_credentials`` with the client authenticated
by a ``private_key_jwt`` assertion (RFC 7523, checked by authlib against the client's
registered public key, ``jti`` never reused), JWT access tokens (RFC 9068) signed by the
server's own key and published at ``/jwks`` so the FHIR sandbox can check them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, InvalidClientError, grants
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from authlib.oauth2.rfc9068 import JWTBearerTokenGenerator
from flask import Flask, jsonify
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet
from werkzeug.serving import make_server

from mmcds.dev.servers import free_port

AUTH_METHOD = JWTBearerClientAssertion.CLIENT_AUTH_METHOD
SMART_ALGS = ["ES384", "RS384"]


@dataclass
class Client(ClientMixin):
    client_id: str
    public_jwks: dict[str, Any]
    scope: str

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return ""

    def get_allowed_scope(self, scope: str) -> str:
        allowed = set(self.scope.split())
        return " ".join(s for s in (scope or "").split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return False

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return endpoint == "token" and method == AUTH_METHOD

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "client_credentials"


class ClientCredentials(grants.ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = [AUTH_METHOD]


@dataclass
class TokenServer:
    """Run with ``with TokenServer() as ts:``; register clients with ``ts.register``."""

    expires_in: int = 300
    clients: dict[str, Client] = field(default_factory=dict)
    issued: list[str] = field(default_factory=list)  # every access token handed out
    refusals: int = 0

    def __post_init__(self) -> None:
        self.port = free_port()
        self.signing_key = ECKey.generate_key("P-256", parameters={"kid": "as-key-1"})
        self._seen_jti: set[str] = set()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    @property
    def jwks_url(self) -> str:
        return f"{self.base_url}/jwks"

    def register(self, client_id: str, public_key: Any, scope: str) -> None:
        jwks = KeySet([public_key]).as_dict(private=False)
        self.clients[client_id] = Client(client_id, jwks, scope)

    def _app(self) -> Flask:
        app = Flask("mmcds-test-token-server")
        server = AuthorizationServer(app, query_client=self.clients.get, save_token=self._save)
        owner = self

        class Assertion(JWTBearerClientAssertion):
            def get_audiences(self) -> list[str]:
                return [owner.token_url]

            def validate_jti(self, claims: Any, jti: str) -> bool:
                if jti in owner._seen_jti:
                    return False
                owner._seen_jti.add(jti)
                return True

            def process_assertion_claims(self, assertion: str, resolve_key: Any) -> Any:
                # SMART names ES384 and RS384; joserfc's default list leaves them out.
                try:
                    token = jwt.decode(assertion, resolve_key, algorithms=SMART_ALGS)
                except JoseError as exc:
                    raise InvalidClientError(description=exc.description) from exc
                self.verify_claims(token.claims)
                return token.claims

            def resolve_client_public_key(self, client: Client) -> KeySet:
                return KeySet.import_key_set(client.public_jwks)

        class Tokens(JWTBearerTokenGenerator):
            def get_jwks(self) -> KeySet:
                return KeySet([owner.signing_key])

        server.register_client_auth_method(AUTH_METHOD, Assertion())
        server.register_grant(ClientCredentials)
        server.register_token_generator(
            "default",
            Tokens(
                issuer=self.base_url,
                alg="ES256",  # the access token: between the AS and the FHIR server
                expires_generator=lambda client, grant_type: owner.expires_in,
            ),
        )

        @app.post("/token")
        def token() -> Any:
            response = server.create_token_response()
            if response.status_code != 200:
                owner.refusals += 1
            return response

        @app.get("/jwks")
        def jwks() -> Any:
            return jsonify(KeySet([self.signing_key]).as_dict(private=False))

        return app

    def _save(self, token: dict[str, Any], request: Any) -> None:
        self.issued.append(token["access_token"])

    def __enter__(self) -> TokenServer:
        self._server = make_server("127.0.0.1", self.port, self._app(), threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)
