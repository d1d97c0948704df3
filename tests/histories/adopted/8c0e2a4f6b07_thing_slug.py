"""thing slug

Revision ID: 8c0e2a4f6b07
Revises: e1f2a3b4c5d6
Create Date: 2021-04-19 13:22:37
"""

import sqlalchemy as sa
from alembic import op

revision = "8c0e2a4f6b07"
down_revision = "e1f2a3b4c5d6"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("thing", sa.Column("slug", sa.Text(), nullable=True))
    bind = op.get_bind()
    # A data migration: read the rows, compute in Python, write back.
    for id_, name in bind.execute(sa.text("SELECT id, name FROM thing")).fetchall():
        slug = "-".join(name.lower().split())
        bind.execute(sa.text("UPDATE thing SET slug = :slug WHERE id = :id"), {"slug": slug, "id": id_})
    op.alter_column("thing", "slug", existing_type=sa.Text(), nullable=False)
    # The value 2a4c6e8b0d03 added, usable now that it is committed.
    op.execute("UPDATE thing SET size = 'huge' WHERE name LIKE 'Ocean%'")


def downgrade():
    op.execute("UPDATE thing SET size = 'large' WHERE size = 'huge'")
    op.drop_column("thing", "slug")
