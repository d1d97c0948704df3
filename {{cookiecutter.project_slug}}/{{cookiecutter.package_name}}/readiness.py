"""Is the database at the head revision? For an application's startup and health checks.

    from {{ cookiecutter.package_name }} import readiness

    status = readiness.migration_status()  # from sync code, also inside a running event loop
    status = await readiness.migration_status_async()  # from async code
    status = await readiness.migration_status_async(connection=conn)  # on an AsyncConnection you hold
    if not status.at_head:
        log.warning("database not ready: %s", status)  # one line: what is pending, or why it cannot tell

It reads alembic_version (Alembic's MigrationContext) and compares it with migrations/
(Alembic's ScriptDirectory, read once per process), and does nothing else: it does not run
migrations/env.py, takes no migration lock and does not wait for a server that is still
starting. A database that cannot be reached is an answer (`error`), not an exception;
invalid settings raise SettingsError.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
{% if cookiecutter.database != "sqlite" %}
from datetime import timedelta
{% endif %}

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.pool import NullPool

from .database import CannotConnect, connect, driver_message, engine_for
from .migrate import alembic_config
from .settings import DatabaseSettings


@dataclass(frozen=True)
class MigrationStatus:
    """Where the database is, against the revisions in migrations/."""

    # The revisions in alembic_version (none: nothing applied yet, or an empty database).
    current: tuple[str, ...]
    # The head revisions of migrations/.
    heads: tuple[str, ...]
    # What `alembic upgrade head` would apply, oldest first.
    pending: tuple[str, ...] = ()
    # Revisions in the database that migrations/ does not have: a newer release migrated it.
    unknown: tuple[str, ...] = ()
    # Why the database could not be asked (one line), or None.
    error: str | None = None

    @property
    def at_head(self) -> bool:
        """Whether the schema is the one this code was written for."""
        return self.error is None and set(self.current) == set(self.heads)

    def __str__(self) -> str:
        if self.error is not None:
            return f"cannot tell where the database is: {self.error}"
        if self.unknown:
            return (
                f"the database is at {', '.join(self.unknown)}, which migrations/ does not have"
                " (a newer release migrated it)"
            )
        if self.at_head:
            return f"at head ({', '.join(self.heads) or 'no revisions'})"
        where = f"at {', '.join(self.current)}" if self.current else "empty (no revision applied)"
        return f"behind: {len(self.pending)} pending ({', '.join(self.pending)}); the database is {where}"


def migration_status(*, config: Config | None = None) -> MigrationStatus:
    """migration_status_async() from synchronous code, also from inside a running event loop."""
    coroutine = migration_status_async(config=config)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    # Event loops do not nest: this one waits while a loop of its own, on a worker thread, asks.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


async def migration_status_async(
    *, connection: AsyncConnection | None = None, config: Config | None = None
) -> MigrationStatus:
    """Where the database is: asked on `connection` (a transaction this begins on it is rolled
    back), or on a connection of its own."""
    # Reading the revision files takes a while the first time: not on the event loop.
    script = await asyncio.to_thread(_script_directory, config or alembic_config())
    settings = _settings(connection.sync_connection if connection is not None else None)
{% if cookiecutter.database == "postgresql" %}
    # alembic_version is in {{ cookiecutter.env_prefix }}DATABASE_SCHEMA when one is set.
    schema = settings.schema_name
{% else %}
    # alembic_version is in the database of the URL.
    schema = None
{% endif %}
    if connection is not None:
        return await connection.run_sync(_status_on, script, schema)
    engine = engine_for(settings, poolclass=NullPool)
    try:
        async with connect(engine, settings) as own:
            return await own.run_sync(_status_on, script, schema)
    except CannotConnect as exc:
        return MigrationStatus(current=(), heads=tuple(script.get_heads()), error=str(exc))
    finally:
        await engine.dispose()


# migrations/ as this process found it: the revision files do not change while it runs.
_script_directories: dict[str, ScriptDirectory] = {}


def _script_directory(config: Config) -> ScriptDirectory:
    location = config.get_main_option("script_location") or ""
    if location not in _script_directories:
        script = ScriptDirectory.from_config(config)
        script.get_heads()  # reads every revision file
        _script_directories[location] = script
    return _script_directories[location]


def _settings(connection: Connection | None = None) -> DatabaseSettings:
    if connection is not None:
        # The database is the connection's; the rest (which schema) comes from the settings.
        url = connection.engine.url.set(query={})
        return DatabaseSettings.load(url=url.render_as_string(hide_password=False))
{% if cookiecutter.database == "sqlite" %}
    return DatabaseSettings.load()
{% else %}
    # A check answers now: it does not wait for a server that is still starting.
    return DatabaseSettings.load(wait=timedelta(0))
{% endif %}


def _status_on(connection: Connection, script: ScriptDirectory, schema: str | None) -> MigrationStatus:
    heads = tuple(script.get_heads())
    began = not connection.in_transaction()
    try:
        context = MigrationContext.configure(connection, opts={"version_table_schema": schema})
        current = tuple(context.get_current_heads())
    except DBAPIError as exc:
        error = f"cannot read alembic_version: {driver_message(exc)}"
        return MigrationStatus(current=(), heads=heads, error=error)
    finally:
        if began and connection.in_transaction():
            # Only read: leave the connection as it was.
            connection.rollback()
    known = {found.revision for found in script.walk_revisions()}
    unknown = tuple(revision for revision in current if revision not in known)
    if unknown:
        # Which of ours it has applied, only the newer release knows.
        return MigrationStatus(current=current, heads=heads, unknown=unknown)
    applied = set(_with_ancestors(script, current))
    pending = tuple(rev for rev in reversed(_with_ancestors(script, heads)) if rev not in applied)
    return MigrationStatus(current=current, heads=heads, pending=pending)


def _with_ancestors(script: ScriptDirectory, revisions: tuple[str, ...]) -> list[str]:
    """`revisions` and every revision they build on, newest first."""
    if not revisions:
        return []
    return [found.revision for found in script.iterate_revisions(revisions, "base")]
