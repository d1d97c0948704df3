"""Running the Alembic migrations: what migrations/env.py needs, and a Python API.

From a script: ``upgrade()``. From async code (an app's startup, an async test):
``await upgrade_async()``, or ``await upgrade_async(connection=conn)`` to migrate on
a connection you already hold.
"""

from __future__ import annotations

import asyncio
{% if cookiecutter.database == "sqlite" %}
import threading
{% endif %}
{% if cookiecutter.database == "postgresql" %}
import zlib
{% endif %}
{% if cookiecutter.database == "postgresql" %}
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
{% else %}
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
{% endif %}
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.util import CommandError
from sqlalchemy import Connection{{ ', text' if cookiecutter.database == 'postgresql' }}
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .database import describe_connect_error, describe_error
{% if cookiecutter.database == "postgresql" %}
from .settings import DatabaseSettings, SettingsError, env_var, load_settings
{% else %}
from .settings import DatabaseSettings, SettingsError, load_settings
{% endif %}

PROJECT_DIR = Path(__file__).resolve().parent.parent
ALEMBIC_INI = PROJECT_DIR / "alembic.ini"
{% if cookiecutter.database == "postgresql" %}
# One key per project: replicas of this service wait for each other, other
# services' migrations in the same cluster do not.
MIGRATION_LOCK_KEY = zlib.crc32(b"{{ cookiecutter.package_name }}:alembic")
LOCK_NOT_AVAILABLE = "55P03"
SET_CONFIG = text("SELECT current_setting(:name), set_config(:name, :value, :local)")
{% endif %}


def alembic_config(path: str | Path = ALEMBIC_INI) -> Config:
    """The project's Alembic configuration, for use inside an application.

    env.py leaves the application's logging as it is: alembic.ini's logging
    sections are for the `alembic` command.
    """
    config = Config(str(path))
    config.attributes["configure_logger"] = False
    return config


def upgrade(revision: str = "head", *, config: Config | None = None) -> None:
    """`alembic upgrade`, from synchronous code or from inside a running event loop."""
    command.upgrade(config or alembic_config(), revision)


async def upgrade_async(
    revision: str = "head",
    *,
    connection: AsyncConnection | None = None,
    config: Config | None = None,
) -> None:
    """`alembic upgrade` from async code, on `connection` or on a fresh engine.

    On a connection of yours, the migration joins its transaction if one is open
    (commit it yourself), and commits on its own otherwise.
    """
    config = config or alembic_config()
    if connection is None:
        await asyncio.to_thread(command.upgrade, config, revision)
    else:
        await connection.run_sync(_upgrade_on, config, revision)


def _upgrade_on(connection: Connection, config: Config, revision: str) -> None:
    config.attributes["connection"] = connection
    try:
        command.upgrade(config, revision)
    finally:
        del config.attributes["connection"]


def settings_for(config: Config) -> DatabaseSettings:
    """The settings for this run; a connection handed in decides the URL."""
    connectable = config.attributes.get("connection")
    overrides = {}
    if connectable is not None:
        if not isinstance(connectable, Connection | AsyncConnection | AsyncEngine):
            raise CommandError(
                'config.attributes["connection"] must be a Connection, an AsyncConnection or an'
                f" AsyncEngine, not {type(connectable).__name__}"
            )
        # Only the database it names matters: its driver options are the caller's business.
        url = getattr(connectable, "engine", connectable).url.set(query={})
        overrides["url"] = url.render_as_string(hide_password=False)
    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        raise CommandError(str(exc)) from None


def ini_escape(value: str) -> str:
    """Escape `value` for Config.set_main_option, which interpolates `%`."""
    return value.replace("%", "%%")


def run_coroutine(
    coroutine: Coroutine[Any, Any, None], loop: asyncio.AbstractEventLoop | None = None
) -> None:
    """Run `coroutine` to completion from synchronous code.

    On `loop` when given: the loop an async connection belongs to, running in
    another thread or not running at all. Otherwise with asyncio.run(), on a
    worker thread when this thread's loop is running (loops do not nest).
    """
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if loop is not None and loop is running:
        coroutine.close()
        raise CommandError(
            "the AsyncConnection handed in belongs to the event loop that is waiting for this"
            " migration: `await upgrade_async(connection=...)` instead"
        )
    if loop is not None and loop.is_running():
        asyncio.run_coroutine_threadsafe(coroutine, loop).result()
    elif loop is not None:
        loop.run_until_complete(coroutine)
    elif running is None:
        asyncio.run(coroutine)
    else:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(asyncio.run, coroutine).result()


def driver_loop(connection: AsyncConnection) -> asyncio.AbstractEventLoop | None:
    """The event loop the driver bound `connection` to (asyncpg and asyncmy do; aiosqlite does not).

    Both keep it as `_loop`; tests/test_migrations.py fails should that ever change.
    """
    adapted = connection.sync_connection.connection.dbapi_connection
    return getattr(getattr(adapted, "driver_connection", None), "_loop", None)


@asynccontextmanager
async def connect(engine: AsyncEngine, settings: DatabaseSettings) -> AsyncIterator[AsyncConnection]:
    """engine.connect(), with one readable line when the database cannot be reached."""
    try:
        connection = await engine.connect()
    except Exception as exc:
{% if cookiecutter.database == "sqlite" %}
        await _aiosqlite_workers_stopped()
{% endif %}
        # Whatever fails here failed to connect: refused, timed out, rejected
        # (SQLAlchemy 2.0 lets some driver errors through unwrapped).
        raise CommandError(describe_connect_error(exc, settings)) from exc
    try:
        yield connection
    finally:
        await connection.close()


{% if cookiecutter.database == "sqlite" %}
async def _aiosqlite_workers_stopped() -> None:
    """Keep the loop open until aiosqlite's worker threads have stopped.

    After a failed connect, aiosqlite's worker thread still answers a stop request
    through the event loop; were asyncio.run() to close the loop first, the thread
    would print a traceback under our one-line error.
    """
    for thread in threading.enumerate():
        if thread.name.endswith("(_connection_worker_thread)"):
            await asyncio.to_thread(thread.join, 1.0)


{% endif %}
{% if cookiecutter.database == "postgresql" %}
def offline_session_sql(settings: DatabaseSettings) -> list[str]:
    """The session limits as SQL, for scripts written with --sql and applied by hand."""
    limits = {"lock_timeout": settings.lock_timeout, "statement_timeout": settings.statement_timeout}
    return [f"SET {name} = '{quote_literal(value)}'" for name, value in limits.items()]


def quote_literal(value: str) -> str:
    """`value` made safe inside an SQL string literal."""
    return value.replace("'", "''")


{% endif %}
def migration_failed(exc: DBAPIError, config: Config) -> CommandError:
    """A CommandError naming the revision file whose migration raised `exc`."""
    versions = Path(config.get_main_option("script_location", "")).resolve() / "versions"
    revision = "a migration"
    traceback = exc.__traceback__
    while traceback is not None:
        path = Path(traceback.tb_frame.f_code.co_filename)
        if path.parent == versions:
            revision = path.name
        traceback = traceback.tb_next
{% if cookiecutter.database == "postgresql" %}
    outcome = "rolled back, the schema is as it was"
{% elif cookiecutter.database == "mysql" %}
    # MySQL commits each DDL statement as it runs: nothing can roll it back.
    outcome = "DDL statements that ran before it stay applied (MySQL cannot roll DDL back)"
{% else %}
    # Alembic runs SQLite's DDL outside a transaction (the driver commits it).
    outcome = "DDL statements that ran before it stay applied (SQLite DDL runs outside a transaction)"
{% endif %}
    return CommandError(
        f"{revision} failed: {describe_error(exc)}; {outcome} (alembic --raiseerr shows the traceback)"
    )
{% if cookiecutter.database == "postgresql" %}


@contextmanager
def migration_session(connection: Connection, settings: DatabaseSettings) -> Iterator[None]:
    """Hold the migration lock and the session limits while the migrations run.

    Configure Alembic inside this block: whether the connection is in a
    transaction when Alembic sees it decides who commits.

    On a connection in no transaction: a session-level advisory lock
    (pg_advisory_xact_lock would be released by autocommit_block()) and
    session settings, both undone afterwards. On a caller's connection inside
    a transaction: transaction-level ones, so that nothing outlives the
    caller's transaction. Through PgBouncer in transaction mode, where only a
    transaction keeps its server connection: one transaction of our own, with
    transaction-level lock and settings.
    """
    own_transaction = settings.pgbouncer and not connection.in_transaction()
    if own_transaction:
        connection.begin()
    local = connection.in_transaction()
    previous: dict[str, str] = {}
    locked = False
    try:
        # lock_timeout also bounds the wait for the advisory lock: give that wait
        # its own bound first, then the limits for the migrations themselves.
        previous = _set_config(
            connection,
            {
                "application_name": settings.application_name,
                "lock_timeout": settings.migration_lock_timeout,
                "statement_timeout": "0",
            },
            local=local,
        )
        if settings.migration_lock:
            _take_migration_lock(connection, settings, local=local)
            locked = not local
        limits = {"lock_timeout": settings.lock_timeout, "statement_timeout": settings.statement_timeout}
        _set_config(connection, limits, local=local)
        if not local:
            # The statements above began a transaction: end it, so that Alembic
            # begins (and commits) its own.
            connection.commit()
        yield
        if own_transaction:
            connection.commit()
    except AssertionError as exc:
        if local and _raised_in(exc, "autocommit_block"):
            raise CommandError(
                "a revision uses autocommit_block(), which cannot run inside one transaction"
                f" ({env_var('pgbouncer')} or a caller's transaction): run it through a direct"
                " connection"
            ) from exc
        raise
    finally:
        if own_transaction and connection.in_transaction():
            connection.rollback()
        if not local:
            _restore_session(connection, previous, unlock=locked)


def _raised_in(exc: BaseException, function: str) -> bool:
    traceback = exc.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_code.co_name == function:
            return True
        traceback = traceback.tb_next
    return False


def _take_migration_lock(connection: Connection, settings: DatabaseSettings, *, local: bool) -> None:
    function = "pg_advisory_xact_lock" if local else "pg_advisory_lock"
    try:
        connection.exec_driver_sql(f"SELECT {function}({MIGRATION_LOCK_KEY})")
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
            raise
        raise CommandError(
            f"another migration still holds the migration lock (advisory lock {MIGRATION_LOCK_KEY})"
            f" after {settings.migration_lock_timeout}; let it finish, or wait longer with"
            f" {env_var('migration_lock_timeout')}"
        ) from exc


def _set_config(connection: Connection, values: dict[str, str], *, local: bool) -> dict[str, str]:
    """Set run-time parameters (with SET, which PgBouncer passes on); return the old values."""
    previous = {}
    for name, value in values.items():
        previous[name] = connection.execute(
            SET_CONFIG, {"name": name, "value": value, "local": local}
        ).scalar_one()
    return previous


def _restore_session(connection: Connection, previous: dict[str, str], *, unlock: bool) -> None:
    if connection.invalidated or connection.closed:
        # The backend is gone, and its lock and settings with it.
        return
    if connection.in_transaction():
        connection.rollback()
    _set_config(connection, previous, local=False)
    if unlock:
        connection.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")
    connection.commit()
{% endif %}
