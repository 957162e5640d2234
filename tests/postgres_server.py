"""A real PostgreSQL server for the tests of the registry's PostgreSQL backend, which load this
module as a pytest plugin (`pytest_plugins = ["postgres_server"]`): `postgres_server`, one
server for the whole session, and `postgres_url`, a fresh empty database for each test.

The server is Debian's package (`bash locks/apt.sh install` installs it at its locked version).
It listens on 127.0.0.1 only, on a free port, with password (SCRAM) authentication, and keeps
its data, sockets and log in a temporary directory that the session removes.
"""

from __future__ import annotations

import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL_HINT = "run `bash locks/apt.sh install` (Debian's postgresql, at its locked version)"
# initdb and postgres refuse to run as root; as root they run as the user of Debian's package.
SERVER_OWNER = "postgres"
READY_TIMEOUT_S = 30.0
# Durability is of no use to a test's database; without it initdb and each test run faster.
SETTINGS = dict(fsync="off", synchronous_commit="off", full_page_writes="off",
                max_connections="200")


def server_bindir() -> Path:
    """The directory of PostgreSQL's programs: `pg_config --bindir` when it names one that holds
    the server, else the newest of Debian's /usr/lib/postgresql/<major>/bin. Not PATH: Debian
    puts none of the server's programs there."""
    pg_config = shutil.which("pg_config") or "/usr/bin/pg_config"
    if os.access(pg_config, os.X_OK):
        found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        bindir = Path(found.stdout.strip())
        if found.returncode == 0 and (bindir / "postgres").is_file():
            return bindir
    majors = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                    key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else -1)
    if not majors:
        raise RuntimeError(f"PostgreSQL's server is not installed (no postgres program in "
                           f"pg_config --bindir or /usr/lib/postgresql/*/bin): {INSTALL_HINT}")
    return majors[-1].parent


def free_port() -> int:
    """A TCP port of 127.0.0.1 that no one listens on now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def utf8_locale() -> str:
    """C.UTF-8 where the C library has it, else C (the same byte-order collation, and a locale
    that takes any encoding)."""
    listed = subprocess.run(["locale", "-a"], capture_output=True, text=True).stdout.split()
    return "C.UTF-8" if any(name.lower() in ("c.utf8", "c.utf-8") for name in listed) else "C"


class PostgresServer:
    """One PostgreSQL server on 127.0.0.1:`port` whose superuser is `user` with `password`.

    `launch()` makes its data directory and starts it; a test asks for a database of its own
    with `new_database()`; `stop()` and `start()` take the server away and bring it back on the
    same port with the same data, for the tests of an unavailable registry; `close()` stops it
    and removes its directory at the end of the session.
    """

    host = "127.0.0.1"
    user = "cotune"

    def __init__(self, root: Path, bindir: Path):
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self._root = root
        self._bindir = bindir
        self._data = root / "data"
        self._log = root / "server.log"
        self._process: subprocess.Popen | None = None
        self._names = itertools.count(1)
        # Nothing of the caller's PG* variables (a PGHOST, PGPASSWORD, PGSERVICE of its own)
        # reaches these programs; the clients get this server's password.
        clean = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        self._server_env = clean
        self._client_env = dict(clean, PGPASSWORD=self.password, PGCONNECT_TIMEOUT="5")

    @classmethod
    def launch(cls) -> PostgresServer:
        """A new server, its data directory made by initdb, started and accepting connections.
        Whatever fails on the way, nothing stays running or on disk."""
        bindir = server_bindir()
        as_root = os.geteuid() == 0
        if as_root:
            try:
                pwd.getpwnam(SERVER_OWNER)
            except KeyError:
                raise RuntimeError(f"no {SERVER_OWNER!r} user to run PostgreSQL's server as "
                                   f"(Debian's package makes it): {INSTALL_HINT}") from None
        server = cls(Path(tempfile.mkdtemp(prefix="cotune-pg-")), bindir)
        try:
            if as_root:
                shutil.chown(server._root, SERVER_OWNER, SERVER_OWNER)
            server._initdb()
            server.start()
        except BaseException:
            server.close()
            raise
        return server

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def new_database(self) -> str:
        """Creates an empty database with a name of its own (from template0, which no test can
        have changed) and returns its URL."""
        name = f"cotune_test_{next(self._names)}"
        self._run(self._client("createdb", "--template=template0", name))
        return self.url(name)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Starts the server (nothing when it runs) and waits until it accepts connections."""
        if self.running:
            return
        settings = [f"--{key}={value}" for key, value in SETTINGS.items()]
        command = [self._bindir / "postgres", "-D", self._data, f"--port={self.port}",
                   f"--listen_addresses={self.host}",
                   f"--unix_socket_directories={self._root}", *settings]
        with open(self._log, "ab") as log:  # appended to: a restart's log follows the last
            self._process = subprocess.Popen(self._as_owner(command), stdout=log,
                                             stderr=subprocess.STDOUT, cwd=self._root,
                                             env=self._server_env)
        self._wait_ready()

    def stop(self) -> None:
        """Stops the server (nothing when it is stopped): its clients are disconnected at once
        (pg_ctl's fast mode), and connections are refused until `start()`."""
        if self.running:
            self._run([self._bindir / "pg_ctl", "stop", f"--pgdata={self._data}",
                       "--mode=fast", "--wait"], as_owner=True)
            self._process.wait(timeout=READY_TIMEOUT_S)
        self._process = None

    def close(self) -> None:
        """Stops the server and removes its directory, also when stopping it fails."""
        try:
            self.stop()
        finally:
            if self._process is not None:
                # the postmaster is runuser's child: killing runuser would leave it running
                subprocess.run(self._as_owner([self._bindir / "pg_ctl", "stop",
                                               f"--pgdata={self._data}", "--mode=immediate"]),
                               capture_output=True, cwd=self._root, env=self._server_env)
                self._process.kill()
                self._process.wait()
                self._process = None
            shutil.rmtree(self._root, ignore_errors=True)

    def _initdb(self) -> None:
        pwfile = self._root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, SERVER_OWNER, SERVER_OWNER)
        self._run([self._bindir / "initdb", f"--pgdata={self._data}", f"--username={self.user}",
                   f"--pwfile={pwfile}", "--auth=scram-sha-256", f"--locale={utf8_locale()}",
                   "--encoding=UTF8", "--no-sync", "--no-instructions"], as_owner=True)
        pwfile.unlink()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        ready = self._client("pg_isready", "--dbname=postgres", "--timeout=1")
        while True:
            if self._process.poll() is not None:
                code, self._process = self._process.returncode, None
                raise RuntimeError(f"PostgreSQL's server exited ({code}) on starting; "
                                   f"its log ends with:\n{self._log_tail()}")
            if subprocess.run(ready, capture_output=True, cwd=self._root,
                              env=self._client_env).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL's server did not accept connections on "
                                   f"{self.host}:{self.port} within {READY_TIMEOUT_S:.0f} s; "
                                   f"its log ends with:\n{self._log_tail()}")
            time.sleep(0.05)

    def _client(self, program: str, *args: str) -> list:
        return [self._bindir / program, f"--host={self.host}", f"--port={self.port}",
                f"--username={self.user}", *args]

    def _as_owner(self, command: list) -> list:
        # initdb, postgres and pg_ctl refuse root; the data directory is the owner's
        if os.geteuid() == 0:
            return ["runuser", "-u", SERVER_OWNER, "--", *command]
        return command

    def _run(self, command: list, as_owner: bool = False) -> None:
        """Runs one of PostgreSQL's programs: a server's one (initdb, pg_ctl) as the owner of
        the data, without the password; a client (createdb) as this process, with it."""
        env = self._server_env if as_owner else self._client_env
        done = subprocess.run(self._as_owner(command) if as_owner else command,
                              capture_output=True, text=True, cwd=self._root, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(command[0]).name} failed ({done.returncode}): "
                               f"{(done.stderr or done.stdout).strip()}")

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server; a test that stops it starts it again before it ends."""
    try:
        server = PostgresServer.launch()
    except RuntimeError as error:  # a failure, not a skip: CI installs the server
        raise pytest.fail.Exception(f"no PostgreSQL server for the tests: {error}",
                                    pytrace=False) from None
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The URL of a new empty database of the session's server, running again if a test before
    this one stopped it and failed before starting it."""
    postgres_server.start()
    return postgres_server.new_database()
