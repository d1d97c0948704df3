"""The checks every migration history must pass, on the real database."""

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory


def revisions_in_order(config: Config) -> list[str]:
    """Revision ids from the first to the head."""
    script = ScriptDirectory.from_config(config)
    return [revision.revision for revision in reversed(list(script.walk_revisions()))]


def test_single_head(alembic_config: Config) -> None:
    heads = ScriptDirectory.from_config(alembic_config).get_heads()
    assert len(heads) <= 1, f"several heads {heads}: run `alembic merge heads`"


def test_upgrade_and_downgrade_one_step_at_a_time(alembic_config: Config) -> None:
    revisions = revisions_in_order(alembic_config)
    for revision in revisions:
        command.upgrade(alembic_config, revision)
    for _ in revisions:
        command.downgrade(alembic_config, "-1")
    # Every downgrade cleaned up after itself: the whole history applies again.
    command.upgrade(alembic_config, "head")
    command.downgrade(alembic_config, "base")


def test_models_match_database(alembic_config: Config) -> None:
    command.upgrade(alembic_config, "head")
    try:
        # Fails when the models and the migrated schema differ: a revision is missing.
        command.check(alembic_config)
    finally:
        command.downgrade(alembic_config, "base")
