"""create thing

Revision ID: 3f9a0c1b2d01
Revises:
Create Date: 2019-03-04 10:12:40
"""

import sqlalchemy as sa
from alembic import op

revision = "3f9a0c1b2d01"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    # No constraint names: PostgreSQL names them thing_pkey, thing_name_key, ...
    thing = op.create_table(
        "thing",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("size", sa.Enum("small", "large", name="thing_size"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.bulk_insert(
        thing,
        [
            {"id": 1, "name": "Red Balloon", "size": "small"},
            {"id": 2, "name": "Steam Engine", "size": "large"},
            {"id": 3, "name": "Ocean Liner Model", "size": "large"},
        ],
    )


def downgrade():
    op.drop_table("thing")
    sa.Enum(name="thing_size").drop(op.get_bind())
