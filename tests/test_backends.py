"""What only one backend does: SQLite's zero-configuration quick start and batch
ALTERs, MySQL's implicit DDL commits."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy.engine import URL

from rendering import THING_MODEL, Project, failed_line, make_project
from servers import Server, SQLiteFiles, url_string


def columns(database: Path, table: str) -> dict[str, tuple]:
    with sqlite3.connect(database) as connection:
        return {row[1]: row for row in connection.execute(f"PRAGMA table_info({table})")}


def test_sqlite_quick_start_needs_no_configuration(tmp_path: Path) -> None:
    """`alembic -c path/to/alembic.ini` from anywhere uses the one database file in the project."""
    project = make_project(tmp_path / "render", database="sqlite")
    project.add_thing()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd in (project.path, elsewhere):
        # Nothing set up: no settings at all, no virtual environment, no PYTHONPATH.
        result = project.cli("-c", str(project.path / "alembic.ini"), "upgrade", "head", cwd=cwd, inherit=False)
        assert result.returncode == 0, result.stderr
    database = project.path / f"{project.package}.sqlite3"
    assert columns(database, "thing")
    assert list(elsewhere.iterdir()) == []
    assert sorted(p.name for p in project.path.glob("*.sqlite3")) == [database.name]


def test_sqlite_relative_url_is_relative_to_the_current_directory(tmp_path: Path) -> None:
    project = make_project(tmp_path, database="sqlite")
    project.add_thing()
    (project.path / "data").mkdir()
    result = project.cli("upgrade", "head", env={"DATABASE_URL": "sqlite:///data/../data/app.db"})
    assert result.returncode == 0, result.stderr
    assert columns(project.path / "data" / "app.db", "thing")
    assert not (project.path / f"{project.package}.sqlite3").exists()


def test_sqlite_autogenerate_alters_columns_in_batch(tmp_path: Path, monkeypatch) -> None:
    """SQLite has almost no ALTER TABLE: autogenerate must emit batch operations."""
    project = make_project(tmp_path, database="sqlite")
    database = tmp_path / "app.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{database}")
    project.add_model(THING_MODEL)
    models = project.path / project.package / "models.py"
    with project.activated():
        config = project.config()
        command.revision(config, message="create thing", autogenerate=True)
        command.upgrade(config, "head")
    # Add a column and make an existing one nullable and longer.
    models.write_text(
        models.read_text()
        .replace("mapped_column(String(100))", "mapped_column(String(200), nullable=True)")
        .replace("name: Mapped[str]", "name: Mapped[str | None]")
        + "    colour: Mapped[str | None] = mapped_column(String(20))\n"
    )
    with project.activated():  # imports the changed models afresh
        config = project.config()
        second = command.revision(config, message="alter thing", autogenerate=True)
        assert "batch_alter_table" in Path(second.path).read_text()
        command.upgrade(config, "head")
        assert columns(database, "thing")["colour"]
        assert columns(database, "thing")["name"][3] == 0  # notnull flag off
        command.check(config)
        command.downgrade(config, "-1")
        assert "colour" not in columns(database, "thing")
        assert columns(database, "thing")["name"][3] == 1
        command.downgrade(config, "base")


def project_with_thing(
    request: pytest.FixtureRequest, tmp_path: Path, database: str
) -> tuple[Project, Server | SQLiteFiles, URL]:
    """A MySQL or SQLite render with table "thing" (revision 0001), its server and a new database."""
    server: Server | SQLiteFiles = request.getfixturevalue("mysql") if database == "mysql" else SQLiteFiles(tmp_path)
    project = make_project(tmp_path / "render", database=database)
    project.add_thing()
    return project, server, server.create_database()


@pytest.mark.parametrize("database", ["mysql", "sqlite"])
def test_failing_revision_keeps_earlier_ddl_and_says_so(tmp_path: Path, request, database: str) -> None:
    """MySQL commits DDL implicitly, Alembic runs SQLite's outside a transaction: what ran
    before the failure stays, and FAILED: says so instead of promising a rollback."""
    project, server, url = project_with_thing(request, tmp_path, database)
    project.add_revision(
        "0002",
        "0001",
        """
        op.create_table("first_step", sa.Column("id", sa.Integer))
        op.execute("SELECT no_such_column FROM first_step")
        """,
        'op.drop_table("first_step")',
        file_name="0002_two_steps.py",
    )
    failed = failed_line(project.cli("upgrade", "head", env={"DATABASE_URL": url_string(url)}))
    assert "0002_two_steps.py failed" in failed and "stay applied" in failed
    # The half-applied state a user must clean up by hand.
    assert {"thing", "first_step"} <= server.tables(url)
    assert server.execute("SELECT version_num FROM alembic_version", database=url.database) == [("0001",)]


def test_sqlite_file_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    project = make_project(tmp_path, database="sqlite")
    missing_dir = tmp_path / "no-such-dir" / "app.db"
    result = project.cli("current", env={"DATABASE_URL": f"sqlite:///{missing_dir}"})
    assert failed_line(result) == (
        f"FAILED: cannot open SQLite database {missing_dir}: unable to open database file; check DATABASE_URL"
    )


@pytest.mark.parametrize("database", ["mysql", "sqlite"])
@pytest.mark.parametrize(
    "commit", ['op.execute("COMMIT")', 'op.execute("/* done */ COMMIT")', "op.get_bind().commit()"]
)
def test_failing_revision_that_committed_says_what_stays(tmp_path: Path, request, database: str, commit: str) -> None:
    """Rows written before a commit of the revision's own stay after it fails: FAILED: says so."""
    project, server, url = project_with_thing(request, tmp_path, database)
    project.add_revision(
        "0002",
        "0001",
        f"""
        op.execute("INSERT INTO thing (id, name) VALUES (1, 'before the commit')")
        {commit}
        op.execute("SELECT no_such_column FROM thing")
        """,
        file_name="0002_commits.py",
    )
    failed = failed_line(project.cli("upgrade", "head", env={"DATABASE_URL": url_string(url)}))
    assert "0002_commits.py failed" in failed and "it had made part of its work permanent" in failed
    assert server.execute("SELECT name FROM thing", database=url.database) == [("before the commit",)]
