"""thing size huge

Revision ID: 2a4c6e8b0d03
Revises: 3f9a0c1b2d01
Create Date: 2019-11-08 11:30:19
"""

from alembic import op

revision = "2a4c6e8b0d03"
down_revision = "3f9a0c1b2d01"
branch_labels = None
depends_on = None


def upgrade():
    # Before PostgreSQL 12, ALTER TYPE ... ADD VALUE cannot run inside a transaction block;
    # since then it can, but the new value is usable only once that transaction committed.
    with op.get_context().autocommit_block():
        op.execute("ALTER TYPE thing_size ADD VALUE IF NOT EXISTS 'huge' AFTER 'large'")


def downgrade():
    # PostgreSQL cannot drop a value from an enum type.
    pass
