"""Real database servers for the tests: throwaway ones, or external ones by URL.

PostgreSQL: a cluster with scram-sha-256 password authentication, started from
the installed server binaries on a free loopback port (as the `postgres` user
when the tests run as root), unless TEST_DATABASE_URL names a server.
MariaDB/MySQL: a throwaway mariadbd, unless TEST_MYSQL_URL names a server.
Each test then gets a database (and a role) of its own on the shared server.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

ADMIN_PASSWORD = "admin-" + secrets.token_hex(8)
ASYNC_DRIVERS = {"postgresql": "postgresql+asyncpg", "mysql": "mysql+asyncmy"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A running server and the admin URL to it (sync scheme, async driver)."""

    backend: str
    admin_url: URL
    # The directory of the server's Unix socket, when the suite started the server.
    socket_dir: Path | None = None

    def execute(self, *statements: str, database: str | None = None) -> list[tuple]:
        """Run statements as the admin, in autocommit; return the last one's rows."""
        url = self.admin_url if database is None else self.admin_url.set(database=database)
        return execute(url, *statements)

    def create_database(self, user: str | None = None, password: str | None = None) -> URL:
        """A new database, owned by a new role with `password` when given; its URL."""
        name = "t_" + secrets.token_hex(6)
        user = user or "u_" + secrets.token_hex(6)
        password = password if password is not None else secrets.token_urlsafe(12)
        if self.backend == "postgresql":
            self.execute(
                f'CREATE ROLE "{user}" LOGIN PASSWORD {pg_literal(password)}',
                f'CREATE DATABASE "{name}" OWNER "{user}"',
            )
        else:
            self.execute(
                f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4",
                f"CREATE USER '{user}'@'%' IDENTIFIED BY {mysql_literal(password)}",
                f"GRANT ALL ON `{name}`.* TO '{user}'@'%'",
            )
        return self.admin_url.set(username=user, password=password, database=name)

    @contextlib.contextmanager
    def holding(self, database: str, *statements: str) -> Iterator[None]:
        """Run `statements` in an open transaction of another session, until the block ends.

        The session is ended for sure afterwards: a backend whose client went away
        keeps its locks while it is busy (client_connection_check_interval is 0).
        """
        url = self.admin_url.set(drivername=ASYNC_DRIVERS[self.backend], database=database)
        started, release, failed = threading.Event(), threading.Event(), []

        async def hold() -> None:
            engine = create_async_engine(url, poolclass=NullPool)
            try:
                async with engine.connect() as connection:
                    for statement in statements:
                        await connection.execute(text(statement))
                    started.set()
                    await asyncio.to_thread(release.wait)
                    await connection.rollback()
            except BaseException as exc:
                failed.append(exc)
                started.set()
            finally:
                await engine.dispose()

        thread = threading.Thread(target=asyncio.run, args=(hold(),), daemon=True)
        thread.start()
        if not started.wait(30):
            release.set()
            raise TimeoutError(f"the holding session never got through {statements}")
        if failed:
            raise failed[0]
        try:
            yield
        finally:
            release.set()
            thread.join(30)

    def tables(self, url: URL) -> set[str]:
        """The tables in the database of `url`, as the admin sees them."""
        schema = "public" if self.backend == "postgresql" else url.database
        rows = self.execute(
            f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{schema}'",
            database=url.database,
        )
        return {row[0] for row in rows}


@dataclass
class SQLiteFiles:
    """SQLite's stand-in for a server: each database is a file in `directory`."""

    directory: Path
    backend: str = "sqlite"

    def create_database(self, user: str | None = None, password: str | None = None) -> URL:
        return URL.create("sqlite", database=str(self.directory / f"t_{secrets.token_hex(6)}.db"))

    def execute(self, statement: str, database: str) -> list[tuple]:
        """Run one statement on the database file; its rows."""
        with contextlib.closing(sqlite3.connect(database)) as connection:
            return connection.execute(statement).fetchall()

    def tables(self, url: URL) -> set[str]:
        if not Path(url.database).exists():
            return set()
        with contextlib.closing(sqlite3.connect(url.database)) as connection:
            rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return {row[0] for row in rows}


def execute(url: URL, *statements: str) -> list[tuple]:
    """Run statements as the user of `url`, in autocommit; return the last one's rows."""
    url = url.set(drivername=ASYNC_DRIVERS[url.get_backend_name()])

    async def run() -> list[tuple]:
        engine = create_async_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as connection:
                rows: list[tuple] = []
                for statement in statements:
                    result = await connection.execute(text(statement))
                    rows = [tuple(row) for row in result] if result.returns_rows else []
                return rows
        finally:
            await engine.dispose()

    return asyncio.run(run())


def url_string(url: URL) -> str:
    """`url` with its password, as users write it into DATABASE_URL."""
    return url.render_as_string(hide_password=False)


def component_variables(url: URL, prefix: str = "") -> dict[str, str]:
    """The {prefix}DATABASE_HOST/_PORT/_USER/_PASSWORD/_NAME variables for `url`."""
    parts = {"HOST": url.host, "PORT": url.port, "USER": url.username, "PASSWORD": url.password, "NAME": url.database}
    return {f"{prefix}DATABASE_{name}": str(value) for name, value in parts.items()}


def pg_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def mysql_literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _as_service_user(user: str) -> list[str]:
    """Servers refuse to run as root: run their commands as their own user."""
    return ["runuser", "-u", user, "--"] if os.geteuid() == 0 else []


def _wait_for_port(port: int, deadline: float, log: Path) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not start:\n{log.read_text(errors='replace')[-2000:]}")


def postgres_bindir() -> Path:
    for candidate in (shutil.which("initdb"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[::-1]):
        if candidate:
            return Path(candidate).resolve().parent
    raise RuntimeError("no PostgreSQL server binaries (initdb); install them or set TEST_DATABASE_URL")


@contextlib.contextmanager
def postgres_cluster() -> Iterator[Server]:
    """A throwaway PostgreSQL cluster with password (scram-sha-256) authentication."""
    bindir = postgres_bindir()
    run_as = _as_service_user("postgres")
    root = Path(tempfile.mkdtemp(prefix="pg-"))
    data, pwfile, log = root / "data", root / "pwfile", root / "log"
    pwfile.write_text(ADMIN_PASSWORD)
    if run_as:
        shutil.chown(root, "postgres")
        shutil.chown(pwfile, "postgres")
    port = free_port()
    # A self-signed certificate, so that ?sslmode=require can be tested for real.
    subprocess.run(
        ["openssl", "req", "-new", "-x509", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-keyout", root / "server.key", "-out", root / "server.crt"],
        check=True, capture_output=True,
    )  # fmt: skip
    (root / "server.key").chmod(0o600)
    if run_as:
        shutil.chown(root / "server.key", "postgres")
        shutil.chown(root / "server.crt", "postgres")
    try:
        subprocess.run(
            [*run_as, bindir / "initdb", "-D", data, "-U", "postgres", "--auth=scram-sha-256",
             f"--pwfile={pwfile}", "--no-sync", "-E", "UTF8", "--locale=C"],
            check=True, capture_output=True,
        )  # fmt: skip
        options = (
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
            f" -c ssl=on -c ssl_cert_file={root}/server.crt -c ssl_key_file={root}/server.key"
        )
        subprocess.run(
            [*run_as, bindir / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "start"],
            check=True, capture_output=True,
        )  # fmt: skip
        yield Server(
            "postgresql",
            URL.create("postgresql", "postgres", ADMIN_PASSWORD, "127.0.0.1", port, "postgres"),
            socket_dir=root,
        )
    finally:
        subprocess.run([*run_as, bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def mariadb_server() -> Iterator[Server]:
    """A throwaway MariaDB server with a root password, on a free loopback port."""
    mariadbd = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin:/usr/local/sbin")
    install_db = shutil.which("mariadb-install-db")
    client = shutil.which("mariadb")
    if not (mariadbd and install_db and client):
        raise RuntimeError("no MariaDB server binaries (mariadbd); install them or set TEST_MYSQL_URL")
    run_as = _as_service_user("mysql")
    root = Path(tempfile.mkdtemp(prefix="mariadb-"))
    data, log, sock = root / "data", root / "log", root / "mysqld.sock"
    if run_as:
        shutil.chown(root, "mysql")
    port = free_port()
    process = None
    try:
        subprocess.run(
            [*run_as, install_db, f"--datadir={data}", "--auth-root-authentication-method=normal",
             "--skip-test-db", "--skip-name-resolve"],
            check=True, capture_output=True,
        )  # fmt: skip
        with open(log, "wb") as log_file:
            process = subprocess.Popen(
                [*run_as, mariadbd, "--no-defaults", f"--datadir={data}", f"--port={port}",
                 f"--socket={sock}", "--bind-address=127.0.0.1", "--skip-name-resolve",
                 "--innodb-flush-log-at-trx-commit=0", "--skip-log-bin"],
                stdout=log_file, stderr=subprocess.STDOUT,
            )  # fmt: skip
        _wait_for_port(port, time.monotonic() + 60, log)
        # Set up through the socket: a TCP root with a password, as on a real server.
        password = mysql_literal(ADMIN_PASSWORD)
        setup = (
            "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1';"
            f"ALTER USER 'root'@'127.0.0.1' IDENTIFIED BY {password};"
            "GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;"
        )
        subprocess.run([client, f"--socket={sock}", "-uroot", "-e", setup], check=True, capture_output=True)
        yield Server("mysql", URL.create("mysql", "root", ADMIN_PASSWORD, "127.0.0.1", port))
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def external_server(url: str) -> Iterator[Server]:
    """A server given by URL (its user must be able to create databases and roles)."""
    parsed = make_url(url)
    backend = "mysql" if parsed.get_backend_name() in ("mysql", "mariadb") else "postgresql"
    yield Server(backend, parsed.set(drivername=backend))


class SilentProxy:
    """A TCP forwarder on a loopback port in front of `target_port`. After silence(), it
    passes nothing more either way while keeping every connection open: a network
    that went silent, as a client or a server behind a dead link sees it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.silent = threading.Event()
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def silence(self) -> None:
        self.silent.set()

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if self.silent.is_set():
                    return  # swallowed, and nothing more is read: the link is dead
                sink.sendall(data)


@contextlib.contextmanager
def silent_proxy(target_port: int) -> Iterator[SilentProxy]:
    proxy = SilentProxy(target_port)
    try:
        yield proxy
    finally:
        proxy.close()


@contextlib.contextmanager
def pgbouncer(server: Server, database_url: URL) -> Iterator[URL]:
    """PgBouncer in transaction mode in front of `server`, for the database of `database_url`."""
    binary = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if binary is None:
        raise RuntimeError("no pgbouncer binary; install it (Debian package pgbouncer)")
    run_as = _as_service_user("postgres")
    root = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    port = free_port()
    user, password = database_url.username, database_url.password
    (root / "userlist.txt").write_text(f'"{user}" "{password.replace(chr(34), chr(34) * 2)}"\n')
    (root / "pgbouncer.ini").write_text(
        f"""[databases]
{database_url.database} = host=127.0.0.1 port={server.admin_url.port} dbname={database_url.database}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {root}/userlist.txt
pool_mode = transaction
logfile = {root}/pgbouncer.log
pidfile = {root}/pgbouncer.pid
"""
    )
    if run_as:
        for path in (root, *root.iterdir()):
            shutil.chown(path, "postgres")
    process = subprocess.Popen(
        [*run_as, binary, root / "pgbouncer.ini"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        _wait_for_port(port, time.monotonic() + 30, root / "pgbouncer.log")
        yield database_url.set(port=port)
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)
