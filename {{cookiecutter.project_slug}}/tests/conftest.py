"""Migration checks run against a throwaway database: TEST_DATABASE_URL.

They migrate it down to base and up again: never point it at data you keep.
{% if cookiecutter.database == "sqlite" %}
Without TEST_DATABASE_URL they use a temporary SQLite file.
{% endif %}
"""

import os
from collections.abc import Iterator
{% if cookiecutter.database == "sqlite" %}
from pathlib import Path
{% endif %}

import pytest
from alembic.config import Config
from sqlalchemy.pool import NullPool

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
def alembic_config(test_database_url: str) -> Iterator[Config]:
    """The project's Alembic config, handed an engine for the test database."""
    engine = engine_for(DatabaseSettings.load(url=test_database_url), poolclass=NullPool)
    config = migrate.alembic_config()
    config.attributes["connection"] = engine
    config.attributes["configure_logger"] = False
    yield config
