"""thing name not blank

Revision ID: 7b2e4d6f8a02
Revises: 3f9a0c1b2d01
Create Date: 2019-05-21 16:03:11
"""

from alembic import op

revision = "7b2e4d6f8a02"
down_revision = "3f9a0c1b2d01"
branch_labels = None
depends_on = None


def upgrade():
    # An unnamed CHECK: PostgreSQL calls it thing_name_check.
    op.create_check_constraint(None, "thing", "name <> ''")


def downgrade():
    op.drop_constraint("thing_name_check", "thing", type_="check")
