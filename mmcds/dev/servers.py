"""Start the real test servers: the FHIR sandbox (Medplum engine) and Orthanc with DICOMweb.

Used by the test fixtures and by ``mmcds demo``. Each server runs as a child process on free
local ports with its own throw-away state, is reachable once its health URL answers, and is
stopped (and waited for) on exit, including when start-up fails half-way.

    with FhirSandbox() as fhir, OrthancPacs() as pacs:
        httpx.get(f"{fhir.base_url}/Patient")
        httpx.get(f"{pacs.dicomweb_url}/studies", auth=pacs.auth)
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import httpx

from mmcds.errors import ConfigurationError, UpstreamUnavailable

# The sandbox is a development server that lives in the checkout (deploy/sandbox), not in the
# installed package; MMCDS_SANDBOX_DIR points elsewhere.
SANDBOX_DIR = Path(
    os.environ.get("MMCDS_SANDBOX_DIR")
    or Path(__file__).resolve().parents[2] / "deploy" / "sandbox"
)
ORTHANC_PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
ORTHANC_PLUGINS = ("libOrthancDicomWeb.so", "libOrthancGdcm.so")
ORTHANC_INSTALL_HINT = "install with: apt-get install -y orthanc orthanc-dicomweb orthanc-gdcm"


class ServerUnavailable(ConfigurationError):
    """A prerequisite (Node.js, npm, the Orthanc binary or plugins) is not installed."""


class ServerStartError(UpstreamUnavailable):
    """The server process was started but did not become ready."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (another process could still take it before we bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # Linux: the child gets SIGTERM if the Python process dies (even by SIGKILL), so a crashed
    # test run leaves no server behind. The kernel ties this to the *thread* that started the
    # child: start servers from the main thread or a long-lived one.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _ChildServer(abc.ABC):
    """A child process with a log file, a readiness probe and a clean stop."""

    name = "server"
    stop_timeout_s = 15.0

    def __init__(self, host: str, startup_timeout_s: float) -> None:
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._log: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def workdir(self) -> Path:
        if self._tmp is None:
            raise RuntimeError(f"{self.name} is not started")
        return Path(self._tmp.name)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def rss_bytes(self) -> int | None:
        """Resident memory of the server process (Linux only), for measurements."""
        if self._proc is None:
            return None
        try:
            status = Path(f"/proc/{self._proc.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return None

    def log_tail(self, lines: int = 30) -> str:
        if self._tmp is None:
            return ""
        try:
            text = (self.workdir / "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _spawn(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self._log = (self.workdir / "server.log").open("wb")
        self._proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, **env} if env else None,
            stdin=subprocess.DEVNULL,
            stdout=self._log,  # a file, not a pipe: a chatty server cannot block on a full pipe
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def _wait_ready(self, url: str, auth: tuple[str, str] | None = None) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with code {self._proc.returncode} during start-up; "
                    f"its output:\n{self.log_tail()}"
                )
            try:
                if httpx.get(url, auth=auth, timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"{self.name} did not answer {url} within {self.startup_timeout_s:.0f} s; "
                    f"its output:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stops the process, waits for it to exit, removes its temporary files."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        # Entering a server already started with .start() just adopts it for the stop on exit.
        return self if self._proc is not None else self.start()

    def start(self) -> Self:
        if self._proc is not None:
            raise RuntimeError(f"{self.name} is already running (pid {self._proc.pid})")
        try:
            self._tmp = tempfile.TemporaryDirectory(prefix="mmcds-server-")
            self._start()
        except BaseException:
            self.stop()  # nothing half-started stays behind
            raise
        return self

    @abc.abstractmethod
    def _start(self) -> None:
        """Launch the process (subclasses: the sandbox, Orthanc)."""

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class FhirSandbox(_ChildServer):
    """The Node FHIR R4 sandbox in ``deploy/sandbox`` (in-memory; for tests and demos).

    ``env`` passes the sandbox's settings (``deploy/sandbox/README.md``), e.g. ``AUTH_JWKS_URL``
    to require bearer tokens or ``MAX_BODY_BYTES`` to bound requests; none by default.
    """

    name = "FHIR sandbox"

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 60.0,
        sandbox_dir: Path = SANDBOX_DIR,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(host, startup_timeout_s)
        self.port = port or free_port(host)
        self.sandbox_dir = sandbox_dir
        self.env = dict(env or {})

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/fhir/R4"

    def _start(self) -> None:
        node = shutil.which("node")
        if node is None:
            raise ServerUnavailable(
                "The FHIR sandbox needs Node.js >= 20 ('node' is not on PATH): install it, "
                "or point MMCDS_FHIR_BASE_URL at a FHIR R4 server"
            )
        self._install_packages()
        self._spawn([node, "server.mjs", str(self.port)], cwd=self.sandbox_dir, env=self.env)
        self._wait_ready(f"{self.base_url}/metadata")

    def _install_packages(self) -> None:
        if (self.sandbox_dir / "node_modules" / "@medplum" / "fhir-router").is_dir():
            return
        npm = shutil.which("npm")
        if npm is None:
            raise ServerUnavailable(
                f"'npm' is not on PATH; install Node.js >= 20 with npm, then run "
                f"'npm ci' in {self.sandbox_dir}"
            )
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=self.sandbox_dir,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
            raise ServerStartError(f"'npm ci' failed in {self.sandbox_dir}:\n{tail}")

    def reset(self) -> None:
        """Deletes every resource (POST [base]/$reset)."""
        httpx.post(f"{self.base_url}/$reset", timeout=10.0).raise_for_status()

    def reset_log(self) -> None:
        """Forgets the requests logged so far, keeping the resources (DELETE [base]/$requests)."""
        httpx.delete(f"{self.base_url}/$requests", timeout=10.0).raise_for_status()

    def requests(self) -> list[dict[str, object]]:
        """The requests served since the last reset, oldest first: ``method``, ``url`` (path and
        query), ``bearer`` (whether a bearer token came). GET [base]/$requests."""
        response = httpx.get(f"{self.base_url}/$requests", timeout=10.0)
        response.raise_for_status()
        return [json.loads(p["valueString"]) for p in response.json().get("parameter") or []]


class OrthancPacs(_ChildServer):
    """Orthanc with the DICOMweb and GDCM plugins, its storage in a temporary folder.

    The Debian package may run a system Orthanc on 8042/4242; this one never uses those ports
    unless asked, and never shares its storage (a second Orthanc on the same storage fails with
    "database is locked").
    """

    name = "Orthanc"

    def __init__(
        self,
        port: int | None = None,
        *,
        dicom_port: int | None = None,
        user: str = "mmcds",
        password: str = "mmcds-test",
        host: str = "127.0.0.1",
        startup_timeout_s: float = 30.0,
        binary: str = "Orthanc",
        plugin_dir: Path = ORTHANC_PLUGIN_DIR,
    ) -> None:
        super().__init__(host, startup_timeout_s)
        self.port = port or free_port(host)
        self.dicom_port = dicom_port or free_port(host)
        self.user = user
        self.password = password
        self.binary = binary
        self.plugin_dir = plugin_dir

    @property
    def base_url(self) -> str:
        """Orthanc's own REST API."""
        return f"http://{self.host}:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        """DICOMweb root (QIDO-RS, WADO-RS, STOW-RS), without a trailing slash."""
        return f"{self.base_url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.user, self.password)

    def config(self) -> dict[str, object]:
        return {
            "Name": "mmcds-test-pacs",
            "HttpPort": self.port,
            "DicomPort": self.dicom_port,
            "DicomAet": "MMCDS",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [str(self.plugin_dir / name) for name in ORTHANC_PLUGINS],
            "RemoteAccessAllowed": False,  # loopback only: the test PACS holds PHI-shaped data
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }

    def _start(self) -> None:
        binary = shutil.which(self.binary)
        if binary is None:
            raise ServerUnavailable(
                f"Orthanc binary '{self.binary}' not found; {ORTHANC_INSTALL_HINT}"
            )
        missing = [n for n in ORTHANC_PLUGINS if not (self.plugin_dir / n).is_file()]
        if missing:
            raise ServerUnavailable(
                f"Orthanc plugins missing in {self.plugin_dir}: {', '.join(missing)}; "
                f"{ORTHANC_INSTALL_HINT}"
            )
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        self._spawn([binary, str(config_path)], cwd=self.workdir)
        self._wait_ready(f"{self.base_url}/system", auth=self.auth)

    def reset(self) -> None:
        """Deletes every patient (and so every study, series and instance)."""
        with httpx.Client(base_url=self.base_url, auth=self.auth, timeout=30.0) as client:
            patients = client.get("/patients")
            patients.raise_for_status()
            for patient_id in patients.json():
                client.delete(f"/patients/{patient_id}").raise_for_status()
