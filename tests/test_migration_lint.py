"""The rendered project's migration safety lint, run the way its users run it.

Revisions go into a real render; the rendered tests/test_migration_lint.py then runs in
a pytest of its own (Alembic's offline SQL, then squawk), and its verdict on each revision
file is read back from a JUnit report. Where the lint overrules squawk, or explains why
squawk's advice may not apply, the real PostgreSQL server is asked whether that is true.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.exc import DBAPIError

from rendering import Project, Verdict, render, rendered_pytest, revision_source
from servers import Server

LINT_TEST = "tests/test_migration_lint.py"
# An opt-out comment line in a revision (the rendered lint's syntax).
OPT_OUT = re.compile(r"^\s*#\s*squawk-ignore\b", re.MULTILINE)
INDEX_RULE = "require-concurrent-index-creation"
REQUIRED_RULE = "adding-required-field"
NOT_VALID_RULE = "constraint-missing-not-valid"
DEFAULT_RULE = "adding-field-with-default"
INDEX_DROP_RULE = "require-concurrent-index-deletion"
TYPE_RULE = "changing-column-type"


SETTINGS_TEST = "test_lint_settings"


def run_lint(project: Path) -> dict[str, Verdict]:
    """Run the rendered lint; its verdict on each revision, by file name (and on the
    [tool.migration_lint] settings, as SETTINGS_TEST)."""
    verdicts = rendered_pytest(project, LINT_TEST)
    # test_revision_is_safe_for_postgresql[<revision file>], or test_lint_settings
    return {name.partition("[")[2].removesuffix("]") or name: verdict for name, verdict in verdicts.items()}


def write_history(project: Path, history: dict[str, tuple[str | tuple[str, ...] | None, str, str]]) -> None:
    """Revision files into the render: {file: (down_revision, upgrade body, comment lines)}."""
    versions = project / "migrations" / "versions"
    for name, (down, upgrade, comment) in history.items():
        (versions / name).write_text(revision_source(name.split("_", 1)[0], down, upgrade, comment=comment))


# Revisions after 0001, each on the table that 0001 creates (one with data in production).
CREATE_ACCOUNT = """
op.create_table(
    "account",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("email", sa.String(length=255), nullable=False),
    sa.Column("created", sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_account")),
)
op.create_index(op.f("ix_account_email"), "account", ["email"], unique=True)
"""

COMMITS_ON_ITS_OWN = """
op.get_bind().commit()
with op.get_context().autocommit_block():
    op.execute("ALTER TYPE event_kind ADD VALUE IF NOT EXISTS 'logout'")
"""

REVISIONS: dict[str, tuple[str | tuple[str, ...], str, str]] = {
    # file: (down_revision, upgrade body, comment lines above upgrade())
    "0002_index_on_existing_table.py": ("0001", 'op.create_index("ix_account_created", "account", ["created"])', ""),
    "0003_required_column.py": (
        "0002",
        'op.add_column("account", sa.Column("active", sa.Boolean(), nullable=False))',
        "",
    ),
    "0004_index_concurrently.py": (
        "0003",
        """
        with op.get_context().autocommit_block():
            op.create_index("ix_account_created", "account", ["created"], postgresql_concurrently=True)
        """,
        "",
    ),
    "0005_required_column_with_default.py": (
        "0004",
        'op.add_column("account", sa.Column("verified", sa.Boolean(), server_default=sa.false(), nullable=False))',
        "",
    ),
    # The NOT NULL pattern the rendered README shows, in its two revisions.
    "0006_nullable_then_backfill.py": (
        "0005",
        """
        op.add_column("account", sa.Column("plan", sa.Text(), nullable=True))
        op.execute("UPDATE account SET plan = 'free' WHERE plan IS NULL")
        op.create_check_constraint(
            op.f("ck_account_plan_not_null"), "account", "plan IS NOT NULL", postgresql_not_valid=True
        )
        """,
        "",
    ),
    "0007_set_not_null_after_validate.py": (
        "0006",
        """
        op.execute("ALTER TABLE account VALIDATE CONSTRAINT ck_account_plan_not_null")
        op.alter_column("account", "plan", existing_type=sa.Text(), nullable=False)
        op.drop_constraint(op.f("ck_account_plan_not_null"), "account", type_="check")
        """,
        "# squawk-ignore ban-drop-constraint: the NOT NULL set just before takes over from the CHECK",
    ),
    "0008_opt_out_with_reason.py": (
        "0007",
        'op.add_column("account", sa.Column("region", sa.Text(), nullable=False))',
        "# squawk-ignore adding-required-field: account is emptied by 0003's data fix (illustration)",
    ),
    "0009_opt_out_without_reason.py": (
        "0008",
        'op.add_column("account", sa.Column("tier", sa.Text(), nullable=False))',
        "# squawk-ignore adding-required-field",
    ),
    "0010_opt_out_names_one_rule.py": (
        "0009",
        """
        op.create_index("ix_account_tier", "account", ["tier"])
        op.add_column("account", sa.Column("score", sa.Integer(), nullable=False))
        """,
        "# squawk-ignore adding-required-field: scores are filled in by the same deploy",
    ),
    # Two branches and their merge: the merge's SQL range includes the other branch.
    "0011a_branch.py": ("0010", 'op.add_column("account", sa.Column("note", sa.Text(), nullable=True))', ""),
    "0011b_branch_opted_out.py": (
        "0010",
        'op.create_index("ix_account_region", "account", ["region"])',
        "# squawk-ignore require-concurrent-index-creation: account has 40 rows (illustration)",
    ),
    "0012_merge.py": (("0011a", "0011b"), "pass", ""),
    # Tables with indexes, no primary key yet, and an enum.
    "0013_create_events.py": (
        "0012",
        """
        op.create_table(
            "event",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("kind", sa.Enum("signup", "login", name="event_kind"), nullable=False),
        )
        op.create_index(op.f("ix_event_kind"), "event", ["kind"])
        op.create_table("audit", sa.Column("id", sa.Integer(), nullable=False), sa.Column("at", sa.DateTime()))
        op.create_index(op.f("ix_audit_at"), "audit", ["at"])
        op.create_table("archive", sa.Column("id", sa.Integer(), nullable=False))
        """,
        "",
    ),
    # Revisions that --sql cannot write: the offline connection returns no rows and cannot commit.
    "0014_data_migration_reads_rows.py": (
        "0013",
        """
        rows = op.get_bind().execute(sa.text("SELECT id, email FROM account")).fetchall()
        for id_, email in rows:
            update = sa.text("UPDATE account SET email = :email WHERE id = :id")
            op.execute(update.bindparams(email=email.lower(), id=id_))
        """,
        "",
    ),
    "0015_index_after_unwritable.py": ("0014", 'op.create_index("ix_account_note", "account", ["note"])', ""),
    "0016_commits_before_autocommit_block.py": ("0015", COMMITS_ON_ITS_OWN, ""),
    "0017_commits_skipped.py": (
        "0016",
        COMMITS_ON_ITS_OWN,
        "# squawk-skip: commits before its autocommit block, which --sql cannot write; adds an enum value only",
    ),
    "0018_skip_without_reason.py": (
        "0017",
        "op.execute(\"UPDATE account SET tier = 'basic' WHERE tier IS NULL\")",
        "# squawk-skip",
    ),
    # Where squawk's advice is wrong for PostgreSQL (or, for a type change, may be).
    "0019_text_to_varchar.py": (
        "0018",
        'op.alter_column("account", "note", type_=sa.String(), existing_type=sa.Text(), existing_nullable=True)',
        "",
    ),
    "0020_unique_constraint.py": (
        "0019",
        'op.create_unique_constraint("uq_account_region", "account", ["region"])',
        "",
    ),
    "0021_primary_key.py": ("0020", 'op.create_primary_key("pk_event", "event", ["id"])', ""),
    "0022_primary_key_using_index.py": (
        "0021",
        """
        with op.get_context().autocommit_block():
            op.create_index("pk_audit", "audit", ["id"], unique=True, postgresql_concurrently=True)
        op.execute("ALTER TABLE audit ADD CONSTRAINT pk_audit PRIMARY KEY USING INDEX pk_audit")
        """,
        "",
    ),
    "0023_stable_defaults.py": (
        "0022",
        """
        seen = sa.Column("seen", sa.DateTime(), server_default=sa.text("LOCALTIMESTAMP"), nullable=False)
        op.add_column("account", seen)
        op.add_column("account", sa.Column("joined", sa.Date(), server_default=sa.func.current_date(), nullable=False))
        """,
        "",
    ),
    "0024_volatile_default.py": (
        "0023",
        'op.add_column("account", sa.Column("checked", sa.DateTime(), server_default=sa.text("clock_timestamp()")))',
        "",
    ),
    "0025_drop_table_and_its_index.py": (
        "0024",
        """
        op.drop_index(op.f("ix_event_kind"), table_name="event")
        op.drop_table("event")
        """,
        "# squawk-ignore ban-drop-table: nothing reads event since release 2.3 (illustration)",
    ),
    "0026_drop_index_of_a_kept_table.py": (
        "0025",
        """
        op.drop_index(op.f("ix_audit_at"), table_name="audit")
        op.drop_table("archive")
        """,
        "# squawk-ignore ban-drop-table: nothing reads archive since release 2.3 (illustration)",
    ),
}


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Verdict]:
    project = render(tmp_path_factory.mktemp("lint"))
    write_history(project, {"0001_create_account.py": (None, CREATE_ACCOUNT, ""), **REVISIONS})
    return run_lint(project)


def test_the_lint_reads_no_database_settings(tmp_path: Path) -> None:
    """The README's set-up (.env made from .env.example: the database by its parts), a URL in
    the environment and a secrets directory: none of it clashes with the lint's own URL."""
    project = render(tmp_path)
    write_history(project, {"0001_create_account.py": (None, CREATE_ACCOUNT, "")})
    shutil.copy(project / ".env.example", project / ".env")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "DATABASE_HOST").write_text("db.internal\n")
    env = {"DATABASE_URL": "postgresql://app@elsewhere/app", "SECRETS_DIR": str(secrets)}
    verdicts = rendered_pytest(project, LINT_TEST, env=env)
    assert verdicts and all(verdict.outcome == "passed" for verdict in verdicts.values()), verdicts


def test_every_revision_is_linted(verdicts: dict[str, Verdict]) -> None:
    assert set(verdicts) == {SETTINGS_TEST, "0001_create_account.py", *REVISIONS}
    assert verdicts[SETTINGS_TEST].outcome == "passed", verdicts[SETTINGS_TEST].message


@pytest.mark.parametrize(
    ("revision", "rule", "statement", "not_reported"),
    [
        pytest.param(
            "0002_index_on_existing_table.py",
            INDEX_RULE,
            "CREATE INDEX ix_account_created ON account (created);",
            None,
            id="index-without-concurrently",
        ),
        pytest.param(
            "0003_required_column.py",
            REQUIRED_RULE,
            "ALTER TABLE account ADD COLUMN active BOOLEAN NOT NULL;",
            None,
            id="not-null-column-without-default",
        ),
        pytest.param(
            "0010_opt_out_names_one_rule.py",
            INDEX_RULE,
            "CREATE INDEX ix_account_tier ON account (tier);",
            REQUIRED_RULE,
            id="opt-out-skips-only-the-named-rule",
        ),
        pytest.param(
            "0015_index_after_unwritable.py",
            INDEX_RULE,
            "CREATE INDEX ix_account_note ON account (note);",
            None,
            id="linted-after-a-revision-that-cannot-be-written",
        ),
        # squawk also asks for NOT VALID here, which PostgreSQL refuses for these constraints.
        pytest.param(
            "0020_unique_constraint.py",
            "disallowed-unique-constraint",
            "ALTER TABLE account ADD CONSTRAINT uq_account_region UNIQUE (region);",
            NOT_VALID_RULE,
            id="unique-constraint-without-not-valid-advice",
        ),
        pytest.param(
            "0021_primary_key.py",
            "adding-serial-primary-key-field",
            "ALTER TABLE event ADD CONSTRAINT pk_event PRIMARY KEY (id);",
            NOT_VALID_RULE,
            id="primary-key-without-not-valid-advice",
        ),
        pytest.param(
            "0024_volatile_default.py",
            DEFAULT_RULE,
            "ALTER TABLE account ADD COLUMN checked TIMESTAMP WITHOUT TIME ZONE DEFAULT clock_timestamp();",
            None,
            id="volatile-default",
        ),
        pytest.param(
            "0026_drop_index_of_a_kept_table.py",
            INDEX_DROP_RULE,
            "DROP INDEX ix_audit_at;",
            None,
            id="index-drop-on-a-table-the-revision-keeps",
        ),
        pytest.param(
            "0019_text_to_varchar.py",
            TYPE_RULE,
            "ALTER TABLE account ALTER COLUMN note TYPE VARCHAR;",
            None,
            id="type-change",
        ),
    ],
)
def test_dangerous_revision_fails_naming_file_and_rule(
    verdicts: dict[str, Verdict], revision: str, rule: str, statement: str, not_reported: str | None
) -> None:
    verdict = verdicts[revision]
    assert verdict.outcome == "failed"
    assert f"migrations/versions/{revision}: operations that can lock or break production" in verdict.message
    assert f"  {rule}: " in verdict.message
    assert f"    in: {statement}" in verdict.message
    assert f"https://squawkhq.com/docs/{rule}" in verdict.message
    assert "# squawk-ignore RULE: reason" in verdict.message
    if not_reported:
        assert f"  {not_reported}: " not in verdict.message


@pytest.mark.parametrize(
    "revision",
    [
        pytest.param("0001_create_account.py", id="new-table-with-index"),
        pytest.param("0004_index_concurrently.py", id="index-concurrently-in-autocommit-block"),
        pytest.param("0005_required_column_with_default.py", id="not-null-column-with-server-default"),
        pytest.param("0006_nullable_then_backfill.py", id="readme-not-null-pattern-step-1"),
        pytest.param("0007_set_not_null_after_validate.py", id="readme-not-null-pattern-step-2"),
        pytest.param("0008_opt_out_with_reason.py", id="opt-out-with-reason"),
        pytest.param("0011b_branch_opted_out.py", id="branch-opted-out"),
        pytest.param("0012_merge.py", id="merge-not-blamed-for-its-branches"),
        pytest.param("0013_create_events.py", id="new-tables-with-indexes-and-enum"),
        # Where squawk's advice is wrong for PostgreSQL (test_postgresql_agrees below).
        pytest.param("0022_primary_key_using_index.py", id="primary-key-using-index-built-concurrently"),
        pytest.param("0023_stable_defaults.py", id="not-null-columns-with-localtimestamp-current-date"),
        pytest.param("0025_drop_table_and_its_index.py", id="index-dropped-with-its-table"),
    ],
)
def test_safe_revision_passes(verdicts: dict[str, Verdict], revision: str) -> None:
    assert verdicts[revision].outcome == "passed", verdicts[revision].message


def test_opt_out_without_reason_fails(verdicts: dict[str, Verdict]) -> None:
    verdict = verdicts["0009_opt_out_without_reason.py"]
    assert verdict.outcome == "failed"
    assert re.search(
        r"migrations/versions/0009_opt_out_without_reason\.py:\d+: say why the rule is safe here", verdict.message
    )


@pytest.mark.parametrize(
    ("revision", "error"),
    [
        pytest.param(
            "0014_data_migration_reads_rows.py",
            "AttributeError: 'NoneType' object has no attribute 'fetchall'",
            id="data-migration-reads-rows",
        ),
        pytest.param(
            "0016_commits_before_autocommit_block.py",
            "AttributeError: 'MockConnection' object has no attribute 'commit'",
            id="commits-on-its-own",
        ),
    ],
)
def test_revision_that_cannot_be_written_offline_fails_in_one_line(
    verdicts: dict[str, Verdict], revision: str, error: str
) -> None:
    verdict = verdicts[revision]
    assert verdict.outcome == "failed"
    [line] = verdict.message.strip().splitlines()
    assert line.startswith(f"migrations/versions/{revision}: alembic cannot write its SQL without a database")
    assert f"({error})" in line
    assert line.endswith("# squawk-skip: <reason>")


def test_skip_marker_leaves_the_revision_out(verdicts: dict[str, Verdict]) -> None:
    verdict = verdicts["0017_commits_skipped.py"]
    assert verdict.outcome == "skipped"
    assert "migrations/versions/0017_commits_skipped.py: squawk-skip: commits before its autocommit block" in (
        verdict.message
    )


def test_skip_marker_without_reason_fails(verdicts: dict[str, Verdict]) -> None:
    verdict = verdicts["0018_skip_without_reason.py"]
    assert verdict.outcome == "failed"
    assert re.search(
        r"migrations/versions/0018_skip_without_reason\.py:\d+: say why the lint leaves this revision out:"
        r" `# squawk-skip: <reason>`",
        verdict.message,
    )


def test_type_change_says_when_it_is_safe(verdicts: dict[str, Verdict]) -> None:
    """squawk cannot see the old type in the SQL: the lint keeps the rule and says when to accept it."""
    message = verdicts["0019_text_to_varchar.py"].message
    assert f"  {TYPE_RULE}: " in message
    assert "    note: PostgreSQL rewrites nothing, and holds the lock only for a moment" in message
    assert "text or varchar(n) to text or to varchar without a length, varchar(n) to a longer varchar" in message


# PostgreSQL agrees with the lint where it overrules squawk, or explains why squawk may be wrong.


def table_rewritten(postgres: Server, setup: str, statement: str) -> bool:
    """Whether `statement` gives the table `account` new storage (a rewrite), on the real server."""
    database = postgres.create_database().database
    postgres.execute(
        "CREATE TABLE account (id INTEGER NOT NULL, note TEXT, name VARCHAR(100))",
        "INSERT INTO account SELECT n, 'note ' || n, 'name ' || n FROM generate_series(1, 1000) AS n",
        *([setup] if setup else []),
        database=database,
    )
    storage = "SELECT relfilenode FROM pg_class WHERE relname = 'account'"
    [before] = postgres.execute(storage, database=database)
    postgres.execute(statement, database=database)
    return postgres.execute(storage, database=database) != [before]


@pytest.mark.parametrize(
    ("setup", "statement", "rewritten"),
    [
        # adding-field-with-default: the lint drops squawk's finding for SQL's date and time values.
        *(
            pytest.param("", f"ALTER TABLE account ADD COLUMN at {type_} DEFAULT {default} NOT NULL", False, id=default)
            for type_, default in [
                ("TIMESTAMP WITHOUT TIME ZONE", "LOCALTIMESTAMP"),
                ("TIMESTAMP WITHOUT TIME ZONE", "LOCALTIMESTAMP(3)"),
                ("TIMESTAMP WITH TIME ZONE", "CURRENT_TIMESTAMP(3)"),
                ("DATE", "CURRENT_DATE"),
                ("TIME WITHOUT TIME ZONE", "LOCALTIME"),
                ("TIME WITH TIME ZONE", "CURRENT_TIME"),
            ]
        ),
        pytest.param(
            "",
            "ALTER TABLE account ADD COLUMN at TIMESTAMP DEFAULT clock_timestamp()",
            True,
            id="volatile-default-still-reported",
        ),
        # changing-column-type: what the lint's note says about binary-compatible types.
        pytest.param("", "ALTER TABLE account ALTER COLUMN note TYPE VARCHAR", False, id="text-to-varchar"),
        pytest.param("", "ALTER TABLE account ALTER COLUMN name TYPE TEXT", False, id="varchar-n-to-text"),
        pytest.param("", "ALTER TABLE account ALTER COLUMN name TYPE VARCHAR", False, id="varchar-n-to-varchar"),
        pytest.param("", "ALTER TABLE account ALTER COLUMN name TYPE VARCHAR(200)", False, id="varchar-n-longer"),
        pytest.param(
            "CREATE INDEX ix_account_note ON account (note)",
            "ALTER TABLE account ALTER COLUMN note TYPE VARCHAR",
            False,
            id="text-to-varchar-indexed",
        ),
        pytest.param("", "ALTER TABLE account ALTER COLUMN note TYPE VARCHAR(200)", True, id="text-to-varchar-n"),
        pytest.param("", "ALTER TABLE account ALTER COLUMN name TYPE VARCHAR(50)", True, id="varchar-n-shorter"),
    ],
)
def test_postgresql_rewrites_only_where_the_lint_says(
    postgres: Server, setup: str, statement: str, rewritten: bool
) -> None:
    assert table_rewritten(postgres, setup, statement) is rewritten


@pytest.mark.parametrize("constraint", ["PRIMARY KEY (id)", "UNIQUE (id)"])
def test_postgresql_refuses_not_valid_on_key_constraints(postgres: Server, constraint: str) -> None:
    """What squawk's constraint-missing-not-valid asks for here; the lint drops that finding."""
    database = postgres.create_database().database
    postgres.execute("CREATE TABLE account (id INTEGER NOT NULL)", database=database)
    with pytest.raises(DBAPIError) as refused:
        postgres.execute(f"ALTER TABLE account ADD CONSTRAINT account_key {constraint} NOT VALID", database=database)
    assert refused.value.orig.sqlstate == "0A000"  # feature_not_supported


def test_drop_table_takes_the_lock_that_drop_index_takes(postgres: Server) -> None:
    """Why the lint drops require-concurrent-index-deletion for an index of a table the revision drops."""
    database = postgres.create_database().database
    postgres.execute("CREATE TABLE event (kind TEXT)", "CREATE INDEX ix_event_kind ON event (kind)", database=database)
    locks = (
        "SELECT l.mode FROM pg_locks AS l JOIN pg_class AS c ON c.oid = l.relation"
        " WHERE c.relname = 'event' AND l.pid <> pg_backend_pid()"
    )
    held = {}
    for statement in ["DROP INDEX ix_event_kind", "DROP TABLE event"]:
        with postgres.holding(database, statement):
            held[statement] = postgres.execute(locks, database=database)
    assert held == {
        "DROP INDEX ix_event_kind": [("AccessExclusiveLock",)],
        "DROP TABLE event": [("AccessExclusiveLock",)],
    }


READS_ROWS = 'op.get_bind().execute(sa.text("SELECT id FROM account")).fetchall()'
SKIPPED = "# squawk-skip: reads rows"


@pytest.mark.parametrize("merge_skipped", [False, True], ids=["merge-linted", "merge-skipped"])
def test_merge_of_branches_with_skipped_revisions(tmp_path: Path, merge_skipped: bool) -> None:
    """Alembic writes a merge's SQL from one parent, the other branch along with it: a revision
    left out there cannot be written, so the merge says it must be left out too."""
    project = render(tmp_path)
    write_history(
        project,
        {
            "0001_create_account.py": (None, CREATE_ACCOUNT, ""),
            "0002_reads_rows.py": ("0001", READS_ROWS, SKIPPED),
            "0003_reads_rows.py": ("0001", READS_ROWS, SKIPPED),
            "0004_merge.py": (
                ("0002", "0003"),
                "pass",
                SKIPPED + ", merges two data migrations" if merge_skipped else "",
            ),
        },
    )
    verdicts = run_lint(project)
    if merge_skipped:
        assert verdicts["0004_merge.py"].outcome == "skipped"
        assert all(verdict.outcome in ("passed", "skipped") for verdict in verdicts.values()), verdicts
    else:
        message = verdicts["0004_merge.py"].message
        assert "that revision is left out of the lint, and so must this merge be: # squawk-skip" in message


# A baseline: revisions up to it are neither linted nor written.
# Each revision leaves a trace when Alembic runs its upgrade(), to write its SQL.

TRACE = 'open(__file__ + ".ran", "w").close()'
BASELINE = "b03a"
BASELINE_HISTORY: dict[str, tuple[str | tuple[str, ...] | None, str, str]] = {
    "b01_create_account.py": (None, f"{TRACE}\n{CREATE_ACCOUNT}", ""),
    "b02_index.py": ("b01", f'{TRACE}\nop.create_index("ix_account_created", "account", ["created"])', ""),
    # The baseline, and a branch beside it that is not one of its ancestors.
    "b03a_reads_rows.py": ("b02", f'{TRACE}\nop.get_bind().execute(sa.text("SELECT id FROM account")).fetchall()', ""),
    "b03b_index.py": ("b02", f'{TRACE}\nop.create_index("ix_account_email2", "account", ["email"])', ""),
    "b04_merge.py": (("b03a", "b03b"), TRACE, ""),
    "b05_index.py": ("b04", f'{TRACE}\nop.create_index("ix_account_id", "account", ["id"])', ""),
}
AFTER_BASELINE = {"b03b_index.py", "b04_merge.py", "b05_index.py"}


def baseline_project(path: Path, settings: str) -> Path:
    """A render with BASELINE_HISTORY and `settings` as [tool.migration_lint] in pyproject.toml."""
    project = render(path)
    write_history(project, BASELINE_HISTORY)
    with (project / "pyproject.toml").open("a") as pyproject:
        pyproject.write(f"\n[tool.migration_lint]\n{settings}\n")
    return project


@pytest.fixture(scope="module")
def after_baseline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Verdict]]:
    project = baseline_project(tmp_path_factory.mktemp("baseline"), f'baseline = "{BASELINE}"')
    return project, run_lint(project)


def test_baseline_and_its_ancestors_are_not_linted(after_baseline: tuple[Path, dict[str, Verdict]]) -> None:
    _, verdicts = after_baseline
    assert set(verdicts) == {SETTINGS_TEST, *AFTER_BASELINE}
    assert verdicts[SETTINGS_TEST].outcome == "passed", verdicts[SETTINGS_TEST].message


def test_baseline_and_its_ancestors_are_not_written(after_baseline: tuple[Path, dict[str, Verdict]]) -> None:
    """Not even run offline: an adopted history may hold revisions that cannot be."""
    project, _ = after_baseline
    ran = {path.name.removesuffix(".ran") for path in (project / "migrations" / "versions").glob("*.ran")}
    assert ran == AFTER_BASELINE


@pytest.mark.parametrize(
    ("revision", "outcome"),
    [
        pytest.param("b03b_index.py", "failed", id="branch-beside-the-baseline"),
        pytest.param("b04_merge.py", "passed", id="merge-of-the-baseline-and-a-branch"),
        pytest.param("b05_index.py", "failed", id="after-the-merge"),
    ],
)
def test_revisions_after_the_baseline_are_linted(
    after_baseline: tuple[Path, dict[str, Verdict]], revision: str, outcome: str
) -> None:
    _, verdicts = after_baseline
    assert verdicts[revision].outcome == outcome, verdicts[revision].message
    if outcome == "failed":
        assert f"migrations/versions/{revision}: operations that can lock or break production" in (
            verdicts[revision].message
        )
        assert f"  {INDEX_RULE}: " in verdicts[revision].message


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        pytest.param(
            'baseline = "c0ffee"',
            "pyproject.toml: [tool.migration_lint] baseline = 'c0ffee' is not a revision of migrations",
            id="unknown-revision",
        ),
        pytest.param(
            'baseline = "head"',
            "pyproject.toml: [tool.migration_lint] baseline = 'head' is not a revision of migrations",
            id="head-moves-on",
        ),
        pytest.param(
            'base_line = "b02"',
            "pyproject.toml: [tool.migration_lint] has `baseline` only, not ['base_line']",
            id="misspelt-setting",
        ),
    ],
)
def test_wrong_baseline_fails_naming_pyproject(tmp_path: Path, settings: str, problem: str) -> None:
    verdicts = run_lint(baseline_project(tmp_path, settings))
    assert not [name for name in verdicts if name.endswith(".py")], "nothing is linted until the baseline is fixed"
    assert verdicts[SETTINGS_TEST].outcome == "failed"
    assert problem in verdicts[SETTINGS_TEST].message


# Autogenerate against a real PostgreSQL: what users actually commit.

MODELS = """
import enum
from datetime import datetime
from decimal import Decimal

from sqlalchemy import JSON, BigInteger, DateTime, Enum, ForeignKey, Numeric, SmallInteger, String, Text
from sqlalchemy.orm import Mapped, mapped_column


class Plan(enum.Enum):
    free = "free"
    paid = "paid"


class Account(Base):
    __tablename__ = "account"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(255), unique=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    created: Mapped[datetime]
    active: Mapped[bool] = mapped_column(default=True)
    plan: Mapped[Plan] = mapped_column(Enum(Plan))
    balance: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    note: Mapped[str | None] = mapped_column(Text)
    settings: Mapped[dict | None] = mapped_column(JSON)
"""

SECOND_TABLE = """
class Invoice(Base):
    __tablename__ = "invoice"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("account.id", ondelete="CASCADE"), index=True)
    issued: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lines: Mapped[int] = mapped_column(SmallInteger)
"""


@dataclass
class Autogenerated:
    new_tables: list[Path]
    index_on_existing_table: Path
    verdicts: dict[str, Verdict]


@pytest.fixture(scope="module")
def autogenerated(postgres: Server, tmp_path_factory: pytest.TempPathFactory) -> Autogenerated:
    """Three autogenerated revisions: two new tables, then an index on the first one."""
    path = render(tmp_path_factory.mktemp("autogenerate"))
    project = Project(path, path.name.replace("-", "_"))
    env = {"DATABASE_URL": postgres.create_database().render_as_string(hide_password=False)}
    models = project.path / project.package / "models.py"
    versions = project.path / "migrations" / "versions"

    def autogenerate(message: str) -> Path:
        before = set(versions.glob("*.py"))
        for args in (["revision", "--autogenerate", "-m", message], ["upgrade", "head"]):
            result = project.cli(*args, env=env)
            assert result.returncode == 0, result.stderr
        [new] = set(versions.glob("*.py")) - before
        return new

    project.add_model(MODELS)
    first = autogenerate("create account")
    project.add_model(SECOND_TABLE)
    second = autogenerate("create invoice")
    indexed = "created: Mapped[datetime] = mapped_column(index=True)"
    models.write_text(models.read_text().replace("created: Mapped[datetime]", indexed))
    third = autogenerate("index account created")
    return Autogenerated([first, second], third, run_lint(project.path))


def test_autogenerated_revisions_for_new_tables_pass_without_opt_outs(autogenerated: Autogenerated) -> None:
    for path in autogenerated.new_tables:
        verdict = autogenerated.verdicts[path.name]
        assert verdict.outcome == "passed", verdict.message
        assert not OPT_OUT.search(path.read_text()), "autogenerate wrote an opt-out?"


def test_autogenerated_index_on_an_existing_table_fails(autogenerated: Autogenerated) -> None:
    path = autogenerated.index_on_existing_table
    assert "op.create_index" in path.read_text()
    verdict = autogenerated.verdicts[path.name]
    assert verdict.outcome == "failed"
    assert f"migrations/versions/{path.name}: operations" in verdict.message
    assert f"  {INDEX_RULE}: " in verdict.message


# Which renders have the lint


@pytest.mark.parametrize(
    ("answers", "linted"),
    [
        pytest.param({}, True, id="defaults"),
        pytest.param({"migration_lint": "n"}, False, id="postgresql-lint-n"),
        # squawk knows only PostgreSQL: the default `y` renders nothing for the others.
        pytest.param({"database": "sqlite"}, False, id="sqlite-default-answers"),
        pytest.param({"database": "mysql", "migration_lint": "y"}, False, id="mysql-lint-y"),
    ],
)
def test_lint_is_rendered_only_for_postgresql(tmp_path: Path, answers: dict[str, str], linted: bool) -> None:
    project = render(tmp_path, **answers)
    assert (project / LINT_TEST).is_file() is linted
    assert (project / ".squawk.toml").is_file() is linted
    assert ("squawk-cli" in (project / "pyproject.toml").read_text()) is linted
    assert ("## Migration safety lint" in (project / "README.md").read_text()) is linted
    assert ("squawk-ignore" in (project / "migrations" / "script.py.mako").read_text()) is linted
