"""Migration checks run against a throwaway database: TEST_DATABASE_URL.

Each check starts by dropping every table in it: never point it at data you keep.
{% if cookiecutter.database == "sqlite" %}
Without TEST_DATABASE_URL they use a temporary SQLite file.
{% endif %}
"""

import asyncio
import os
{% if cookiecutter.database == "sqlite" %}
from pathlib import Path
{% endif %}

import pytest
from alembic.config import Config
from sqlalchemy import Connection, Enum, MetaData, Sequence, inspect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool
from sqlalchemy.schema import DropSequence

from {{ cookiecutter.package_name }} import migrate
from {{ cookiecutter.package_name }}.database import engine_for
from {{ cookiecutter.package_name }}.settings import DatabaseSettings


@pytest.fixture
{% if cookiecutter.database == "sqlite" %}
def test_database_url(tmp_path: Path) -> str:
    return os.environ.get("TEST_DATABASE_URL") or f"sqlite+aiosqlite:///{tmp_path / 'test.sqlite3'}"
{% else %}
def test_database_url() -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if not url:
        pytest.fail("set TEST_DATABASE_URL to a throwaway database: these tests migrate it up and down")
    return url
{% endif %}


@pytest.fixture
def alembic_config() -> Config:
    """The project's Alembic config, for pytest-alembic's `alembic_runner`."""
    return migrate.alembic_config()


@pytest.fixture
def alembic_engine(test_database_url: str) -> AsyncEngine:
    """The engine pytest-alembic hands env.py (as config.attributes["connection"]), for an
    empty database: each check starts from scratch, whatever an earlier one left behind."""
    engine = engine_for(DatabaseSettings.load(url=test_database_url), poolclass=NullPool)
    asyncio.run(empty(engine))
    return engine


async def empty(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(drop_everything)


def drop_everything(connection: Connection) -> None:
    """Drop every table, and what a downgrade can leave behind without one: sequences
    and PostgreSQL's enum types."""
    tables = MetaData()
    tables.reflect(connection)
    tables.drop_all(connection)
    inspector = inspect(connection)
    if connection.dialect.supports_sequences:
        for name in inspector.get_sequence_names():
            connection.execute(DropSequence(Sequence(name)))
    if hasattr(inspector, "get_enums"):
        for enum in inspector.get_enums():
            Enum(name=enum["name"]).drop(connection)
