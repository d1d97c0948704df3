"""An existing history brought into a rendered project (the rendered README: "Bring an
existing history"), run on the real PostgreSQL.

tests/histories/adopted/ is a history written for these tests, in the shapes that older
projects' revisions take: constraints left unnamed and later referred to by PostgreSQL's
names (`thing_pkey`, `thing_name_key`), `op.create_check_constraint(None, ...)`, an extension,
an enum that gains a value in an autocommit_block() (PostgreSQL 15 accepts `ALTER TYPE ... ADD
VALUE` inside a transaction, but the value is usable only once that transaction committed,
and before PostgreSQL 12 it has to run outside one), `op.get_bind().commit()` before an
autocommit_block() with CREATE INDEX CONCURRENTLY, two branches and their merge, and a data
migration that reads rows, writes them back and uses the new enum value.

    3f9a0c1b2d01 create thing
    ├── 7b2e4d6f8a02 CHECK (None) ── c4d1e2f3a4b5 citext ── 9e8d7c6b5a04 commit(), index ──┐
    └── 2a4c6e8b0d03 enum value ── 5d7f9b1c3e05 drops thing_pkey ──────────────────────────┤
                                          e1f2a3b4c5d6 merge ── 8c0e2a4f6b07 slug (rows) ──┘
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from rendering import Project, failed_line, make_project
from servers import Server, postgres_bindir, postgres_cluster, url_string
from service import use_stock_env
from test_migration_lint import SETTINGS_TEST, run_lint, write_history

HISTORY = Path(__file__).resolve().parent / "histories" / "adopted"
HEAD = "8c0e2a4f6b07"
# The revisions that a naming convention breaks, and how.
UNNAMED_CHECK = "7b2e4d6f8a02_thing_name_not_blank.py"
DROPS_THING_PKEY = "5d7f9b1c3e05_thing_per_tenant.py"
# What the data migration and the enum value leave in the rows.
ROWS = [(1, "red-balloon", "small"), (2, "steam-engine", "large"), (3, "ocean-liner-model", "huge")]
# pg_dump 13.22, 14.19, 15.14, 16.10, 17.6 and later put a random key into these two lines
# of every dump (a psql \restrict guard): the one difference between two dumps of equal schemas.
RESTRICT_KEY = re.compile(r"^(\\(?:un)?restrict) \S+$", re.MULTILINE)
STOCK_CONFIGURE = "context.configure(connection=connection, target_metadata=target_metadata)"


def adopt(project: Project) -> Project:
    """The history copied into the project's migrations/versions/, as the README says."""
    for revision in HISTORY.glob("*.py"):
        shutil.copy(revision, project.path / "migrations" / "versions")
    return project


def stock_project(tmp_path: Path) -> Project:
    """The stock `alembic init -t async` env.py, with transaction_per_migration=True: the old
    project's env.py. Only an env.py with it can have run such a history (see
    test_the_stock_env_as_it_comes_fakes_success_on_this_history)."""
    project = adopt(make_project(tmp_path))
    use_stock_env(project)
    env_py = project.path / "migrations" / "env.py"
    source = env_py.read_text()
    assert STOCK_CONFIGURE in source
    per_revision = STOCK_CONFIGURE.replace(")", ", transaction_per_migration=True)")
    env_py.write_text(source.replace(STOCK_CONFIGURE, per_revision))
    return project


def upgrade(project: Project, url: URL, target: str = "head") -> subprocess.CompletedProcess:
    return project.cli("upgrade", target, env={"DATABASE_URL": url_string(url)})


def schema(server: Server, url: URL) -> str:
    """`pg_dump --schema-only --no-owner` of the database of `url`, as the suite's admin, with
    the random \\restrict key replaced (the databases' owners differ, hence --no-owner)."""
    admin = server.admin_url
    dump = subprocess.run(
        [postgres_bindir() / "pg_dump", "--schema-only", "--no-owner",
         "-h", admin.host, "-p", str(admin.port), "-U", admin.username, url.database],
        env={**os.environ, "PGPASSWORD": admin.password},
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return RESTRICT_KEY.sub(r"\1 KEY", dump.stdout)


def major_versions(server: Server) -> tuple[int, int]:
    """The major versions of this machine's pg_dump and of `server`."""
    dump = subprocess.run([postgres_bindir() / "pg_dump", "--version"], capture_output=True, text=True, check=True)
    [(number,)] = server.execute("SHOW server_version_num")
    return int(re.search(r"(\d+)\.\d+", dump.stdout)[1]), int(number) // 10000


@pytest.fixture(scope="module")
def dumpable(request: pytest.FixtureRequest) -> Iterator[Server]:
    """The suite's PostgreSQL, if this machine's pg_dump can dump it (pg_dump refuses a server of
    a newer major version: CI's PostgreSQL 17 container and the runner's pg_dump 16); a throwaway
    cluster from this machine's binaries otherwise."""
    postgres = request.getfixturevalue("postgres")
    pg_dump, server = major_versions(postgres)
    if pg_dump >= server:
        yield postgres
    else:
        with postgres_cluster() as cluster:
            yield cluster


def rows(server: Server, url: URL) -> list[tuple]:
    return server.execute("SELECT id, slug, size::text FROM thing ORDER BY id", database=url.database)


def test_the_history_builds_the_schema_the_stock_env_builds(dumpable: Server, tmp_path: Path) -> None:
    postgres = dumpable
    ours = adopt(make_project(tmp_path / "ours", naming_convention="n"))
    stock = stock_project(tmp_path / "stock")
    databases = {}
    for name, project in (("ours", ours), ("stock", stock)):
        databases[name] = postgres.create_database()
        result = upgrade(project, databases[name])
        assert result.returncode == 0, result.stdout + result.stderr
        assert postgres.execute("SELECT version_num FROM alembic_version", database=databases[name].database) == [
            (HEAD,)
        ]
    built = schema(postgres, databases["ours"])
    assert built == schema(postgres, databases["stock"])
    # What the history makes is all there: nothing was lost on the way.
    for fragment in (
        "CREATE EXTENSION IF NOT EXISTS citext",
        "'small',\n    'large',\n    'huge'",
        "CONSTRAINT thing_name_check CHECK",
        "ADD CONSTRAINT thing_pkey PRIMARY KEY (tenant_id, id)",
        "CREATE UNIQUE INDEX thing_email_idx ON public.thing USING btree (email)",
    ):
        assert fragment in built
    # The data migration read the rows and wrote them back, using the new enum value.
    assert rows(postgres, databases["ours"]) == rows(postgres, databases["stock"]) == ROWS
    # Its downgrades run too: down to base and up again builds the same schema.
    url = databases["ours"]
    down = ours.cli("downgrade", "base", env={"DATABASE_URL": url_string(url)})
    assert down.returncode == 0, down.stdout + down.stderr
    assert upgrade(ours, url).returncode == 0
    assert schema(postgres, url) == built


def test_the_stock_env_as_it_comes_fakes_success_on_this_history(postgres: Server, tmp_path: Path) -> None:
    """Without transaction_per_migration, the stock env.py runs everything in one transaction,
    which 9e8d7c6b5a04's commit() ends; nobody commits what comes after it. The command says it
    ran every revision, and the next one fails. (Ours: test_busy_database.py, "no faked success".)"""
    project = adopt(make_project(tmp_path))
    use_stock_env(project)
    url = postgres.create_database()
    result = upgrade(project, url)
    assert result.returncode == 0 and f"-> {HEAD}, thing slug" in result.stderr
    versions = postgres.execute("SELECT version_num FROM alembic_version ORDER BY 1", database=url.database)
    assert versions == [("5d7f9b1c3e05",), ("c4d1e2f3a4b5",)]
    again = upgrade(project, url)
    assert again.returncode != 0 and 'relation "thing_email_idx" already exists' in again.stderr


@pytest.mark.parametrize(
    ("target", "revision", "error"),
    [
        pytest.param(
            "7b2e4d6f8a02",
            UNNAMED_CHECK,
            "InvalidRequestError: Naming convention including %(constraint_name)s token requires",
            id="create-check-constraint-none",
        ),
        pytest.param(
            "5d7f9b1c3e05",
            DROPS_THING_PKEY,
            'constraint "thing_pkey" of relation "thing" does not exist',
            id="drop-constraint-thing-pkey",
        ),
    ],
)
def test_with_the_naming_convention_the_history_fails_naming_the_revision(
    postgres: Server, tmp_path: Path, target: str, revision: str, error: str
) -> None:
    project = adopt(make_project(tmp_path))  # naming_convention=y, the default
    url = postgres.create_database()
    line = failed_line(upgrade(project, url, target))
    assert f"migrations/versions/{revision} failed: {error}" in line
    assert "it rolled back" in line


NEW_REVISION = """
op.create_table(
    "label",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("text", sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint("id", name="label_pkey"),
)
"""


def test_the_lint_passes_on_the_history_from_its_baseline(tmp_path: Path) -> None:
    """Held to today's rules, the old revisions fail the lint (and --sql cannot write two of
    them); they ran in production already: with the baseline at their head, only what comes
    after them is linted (here a new table, which passes)."""
    project = adopt(make_project(tmp_path, naming_convention="n"))
    write_history(project.path, {"f00d00000001_label.py": (HEAD, NEW_REVISION, "")})
    everything = run_lint(project.path)
    failed = {name for name, verdict in everything.items() if verdict.outcome == "failed"}
    assert {"8c0e2a4f6b07_thing_slug.py", "9e8d7c6b5a04_index_thing_email.py", DROPS_THING_PKEY} <= failed
    pyproject = project.path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + f'\n[tool.migration_lint]\nbaseline = "{HEAD}"\n')
    verdicts = run_lint(project.path)
    assert set(verdicts) == {SETTINGS_TEST, "f00d00000001_label.py"}
    assert all(verdict.outcome == "passed" for verdict in verdicts.values()), verdicts
