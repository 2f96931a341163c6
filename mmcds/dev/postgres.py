"""A throw-away PostgreSQL server for tests on machines where none answers at 127.0.0.1:5432.

Debian's ``postgresql`` package brings ``initdb`` and ``pg_ctl``; this initialises a cluster in
a temporary folder (trust authentication, loopback only, a socket in the same folder), starts
it on a free port, creates the ``test`` database and removes everything on exit. PostgreSQL
refuses to run as root, so under root the cluster belongs to the ``postgres`` system user the
package created.

    with ThrowawayPostgres() as pg:
        engine = create_engine(pg.url)  # postgresql+psycopg://postgres@127.0.0.1:<port>/test
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg

from mmcds.dev.servers import ServerStartError, ServerUnavailable, free_port

INSTALL_HINT = "install with: apt-get install -y postgresql"


def _bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if not found:
        raise ServerUnavailable(f"PostgreSQL's {name} not found; {INSTALL_HINT}")
    return found


class ThrowawayPostgres:
    def __init__(self, database: str = "test") -> None:
        self.database = database
        self.port = free_port()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._data: Path | None = None
        self._user: str | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = ["runuser", "-u", self._user, "--", *args] if self._user else list(args)
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    def start(self) -> Self:
        initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
        self._tmp = tempfile.TemporaryDirectory(prefix="mmcds-pg-")
        root = Path(self._tmp.name)
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise ServerUnavailable(
                    f"no 'postgres' user to run PostgreSQL as; {INSTALL_HINT}"
                ) from exc
            self._user = "postgres"
            os.chown(root, owner.pw_uid, owner.pw_gid)
        self._data = root / "data"
        steps = [
            (initdb, "-D", str(self._data), "-U", "postgres", "--auth=trust", "-E", "UTF8"),
            (
                pg_ctl, "-D", str(self._data), "-l", str(root / "server.log"), "-w", "-t", "60",
                "-o", f"-p {self.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
                "start",
            ),
        ]  # fmt: skip
        for step in steps:
            done = self._run(*step)
            if done.returncode != 0:
                log = root / "server.log"
                tail = log.read_text()[-2000:] if log.is_file() else ""
                self.stop()
                raise ServerStartError(f"{Path(step[0]).name} failed: {done.stderr[-2000:]}{tail}")
        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')
        return self

    def stop(self) -> None:
        if self._data is not None and (self._data / "postmaster.pid").is_file():
            self._run(_bin("pg_ctl"), "-D", str(self._data), "-m", "fast", "-w", "stop")
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        return self.start() if self._tmp is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
