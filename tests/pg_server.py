"""A real PostgreSQL server for tests, started on loopback and stopped after the session.

Fixtures: ``postgres_server`` (session: a throw-away cluster in a temporary directory, as the unprivileged
``postgres`` user when the tests run as root) and ``postgres_url`` (a fresh, empty database on it for each
test). Both skip, saying what to install, when the server binaries (Debian package ``postgresql``) or
psycopg are absent. ``.ci/run`` installs the package; nothing here touches the system's own cluster.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL_HINT = "PostgreSQL server binaries not found; install them with `apt-get install postgresql` (Debian)"


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path  # the temporary directory holding the data directory, socket and log
    port: int
    user: str = "tuneloop"

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"


def find_bin_dir() -> Path | None:
    """The directory with ``initdb`` and ``pg_ctl``: Debian's ``/usr/lib/postgresql/<v>/bin`` (newest), or PATH."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run the server's own commands as ``postgres`` then."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def _run(cmd: list[str], what: str, timeout: float = 120) -> None:
    # cwd "/": the server user may not be allowed into the caller's working directory.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")


def start_server(bin_dir: Path) -> PostgresServer:
    """initdb a cluster in a new temporary directory and start it on 127.0.0.1 at a free port."""
    # Under /tmp itself (not pytest's 0700 tmp dir, nor a private $TMPDIR) so that the unprivileged server
    # user can reach it.
    root = Path(tempfile.mkdtemp(prefix="tuneloop-pg-", dir="/tmp" if os.path.isdir("/tmp") else None))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    _run(
        _as_server_user(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "tuneloop", "--auth=trust", "-E", "UTF8", "--no-sync"]
        ),
        "initdb",
    )
    last_error: Exception | None = None
    for _ in range(3):  # another process may take the free port between the probe and the start
        port = free_port()
        opts = f"-h 127.0.0.1 -p {port} -k {root} -F -c max_connections=100"
        try:
            _run(
                _as_server_user(
                    [
                        str(bin_dir / "pg_ctl"),
                        "-D",
                        str(data),
                        "-l",
                        str(root / "server.log"),
                        "-w",
                        "-t",
                        "60",
                        "-o",
                        opts,
                        "start",
                    ]
                ),
                "pg_ctl start",
            )
            return PostgresServer(bin_dir, root, port)
        except RuntimeError as exc:
            last_error = exc
    log = (root / "server.log").read_text(errors="replace")[-2000:] if (root / "server.log").exists() else ""
    shutil.rmtree(root, ignore_errors=True)
    raise RuntimeError(f"could not start PostgreSQL: {last_error}\nserver log:\n{log}")


def stop_server(server: PostgresServer) -> None:
    try:
        _run(
            _as_server_user(
                [str(server.bin_dir / "pg_ctl"), "-D", str(server.root / "data"), "-m", "fast", "-w", "stop"]
            ),
            "pg_ctl stop",
            timeout=60,
        )
    finally:
        shutil.rmtree(server.root, ignore_errors=True)


def stop_cluster(server: PostgresServer) -> None:
    """Stop the server (fast shutdown: open connections are cut), keeping its data: an outage."""
    _run(
        _as_server_user([str(server.bin_dir / "pg_ctl"), "-D", str(server.root / "data"), "-m", "fast", "-w", "stop"]),
        "pg_ctl stop",
        timeout=60,
    )


def start_cluster(server: PostgresServer) -> None:
    """Start a stopped server again on the same port (the end of an outage)."""
    opts = f"-h 127.0.0.1 -p {server.port} -k {server.root} -F -c max_connections=100"
    _run(
        _as_server_user(
            [
                str(server.bin_dir / "pg_ctl"),
                "-D",
                str(server.root / "data"),
                "-l",
                str(server.root / "server.log"),
                "-w",
                "-t",
                "60",
                "-o",
                opts,
                "start",
            ]
        ),
        "pg_ctl start",
    )


def create_database(server: PostgresServer, name: str | None = None) -> str:
    """A new empty database on ``server``; returns its URL."""
    import psycopg

    name = name or f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server.url(name)


@pytest.fixture(scope="session")
def postgres_server():
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip(INSTALL_HINT)
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root needs `runuser` (util-linux) to start PostgreSQL as the postgres user")
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip(
                "running as root needs a `postgres` user (the Debian package creates it): apt-get install postgresql"
            )
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install 'tuneloop[postgres]'")
    server = start_server(bin_dir)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def own_postgres_server():
    """A server of this test module's own, for tests that stop and start it (an outage) without touching the
    session's shared one."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip(INSTALL_HINT)
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root needs `runuser` (util-linux) to start PostgreSQL as the postgres user")
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install 'tuneloop[postgres]'")
    server = start_server(bin_dir)
    yield server
    try:
        start_cluster(server)  # stop_server expects it running; a test may have left it stopped
    except RuntimeError:
        pass
    stop_server(server)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """``postgresql://...`` of a fresh, empty database for this test."""
    return create_database(postgres_server)
