"""The rendered project's migration checks (its tests/test_migrations.py), run as its
developers run them, against the real database, on a history that branched and merged:

    0001 thing ─┬─ 0002 index on thing.name ─┬─ 0004 merge: table tag
                └─ 0003 column thing.colour ─┘

Alembic walks such a history by revision id only: a step of `-1` down from the merge is
ambiguous.
"""

from __future__ import annotations

from rendering import THING_UPGRADE, Project, make_project, rendered_pytest
from servers import url_string

MODELS = """
from sqlalchemy import Enum, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column


class Thing(Base):
    __tablename__ = "thing"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    colour: Mapped[str | None] = mapped_column(String(20))


class Tag(Base):
    __tablename__ = "tag"

    id: Mapped[int] = mapped_column(primary_key=True)
    thing_id: Mapped[int] = mapped_column(ForeignKey("thing.id"))
    kind: Mapped[str] = mapped_column(Enum("colour", "size", name="tag_kind"))
"""

CREATE_TAG = """
op.create_table(
    "tag",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("thing_id", sa.Integer(), nullable=False),
    sa.Column("kind", sa.Enum("colour", "size", name="tag_kind"), nullable=False),
    sa.ForeignKeyConstraint(["thing_id"], ["thing.id"], name=op.f("fk_tag_thing_id_thing")),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_tag")),
)
"""
# On PostgreSQL the enum is a type of its own, which outlives the table.
DROP_TAG = """
op.drop_table("tag")
sa.Enum(name="tag_kind").drop(op.get_bind(), checkfirst=True)
"""

# pytest-alembic's standard checks, and the rendered project's own.
CHECKS = {
    "test_single_head_revision",
    "test_upgrade",
    "test_up_down_consistency",
    "test_model_definitions_match_ddl",
    "test_downgrade_leaves_no_trace",
}


def add_branched_history(project: Project) -> None:
    project.add_model(MODELS)
    project.add_revision("0001", None, THING_UPGRADE, 'op.drop_table("thing")')
    project.add_revision(
        "0002",
        "0001",
        'op.create_index(op.f("ix_thing_name"), "thing", ["name"])',
        'op.drop_index(op.f("ix_thing_name"), table_name="thing")',
    )
    project.add_revision(
        "0003",
        "0001",
        'op.add_column("thing", sa.Column("colour", sa.String(length=20), nullable=True))',
        """
        with op.batch_alter_table("thing") as batch:
            batch.drop_column("colour")
        """,
    )
    project.add_revision("0004", ("0002", "0003"), CREATE_TAG, DROP_TAG)


def test_checks_pass_on_branches_and_a_merge(backend, backend_project: Project) -> None:
    add_branched_history(backend_project)
    url = url_string(backend.create_database())
    verdicts = rendered_pytest(backend_project.path, "tests/test_migrations.py", env={"TEST_DATABASE_URL": url})
    assert set(verdicts) == CHECKS
    failed = {name: verdict.message for name, verdict in verdicts.items() if verdict.outcome != "passed"}
    assert failed == {}


def test_downgrade_that_leaves_a_table_behind_is_named(backend, backend_project: Project) -> None:
    add_branched_history(backend_project)
    backend_project.add_model(
        """
        class AuditLog(Base):
            __tablename__ = "audit_log"

            id: Mapped[int] = mapped_column(primary_key=True)
        """
    )
    leaky = backend_project.add_revision(
        "0005",
        "0004",
        """
        op.create_table(
            "audit_log",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
        )
        """,
        "pass",
        file_name="0005_audit_log.py",
    )
    url = url_string(backend.create_database())
    verdicts = rendered_pytest(backend_project.path, "tests/test_migrations.py", env={"TEST_DATABASE_URL": url})
    verdict = verdicts["test_downgrade_leaves_no_trace"]
    assert verdict.outcome == "failed"
    assert f"the downgrade of 0005 ({leaky}) leaves a trace:" in verdict.message
    assert "table audit_log is left behind" in verdict.message
    # Every check started from an empty database: the table the others left did not get in the way.
    assert verdicts["test_upgrade"].outcome == "passed"
    assert verdicts["test_model_definitions_match_ddl"].outcome == "passed"


def test_downgrade_that_leaves_an_enum_type_behind_is_named(postgres, tmp_path) -> None:
    """PostgreSQL keeps an enum type when its table is dropped: the downgrade must drop it too."""
    project = make_project(tmp_path)
    add_branched_history(project)
    merge = project.add_revision("0004", ("0002", "0003"), CREATE_TAG, 'op.drop_table("tag")')
    url = url_string(postgres.create_database())
    verdicts = rendered_pytest(project.path, "tests/test_migrations.py", env={"TEST_DATABASE_URL": url})
    verdict = verdicts["test_downgrade_leaves_no_trace"]
    assert verdict.outcome == "failed"
    assert f"the downgrade of 0004 ({merge}) leaves a trace:" in verdict.message
    assert "enum tag_kind is left behind" in verdict.message
    assert verdicts["test_upgrade"].outcome == "passed"
