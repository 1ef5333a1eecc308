"""A real, throw-away PostgreSQL server for the tests (not a mock).

``initdb`` into a temporary data directory (once per test process: a later server starts
on a copy of that fresh cluster, the same files ``initdb`` would write again), ``pg_ctl start`` listening on 127.0.0.1 only
at a free port, trust authentication for the test user, fsync off (the data is thrown
away); ``stop()`` shuts it down. Debian's ``postgresql`` is installed with apt-get when
missing and this runs as root under CI (``.ci/run`` does the same up front); elsewhere the
tests that need it are skipped with the reason. PostgreSQL refuses to run as root, so as
root the server runs as the ``postgres`` user the Debian package creates.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "gradsweep"


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def ensure_installed() -> str | None:
    """The directory holding initdb / pg_ctl, or None (with apt-get tried under CI)."""
    if _bin("initdb") is None and os.environ.get("CI") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"],
                       env=env, capture_output=True)  # fmt: skip
    initdb = _bin("initdb")
    return str(Path(initdb).parent) if initdb else None


_TEMPLATE: list[Path] = []  # the data directory initdb wrote once for this test process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    def __init__(self, base: Path) -> None:
        bindir = ensure_installed()
        if bindir is None:
            raise RuntimeError("PostgreSQL (initdb, pg_ctl) is not installed")
        self.bindir, self.base = Path(bindir), base
        self.data, self.sock = base / "data", base / "sock"
        self.port = _free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            self._as = ["runuser", "-u", "postgres", "--"]
            pw = pwd.getpwnam("postgres")
            for d in (base, self.sock):
                d.mkdir(parents=True, exist_ok=True)
                os.chown(d, pw.pw_uid, pw.pw_gid)
        else:
            self.sock.mkdir(parents=True, exist_ok=True)

    def _run(self, *args: str) -> None:
        res = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args[:2])} failed: {res.stdout[-1500:]}{res.stderr[-1500:]}"
            )

    def _initdb(self, data: Path) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(data), "-U", USER,
                  "--auth=trust", "-E", "UTF8", "--no-sync")  # fmt: skip

    def _template(self) -> Path:
        """A fresh cluster written by initdb once per test process (never started)."""
        if not _TEMPLATE:
            base = Path(tempfile.mkdtemp(prefix="gradsweep-pg-template-"))
            atexit.register(shutil.rmtree, base, ignore_errors=True)
            if self._as:
                pw = pwd.getpwnam("postgres")
                os.chown(base, pw.pw_uid, pw.pw_gid)
            self._initdb(base / "data")
            _TEMPLATE.append(base / "data")
        return _TEMPLATE[0]

    def start(self) -> PgServer:
        """A new cluster (a copy of the initdb template, owner and modes kept), started."""
        self._run("cp", "-a", str(self._template()), str(self.data))
        self.resume()
        return self

    def resume(self) -> None:
        """Start the server on its existing data directory (after :meth:`pause`)."""
        opts = (f"-h 127.0.0.1 -p {self.port} -k {self.sock} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")  # fmt: skip
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.base / "server.log"), "-o", opts, "-w", "-t", "60", "start")  # fmt: skip

    def pause(self) -> None:
        """Shut the server down (fast: open connections are terminated), data kept."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        """``pg_ctl restart``: down and up again in about a second."""
        # -l: the server's output to its log, not to our pipe (which would never close)
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.base / "server.log"), "-m", "fast", "-w", "-t", "60", "restart")  # fmt: skip

    def create_db(self, name: str) -> str:
        """A fresh database; returns its SQLAlchemy URL (plain ``postgresql://``)."""
        psql = _bin("psql") or "psql"
        res = subprocess.run(
            [psql, "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "-d", "postgres",
             "-v", "ON_ERROR_STOP=1", "-c", f'CREATE DATABASE "{name}"'],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if res.returncode != 0:
            raise RuntimeError(f"CREATE DATABASE {name} failed: {res.stderr[-1500:]}")
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        subprocess.run([*self._as, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m",
                        "immediate", "stop"], capture_output=True, timeout=60)  # fmt: skip
