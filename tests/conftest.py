"""Fixtures: real database servers (one per test session), renders, clean environments."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from rendering import Project, render
from servers import Server, SQLiteFiles, external_server, mariadb_server, postgres_cluster


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
def pg_url(postgres: Server) -> URL:
    """A fresh database owned by a fresh role (sync scheme, as users write it)."""
    return postgres.create_database()


def url_string(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def component_variables(url: URL, prefix: str = "") -> dict[str, str]:
    """The {prefix}DATABASE_HOST/_PORT/_USER/_PASSWORD/_NAME variables for `url`."""
    parts = {"HOST": url.host, "PORT": url.port, "USER": url.username, "PASSWORD": url.password, "NAME": url.database}
    return {f"{prefix}DATABASE_{name}": str(value) for name, value in parts.items()}


def make_project(tmp_path: Path, **answers: str) -> Project:
    path = render(tmp_path, **answers)
    package = answers.get("package_name") or path.name.replace("-", "_")
    return Project(path, package, answers.get("env_prefix", ""))


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
