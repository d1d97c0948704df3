"""Migration checks run against a throwaway database: TEST_DATABASE_URL.

They migrate it down to base and up again: never point it at data you keep.
"""

import os
from collections.abc import Iterator

import pytest
from alembic.config import Config
from sqlalchemy.pool import NullPool

from my_service import migrate
from my_service.database import engine_for
from my_service.settings import DatabaseSettings


@pytest.fixture
def test_database_url() -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if not url:
        pytest.fail("set TEST_DATABASE_URL to a throwaway database: these tests migrate it up and down")
    return url


@pytest.fixture
def alembic_config(test_database_url: str) -> Iterator[Config]:
    """The project's Alembic config, handed an engine for the test database."""
    engine = engine_for(DatabaseSettings.load(url=test_database_url), poolclass=NullPool)
    config = migrate.alembic_config()
    config.attributes["connection"] = engine
    config.attributes["configure_logger"] = False
    yield config
