"""``FaultyProxy``: faults the real FHIR sandbox cannot produce on demand, injected in front of it.

Every request is forwarded to the real sandbox unless a fault is armed for it:

- ``"error500"``: answer 500 without forwarding (a server in trouble);
- ``"slow"``: forward (the sandbox *does* commit), then answer only after ``delay_s`` (longer
  than the client's timeout: the client sees a timeout for a write that landed);
- ``"hold"``: forward, set ``answered`` once the sandbox has answered, then hold the answer
  until ``release`` is set (the client process can be killed in between).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from mmcds.dev.servers import free_port

FORWARDED = ("content-type", "accept", "authorization", "if-none-exist", "if-match", "prefer")


class WallClock:
    """Now, until the test moves it on (backoff and leases checked without sleeping)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class FaultyProxy:
    def __init__(self, upstream_base: str) -> None:
        self.upstream = upstream_base.split("/fhir/")[0]
        self.port = free_port()
        self.fault: str | None = None
        self.times = 0  # how many more requests the armed fault applies to
        self.methods = ("POST",)
        self.delay_s = 0.0
        self.answered = threading.Event()
        self.release = threading.Event()
        self.seen: list[str] = []  # "METHOD path" of every request
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir/R4"

    def arm(
        self,
        fault: str,
        *,
        times: int = 1,
        methods: tuple[str, ...] = ("POST",),
        delay_s: float = 0,
    ) -> None:
        with self._lock:
            self.fault, self.times, self.methods, self.delay_s = fault, times, methods, delay_s
            self.answered.clear()
            self.release.clear()

    def _take(self, method: str) -> str | None:
        with self._lock:
            if self.fault and self.times > 0 and method in self.methods:
                self.times -= 1
                return self.fault
            return None

    def __enter__(self) -> FaultyProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                proxy.seen.append(f"{self.command} {self.path.split('?')[0]}")
                fault = proxy._take(self.command)
                if fault == "error500":
                    return self._answer(500, b'{"resourceType":"OperationOutcome"}', {})
                headers = {k: v for k, v in self.headers.items() if k.lower() in FORWARDED}
                with httpx.Client(timeout=60) as client:
                    upstream = client.request(
                        self.command, proxy.upstream + self.path, content=body, headers=headers
                    )
                if fault == "slow":
                    threading.Event().wait(proxy.delay_s)
                if fault == "hold":
                    proxy.answered.set()
                    proxy.release.wait(60)
                kept = {"content-type": upstream.headers.get("content-type", "")}
                self._answer(upstream.status_code, upstream.content, kept)

            def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timed out, or was killed): as on a real server

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
