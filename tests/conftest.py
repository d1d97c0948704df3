"""Fixtures: real database servers (one per test session), renders, clean environments."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from rendering import Project, make_project
from servers import Server, SQLiteFiles, external_server, mariadb_server, postgres_cluster
from service import FLAVORS, SECRET, Service, use_stock_env


@pytest.fixture(scope="session")
def no_secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("no-secrets")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, no_secrets: Path) -> None:
    """No settings leak in from the machine: each test sets what it means to."""
    for name in list(os.environ):
        if ("DATABASE_" in name or name.endswith("SECRETS_DIR")) and not name.startswith("TEST_"):
            monkeypatch.delenv(name)
    # Secrets come only from directories the tests make (an empty one otherwise).
    monkeypatch.setenv("SECRETS_DIR", str(no_secrets))
    monkeypatch.setenv("APP_SECRETS_DIR", str(no_secrets))


@pytest.fixture(scope="session")
def postgres() -> Iterator[Server]:
    """PostgreSQL with password authentication: TEST_DATABASE_URL, or a throwaway cluster."""
    url = os.environ.get("TEST_DATABASE_URL")
    with external_server(url) if url else postgres_cluster() as server:
        yield server


@pytest.fixture(scope="session")
def mysql() -> Iterator[Server]:
    """MariaDB/MySQL: TEST_MYSQL_URL, or a throwaway mariadbd."""
    url = os.environ.get("TEST_MYSQL_URL")
    with external_server(url) if url else mariadb_server() as server:
        yield server


@pytest.fixture
def project(tmp_path: Path) -> Project:
    """The default render (PostgreSQL, no prefix)."""
    return make_project(tmp_path)


@pytest.fixture(params=["postgresql", "mysql", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Server | SQLiteFiles:
    """Each database choice, with its real engine."""
    if request.param == "sqlite":
        return SQLiteFiles(tmp_path)
    return request.getfixturevalue("postgres" if request.param == "postgresql" else "mysql")


@pytest.fixture
def backend_project(backend: Server | SQLiteFiles, tmp_path: Path) -> Project:
    """A render for the backend under test."""
    return make_project(tmp_path / "render", database=backend.backend)


@pytest.fixture(params=FLAVORS)
def service(request: pytest.FixtureRequest, tmp_path: Path, postgres: Server) -> Service:
    """A PostgreSQL service with table "thing" (revision 0001); with AGAINST_STOCK=1 also on the stock env.py."""
    project = make_project(tmp_path)
    project.add_thing()
    if request.param == "stock":
        if marker := request.node.get_closest_marker("same_on_stock"):
            pytest.skip("nothing to compare: " + marker.args[0])
        request.applymarker(pytest.mark.xfail(strict=True, reason="the stock async env.py"))
        use_stock_env(project)
    return Service(project, postgres, postgres.create_database(password=SECRET))
