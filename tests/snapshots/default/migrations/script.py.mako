"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}

# revision identifiers, used by Alembic.
revision: str = ${repr(up_revision)}
down_revision: str | Sequence[str] | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}

# This revision runs in a transaction of its own with a short lock_timeout: a
# statement that would queue behind a long transaction times out, the revision
# rolls back and runs again a moment later (README.md, "In production"). So it
# must be safe to run again from its start. On a table with data:
# - create indexes with postgresql_concurrently=True inside
#   `with op.get_context().autocommit_block():`;
# - add a NOT NULL column with a constant server_default, or as nullable, backfill
#   it, then set NOT NULL behind a validated CHECK constraint (README.md).
# tests/test_migration_lint.py checks this revision's SQL with squawk. To accept one
# of its rules here, add a comment line: squawk-ignore RULE: why it is safe here.


def upgrade() -> None:
    """Upgrade schema."""
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    """Downgrade schema."""
    ${downgrades if downgrades else "pass"}
