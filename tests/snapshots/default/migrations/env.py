"""Alembic environment: an async engine, with the URL from the settings, never from alembic.ini.

Offline mode (`alembic upgrade head --sql`) writes SQL and needs no database.
Online mode runs on a connection handed in as config.attributes["connection"]
(a Connection, or an AsyncEngine such as pytest-alembic's), or on an engine of its own.
"""

import gc
from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, async_engine_from_config

from my_service import migrate
from my_service.database import connect_args
from my_service.migration_session import (
    MigrationSession,
    offline_sql,
    schema_options,
)
from my_service.models import Base

config = context.config

if config.cmd_opts is not None:
    # The `alembic` command is a short-lived process: spare the garbage collector
    # from scanning, again and again, the objects the imports made (about a third
    # of a 200-revision run). Not when an application calls Alembic: it lives on.
    gc.freeze()

if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    # Leave the loggers of an application that runs the migrations alone.
    fileConfig(config.config_file_name, disable_existing_loggers=False)

settings = migrate.settings_for(config, offline=context.is_offline_mode())
config.set_main_option(
    "sqlalchemy.url",
    migrate.ini_escape(settings.async_url().render_as_string(hide_password=False)),
)

# What context.configure() gets in both modes.
CONFIGURE_OPTIONS = {
    "target_metadata": Base.metadata,
    # DATABASE_SCHEMA: alembic_version there, and autogenerate looks at no other schema.
    **schema_options(settings),
}


def run_migrations_offline() -> None:
    """Write the migrations' SQL to stdout (`--sql`), without a database."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **CONFIGURE_OPTIONS,
    )
    with context.begin_transaction():
        # A script applied by hand gets the role, schema and limits an online run sets.
        for statement in offline_sql(settings):
            context.execute(statement)
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    """Run the migrations on `connection`: migration lock, limits, one transaction per revision."""
    MigrationSession(context, connection, settings, **CONFIGURE_OPTIONS).run()


async def run_async_migrations(engine: AsyncEngine | None) -> None:
    """Run on the AsyncEngine handed in, or on a new one; close its connections on this loop."""
    engine = engine or async_engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
        connect_args=connect_args(settings),
    )
    await migrate.run_on_engine(engine, settings, do_run_migrations)


def run_migrations_online() -> None:
    """Run the migrations against the database."""
    connectable = config.attributes.get("connection")
    if isinstance(connectable, Connection):
        do_run_migrations(connectable)
    else:
        migrate.run_coroutine(run_async_migrations(connectable))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
