"""The rendered environment against each real database engine.

Alembic runs in-process through alembic.command where a subprocess adds
nothing; the CLI runs check what a user sees on the terminal.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import quote

import pytest
from alembic import command
from alembic.util import CommandError
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from rendering import Project, failed_line, make_project
from servers import SQLiteFiles, component_variables, free_port, url_string

# Every character that breaks a URL or ConfigParser interpolation, and non-ASCII.
SPECIAL_PASSWORD = "p%40ss%@:/#?+ wörd%%"


def test_upgrade_autogenerate_check_downgrade(backend, backend_project: Project, monkeypatch) -> None:
    url = backend.create_database()
    monkeypatch.setenv("DATABASE_URL", url_string(url))
    backend_project.add_thing(revision=False)
    with backend_project.activated():
        config = backend_project.config()
        command.revision(config, message="add thing", autogenerate=True)
        command.upgrade(config, "head")
        assert "thing" in backend.tables(url)
        # The models and the migrated database agree: nothing left to generate.
        command.check(config)
        command.downgrade(config, "base")
    assert "thing" not in backend.tables(url)


def test_offline_sql_needs_no_database(backend, backend_project: Project) -> None:
    backend_project.add_thing()
    if isinstance(backend, SQLiteFiles):
        url = f"sqlite:///{backend.directory}/never-created.db"
    else:
        # A port that nothing listens on: the database cannot be reached.
        url = url_string(backend.create_database().set(host="127.0.0.1", port=free_port()))
    result = backend_project.cli("upgrade", "head", "--sql", env={"DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    assert "CREATE TABLE thing" in result.stdout
    assert "0001" in result.stdout
    if isinstance(backend, SQLiteFiles):
        assert not (backend.directory / "never-created.db").exists()


@pytest.mark.parametrize("given_as", ["url-encoded", "raw-components"])
def test_special_character_password(backend, backend_project: Project, monkeypatch, given_as: str) -> None:
    if isinstance(backend, SQLiteFiles):
        pytest.skip("SQLite has no password")
    url = backend.create_database(password=SPECIAL_PASSWORD)
    if given_as == "url-encoded":
        encoded = quote(SPECIAL_PASSWORD, safe="")
        monkeypatch.setenv(
            "DATABASE_URL", f"{url.drivername}://{url.username}:{encoded}@{url.host}:{url.port}/{url.database}"
        )
    else:
        for name, value in component_variables(url).items():
            monkeypatch.setenv(name, value)
    backend_project.add_thing()
    with backend_project.activated():
        config = backend_project.config()
        command.upgrade(config, "head")
        # set_main_option escaped the % signs: the URL comes back exactly.
        assert make_url(config.get_main_option("sqlalchemy.url")).password == SPECIAL_PASSWORD
    assert "thing" in backend.tables(url)


SYNC_SCHEMES = {
    "postgresql": ["postgres", "postgresql", "postgresql+psycopg2", "postgresql+psycopg"],
    "mysql": ["mysql", "mariadb", "mysql+pymysql", "mysql+mysqldb"],
    "sqlite": ["sqlite", "sqlite+pysqlite"],
}


def test_sync_urls_run_on_the_async_driver(backend, backend_project: Project) -> None:
    url = backend.create_database()
    backend_project.add_thing()
    for scheme in SYNC_SCHEMES[backend.backend]:
        given = url_string(url.set(drivername=scheme))
        result = backend_project.cli("upgrade", "head", env={"DATABASE_URL": given})
        assert result.returncode == 0, f"{scheme}: {result.stderr}"
        assert backend_project.cli("downgrade", "base", env={"DATABASE_URL": given}).returncode == 0


def test_wrong_password_is_one_line_without_the_password(backend, backend_project: Project) -> None:
    if isinstance(backend, SQLiteFiles):
        pytest.skip("SQLite has no password")
    url = backend.create_database()
    wrong = "Wr0ng-" + SPECIAL_PASSWORD
    result = backend_project.cli("current", env={"DATABASE_URL": url_string(url.set(password=wrong))})
    # Alembic prints a CommandError as one FAILED: line (and logs it once more).
    failed = failed_line(result)
    assert f"{url.host}:{url.port}" in failed and "DATABASE_URL" in failed
    assert wrong not in result.stderr + result.stdout
    assert quote(wrong, safe="") not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("wrong", "named"),
    [
        pytest.param("name", "DATABASE_NAME", id="database-missing"),
        pytest.param("password", "DATABASE_USER and DATABASE_PASSWORD", id="password-wrong"),
        pytest.param("port", "DATABASE_HOST and DATABASE_PORT", id="port-closed"),
    ],
)
def test_connect_errors_name_the_variable_to_fix(backend, backend_project: Project, wrong: str, named: str) -> None:
    if isinstance(backend, SQLiteFiles):
        pytest.skip("SQLite has no server")
    url = backend.create_database()
    variables = component_variables(url)
    variables[f"DATABASE_{wrong.upper()}"] = {"name": "no_such_db", "password": "wrong", "port": "1"}[wrong]
    result = backend_project.cli("current", env=variables)
    assert failed_line(result).endswith(f"check {named}")


def test_missing_settings_name_the_variables(tmp_path) -> None:
    project = make_project(tmp_path, env_prefix="APP_")
    result = project.cli("upgrade", "head")
    assert failed_line(result).startswith("FAILED: database settings: set APP_DATABASE_URL, or APP_DATABASE_HOST")


@pytest.mark.parametrize("handed_in", ["Connection", "AsyncEngine"])
def test_connection_handed_in(backend, backend_project: Project, handed_in: str) -> None:
    """Tests and apps share a connection through config.attributes["connection"]."""
    url = backend.create_database()
    backend_project.add_thing()
    with backend_project.activated():
        engine = backend_project.engine(url)
        config = backend_project.config()

        def upgrade_on(connection) -> None:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

        async def run() -> None:
            if handed_in == "AsyncEngine":
                # As pytest-alembic hands it in: each command in an event loop of its own.
                await asyncio.to_thread(upgrade_on, engine)
                return
            async with engine.begin() as connection:
                await connection.run_sync(upgrade_on)
            await engine.dispose()

        asyncio.run(run())
    assert "thing" in backend.tables(url)


def test_async_connection_is_refused_with_the_way_that_works(backend, backend_project: Project) -> None:
    """An AsyncConnection belongs to a running event loop, which env.py cannot borrow."""
    url = backend.create_database()
    backend_project.add_thing()
    with backend_project.activated():
        engine = backend_project.engine(url)
        config = backend_project.config()

        async def run() -> None:
            async with engine.connect() as connection:
                config.attributes["connection"] = connection
                await asyncio.to_thread(command.upgrade, config, "head")

        with pytest.raises(CommandError, match=r"await upgrade_async\(connection=\.\.\.\)"):
            asyncio.run(run())
    assert "thing" not in backend.tables(url)


def test_upgrade_from_inside_a_running_event_loop(backend, backend_project: Project, monkeypatch) -> None:
    """An app's startup awaits the migrations: no `asyncio.run() cannot be called` error."""
    url = backend.create_database()
    monkeypatch.setenv("DATABASE_URL", url_string(url))
    backend_project.add_thing()
    with backend_project.activated():
        migrate = backend_project.module("migrate")

        async def startup() -> None:
            await migrate.upgrade_async()
            # A plain synchronous call from inside the loop works too.
            migrate.upgrade("head")

        asyncio.run(startup())
    assert "thing" in backend.tables(url)


def test_upgrade_async_on_a_connection_of_the_app(backend, backend_project: Project) -> None:
    url = backend.create_database()
    backend_project.add_thing()
    with backend_project.activated():
        migrate = backend_project.module("migrate")

        async def startup() -> None:
            engine = backend_project.engine(url)
            async with engine.connect() as connection:
                await migrate.upgrade_async(connection=connection)
            await engine.dispose()

        asyncio.run(startup())
    assert "thing" in backend.tables(url)


def test_cli_from_another_directory(backend, backend_project: Project, tmp_path) -> None:
    """`alembic -c path/to/alembic.ini` finds the package wherever it is run from."""
    url = backend.create_database()
    backend_project.add_thing()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Nothing set up but the URL: no virtual environment, no PYTHONPATH.
    result = backend_project.cli(
        "-c", str(backend_project.path / "alembic.ini"), "upgrade", "head",
        cwd=elsewhere, inherit=False, env={"DATABASE_URL": url_string(url)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "thing" in backend.tables(url)
    assert list(elsewhere.iterdir()) == []


def test_prefixed_variables_drive_the_migration(postgres, tmp_path, monkeypatch) -> None:
    project = make_project(tmp_path, env_prefix="APP_", project_name="Billing API")
    project.add_thing()
    url = postgres.create_database(password=SPECIAL_PASSWORD)
    # Another service's variable in the same environment is not ours.
    monkeypatch.setenv("DATABASE_URL", "postgresql://someone:else@127.0.0.1:1/other")
    for name, value in component_variables(url, "APP_").items():
        monkeypatch.setenv(name, value)
    with project.activated():
        command.upgrade(project.config(), "head")
    assert "thing" in postgres.tables(url)


def test_upgrade_from_an_app_leaves_its_logging_alone(backend, backend_project: Project, monkeypatch) -> None:
    url = backend.create_database()
    monkeypatch.setenv("DATABASE_URL", url_string(url))
    root = logging.getLogger()
    handler = logging.NullHandler()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.DEBUG)
    with backend_project.activated():
        backend_project.module("migrate").upgrade()
    assert root.handlers == [handler] and root.level == logging.DEBUG


def test_handed_in_connections_are_checked_by_type_not_by_url_options(postgres, project: Project) -> None:
    url = postgres.create_database()
    project.add_thing()
    with project.activated():
        config = project.config()
        # A sync Engine is not a connection: say so, not "cannot connect".
        config.attributes["connection"] = create_engine("sqlite://")
        with pytest.raises(CommandError, match=r"must be a Connection or an AsyncEngine, not Engine"):
            command.upgrade(config, "head")
        # Driver options of the caller's engine are the caller's business.
        engine = create_async_engine(
            url.set(drivername="postgresql+asyncpg", query={"prepared_statement_cache_size": "10"})
        )
        config.attributes["connection"] = engine
        command.upgrade(config, "head")
    assert "thing" in postgres.tables(url)
