"""The checks every migration history must pass, on the real database.

pytest-alembic's standard checks: one head, an upgrade from base to head, every revision
up and then down one at a time (by revision id, so branches and their merges pass). And
two of ours: the models match the migrated database, every downgrade leaves no trace.
"""

import asyncio
from typing import Any

import pytest
from alembic.config import Config
from alembic.script import Script, ScriptDirectory
from pytest_alembic import MigrationContext
from pytest_alembic.tests import test_single_head_revision, test_up_down_consistency, test_upgrade
from sqlalchemy import Connection, inspect
from sqlalchemy.ext.asyncio import AsyncEngine

# pytest runs the test functions a test module imports as that module's own.
__all__ = ["test_single_head_revision", "test_up_down_consistency", "test_upgrade"]


def test_model_definitions_match_ddl(alembic_runner: MigrationContext) -> None:
    """`alembic check` at head: fails, listing the differences, when a revision is missing.

    pytest-alembic's check of the same name stops its autogenerate run with an exception
    of its own, which env.py reports as a failed migration.
    """
    alembic_runner.migrate_up_to("heads")
    alembic_runner.raw_command("check")


def test_downgrade_leaves_no_trace(
    alembic_runner: MigrationContext, alembic_config: Config, alembic_engine: AsyncEngine
) -> None:
    """After a revision's upgrade and downgrade, the schema is what it was before the upgrade.

    pytest-alembic's experimental check of the same name rolls each cycle back in a
    savepoint, which DDL on MySQL commits past, and hands env.py a stand-in for a
    Connection: this one runs the real commands and compares what the database reports.
    """
    script = ScriptDirectory.from_config(alembic_config)
    # In the order pytest-alembic walks them, from the first revision to the heads.
    for revision in map(script.get_revision, alembic_runner.history.revisions[1:-1]):
        before = schema_of(alembic_engine)
        alembic_runner.raw_command("upgrade", revision.revision)
        alembic_runner.raw_command("downgrade", undo_target(revision))
        if trace := differences(before, schema_of(alembic_engine)):
            pytest.fail(f"the downgrade of {revision.revision} ({revision.path}) leaves a trace:\n{trace}")
        alembic_runner.raw_command("upgrade", revision.revision)


def undo_target(revision: Script) -> str:
    """The downgrade target that undoes `revision` alone, other branches left as they are."""
    if revision.is_merge_point:
        # Back to one parent: only the merge descends from it (`-1` would be ambiguous).
        return revision.down_revision[0]
    return f"{revision.revision}@-1"


def schema_of(engine: AsyncEngine) -> dict[str, Any]:
    """The schema as the database's Inspector reports it, without Alembic's version table."""

    async def inspect_schema() -> dict[str, Any]:
        async with engine.connect() as connection:
            return await connection.run_sync(schema)

    return asyncio.run(inspect_schema())


def schema(connection: Connection) -> dict[str, Any]:
    """Tables (columns with their types, keys, indexes, constraints) and views, by name;
    sequences and enum types where the database has them."""
    inspector = inspect(connection)
    found: dict[str, Any] = {}
    for table in inspector.get_table_names():
        if table == "alembic_version":
            continue
        found[f"table {table}"] = {
            "columns": [
                (column["name"], repr(column["type"]), column["nullable"], column.get("default"))
                for column in inspector.get_columns(table)
            ],
            "primary key": inspector.get_pk_constraint(table),
            "foreign keys": by_name(inspector.get_foreign_keys(table)),
            "indexes": by_name(inspector.get_indexes(table)),
            "unique constraints": by_name(inspector.get_unique_constraints(table)),
            "check constraints": by_name(inspector.get_check_constraints(table)),
        }
    for view in inspector.get_view_names():
        found[f"view {view}"] = inspector.get_view_definition(view)
    if connection.dialect.supports_sequences:
        for sequence in inspector.get_sequence_names():
            found[f"sequence {sequence}"] = True
    if hasattr(inspector, "get_enums"):
        # PostgreSQL's CREATE TYPE ... AS ENUM: a type of its own, which outlives its tables.
        for enum in inspector.get_enums():
            found[f"enum {enum['name']}"] = enum["labels"]
    return found


def by_name(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(items, key=lambda item: str(item.get("name")))


def differences(before: dict[str, Any], after: dict[str, Any]) -> str:
    """What the schema `after` has that it had not `before`, and the other way round."""
    lines = [f"  {name} is left behind" for name in sorted(after.keys() - before.keys())]
    lines += [f"  {name} is gone" for name in sorted(before.keys() - after.keys())]
    for name in sorted(before.keys() & after.keys()):
        if before[name] != after[name]:
            lines.append(f"  {name} differs:\n    before: {before[name]}\n    after:  {after[name]}")
    return "\n".join(lines)
