"""The rendered project's migration safety lint, run the way its users run it.

Revisions go into a real render; the rendered tests/test_migration_lint.py then runs in
a pytest of its own, with `alembic upgrade <down>:<rev> --sql` and squawk, and its verdict on
each revision file is read back from a JUnit report.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from rendering import Project, render, subprocess_env
from servers import Server

LINT_TEST = "tests/test_migration_lint.py"
# An opt-out comment line in a revision (the rendered lint's syntax).
OPT_OUT = re.compile(r"^\s*#\s*squawk-ignore\b", re.MULTILINE)
INDEX_RULE = "require-concurrent-index-creation"
REQUIRED_RULE = "adding-required-field"


def revision_file(revision: str, down: str | tuple[str, ...] | None, upgrade: str, comment: str = "") -> str:
    """A revision as `alembic revision` writes one, with `upgrade` as the body of upgrade()."""
    comment = f"\n{comment}\n" if comment else ""
    return (
        f'"""{revision}"""\n\nimport sqlalchemy as sa\nfrom alembic import op\n\n'
        f"revision = {revision!r}\ndown_revision = {down!r}\nbranch_labels = None\ndepends_on = None\n"
        f"{comment}\n\ndef upgrade() -> None:\n{textwrap.indent(textwrap.dedent(upgrade).strip(), '    ')}\n\n\n"
        "def downgrade() -> None:\n    pass\n"
    )


@dataclass
class Verdict:
    outcome: str  # "passed" or "failed"
    message: str


def run_lint(project: Path) -> dict[str, Verdict]:
    """Run the rendered lint; its verdict on each revision, by file name."""
    report = project / "lint-report.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", LINT_TEST, "-p", "no:cacheprovider", f"--junitxml={report}", "-q"],
        cwd=project,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.is_file(), result.stdout + result.stderr
    verdicts = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        # test_revision_is_safe_for_postgresql[<revision file>]
        name = case.get("name", "").partition("[")[2].removesuffix("]")
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        verdicts[name] = Verdict("passed", "") if problem is None else Verdict("failed", problem.text or "")
    return verdicts


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
}


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Verdict]:
    project = render(tmp_path_factory.mktemp("lint"))
    versions = project / "migrations" / "versions"
    (versions / "0001_create_account.py").write_text(revision_file("0001", None, CREATE_ACCOUNT))
    for name, (down, upgrade, comment) in REVISIONS.items():
        revision = name.split("_", 1)[0]
        (versions / name).write_text(revision_file(revision, down, upgrade, comment))
    return run_lint(project)


def test_every_revision_is_linted(verdicts: dict[str, Verdict]) -> None:
    assert set(verdicts) == {"0001_create_account.py", *REVISIONS}


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
