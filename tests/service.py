"""A rendered PostgreSQL service and its database, as the production tests use them.

With AGAINST_STOCK=1 the `service` fixture (conftest.py) also runs every production
test on the stock `alembic init -t async` env.py, wired to the same settings, where it
is expected to fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import alembic
from sqlalchemy.engine import URL

from rendering import Project, subprocess_env
from servers import Server, url_string

# Every character that breaks a URL or ConfigParser interpolation, and non-ASCII.
SECRET = "pä ss%w@rd:/#?+"
APPLICATION_NAME = "my-service-migrations"
FLAVORS = ["ours", "stock"] if os.environ.get("AGAINST_STOCK") else ["ours"]
STOCK_WIRING = """config = context.config
from {package}.settings import DatabaseSettings  # noqa: E402
config.set_main_option(
    "sqlalchemy.url", DatabaseSettings.load().async_url().render_as_string(hide_password=False).replace("%", "%%")
)
"""


def use_stock_env(project: Project) -> None:
    """Replace the project's env.py by the stock async one, its URL from our settings."""
    stock = Path(alembic.__file__).parent / "templates" / "async" / "env.py"
    source = stock.read_text().replace("config = context.config\n", STOCK_WIRING.format(package=project.package))
    (project.path / "migrations" / "env.py").write_text(source)


@dataclass
class Service:
    """A rendered project, its database (owned by a role with a special password), and the env that points at it."""

    project: Project
    server: Server
    url: URL

    @property
    def env(self) -> dict[str, str]:
        return {"DATABASE_URL": url_string(self.url)}

    @property
    def lock_key(self) -> int:
        return zlib.crc32(f"{self.project.package}:alembic".encode())

    def alembic(
        self, *args: str, timeout: float = 120, network: bool = True, **env: str
    ) -> subprocess.CompletedProcess:
        return self.project.cli(*args, env={**self.env, **env}, timeout=timeout, network=network)

    def start(self, *args: str, log: Path, **env: str) -> subprocess.Popen:
        """`alembic ARGS` in the background, its stdout and stderr into `log`."""
        with open(log, "w") as output:
            return subprocess.Popen(
                [sys.executable, "-m", "alembic", *args],
                cwd=self.project.path,
                env=subprocess_env(**{**self.env, **env}),
                stdout=output,
                stderr=subprocess.STDOUT,
                text=True,
            )

    def query(self, sql: str) -> list[tuple]:
        return self.server.execute(sql, database=self.url.database)

    def version(self) -> list[tuple]:
        return self.query("SELECT version_num FROM alembic_version") if "alembic_version" in self.tables() else []

    def tables(self) -> set[str]:
        return self.server.tables(self.url)

    def columns(self, table: str) -> list[str]:
        rows = self.query(
            f"SELECT column_name FROM information_schema.columns WHERE table_name = '{table}' ORDER BY ordinal_position"
        )
        return [name for (name,) in rows]

    def migration_backends(self) -> list[tuple]:
        """(pid, state, wait_event_type, query) of the migration sessions, as a DBA sees them."""
        return self.query(
            "SELECT pid, state, wait_event_type, query FROM pg_stat_activity"
            f" WHERE application_name = '{APPLICATION_NAME}' AND datname = current_database()"
        )

    def locked_tables(self) -> set[str]:
        """The tables that any session of the migration role holds a lock on."""
        rows = self.query(
            "SELECT DISTINCT c.relname FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
            " JOIN pg_stat_activity a ON a.pid = l.pid"
            f" WHERE a.usename = '{self.url.username}' AND c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace"
        )
        return {name for (name,) in rows}

    def add_revision(self, revision: str, down: str | None, upgrade: str, downgrade: str = "pass") -> Path:
        return self.project.add_revision(revision, down, upgrade, downgrade)


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    """Poll until `condition()` is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def assert_no_password(*outputs: str) -> None:
    # Raw, percent-encoded by hand, and as SQLAlchemy writes it into DATABASE_URL.
    as_in_url = url_string(URL.create("postgresql", "u", SECRET, "h")).partition("u:")[2].rpartition("@h")[0]
    for output in outputs:
        for form in (SECRET, quote(SECRET, safe=""), as_in_url):
            assert form not in output
