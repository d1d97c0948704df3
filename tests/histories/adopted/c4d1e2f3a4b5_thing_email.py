"""thing email

Revision ID: c4d1e2f3a4b5
Revises: 7b2e4d6f8a02
Create Date: 2020-01-14 09:41:02
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "c4d1e2f3a4b5"
down_revision = "7b2e4d6f8a02"
branch_labels = None
depends_on = None


def upgrade():
    op.execute("CREATE EXTENSION IF NOT EXISTS citext")
    op.add_column("thing", sa.Column("email", postgresql.CITEXT(), nullable=True))


def downgrade():
    op.drop_column("thing", "email")
