"""Alembic environment: an async engine, with the URL from the settings, never from alembic.ini.

Offline mode (`alembic upgrade head --sql`) writes SQL and needs no database.
Online mode runs on a connection handed in as config.attributes["connection"]
(a Connection, AsyncConnection or AsyncEngine), or on an engine of its own.
"""

import gc
from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_engine_from_config

from {{ cookiecutter.package_name }} import migrate
from {{ cookiecutter.package_name }}.database import connect_args
from {{ cookiecutter.package_name }}.models import Base

config = context.config

if config.cmd_opts is not None:
    # The `alembic` command is a short-lived process: spare the garbage collector
    # from scanning, again and again, the objects the imports made (about a third
    # of a 200-revision run). Not when an application calls Alembic: it lives on.
    gc.freeze()

if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    # Leave the loggers of an application that runs the migrations alone.
    fileConfig(config.config_file_name, disable_existing_loggers=False)

settings = migrate.settings_for(config)
config.set_main_option(
    "sqlalchemy.url",
    migrate.ini_escape(settings.async_url().render_as_string(hide_password=False)),
)

OPTIONS = {
    "target_metadata": Base.metadata,
    "compare_type": True,
{% if cookiecutter.database == "sqlite" %}
    # SQLite alters tables by copying them: autogenerate must emit batch operations.
    "render_as_batch": True,
{% endif %}
}


def run_migrations_offline() -> None:
    """Write the migrations' SQL to stdout (`--sql`), without a database."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **OPTIONS,
    )
    with context.begin_transaction():
{% if cookiecutter.database == "postgresql" %}
        # A script applied by hand gets the limits an online run sets.
        for statement in migrate.offline_session_sql(settings):
            context.execute(statement)
{% endif %}
        context.run_migrations()


{% if cookiecutter.database == "postgresql" %}
def do_run_migrations(connection: Connection) -> None:
    """Run the migrations on `connection`, holding the migration lock and limits."""
    try:
        with migrate.migration_session(connection, settings):
            context.configure(connection=connection, **OPTIONS)
            with context.begin_transaction():
                context.run_migrations()
    except DBAPIError as exc:
        raise migrate.migration_failed(exc, config) from exc
{% else %}
def do_run_migrations(connection: Connection) -> None:
    """Run the migrations on `connection`."""
    context.configure(connection=connection, **OPTIONS)
    try:
        with context.begin_transaction():
            context.run_migrations()
    except DBAPIError as exc:
        raise migrate.migration_failed(exc, config) from exc
{% endif %}


async def run_async_migrations(connectable: AsyncEngine | None) -> None:
    """Run on the AsyncEngine handed in, or on a new one; dispose of its connections."""
    engine = connectable or async_engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
        connect_args=connect_args(settings),
    )
    try:
        async with migrate.connect(engine, settings) as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        # Connections belong to this event loop: close them before it ends.
        await engine.dispose()


def run_migrations_online() -> None:
    """Run the migrations against the database."""
    connectable = config.attributes.get("connection")
    if isinstance(connectable, Connection):
        do_run_migrations(connectable)
    elif isinstance(connectable, AsyncConnection):
        # On the event loop that the connection belongs to.
        migrate.run_coroutine(connectable.run_sync(do_run_migrations), migrate.driver_loop(connectable))
    else:
        migrate.run_coroutine(run_async_migrations(connectable))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
