"""thing per tenant

Revision ID: 5d7f9b1c3e05
Revises: 2a4c6e8b0d03
Create Date: 2020-06-30 14:07:48
"""

import sqlalchemy as sa
from alembic import op

revision = "5d7f9b1c3e05"
down_revision = "2a4c6e8b0d03"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("thing", sa.Column("tenant_id", sa.Integer(), server_default="1", nullable=False))
    # The constraints 3f9a0c1b2d01 created, by the names PostgreSQL gave them.
    op.drop_constraint("thing_pkey", "thing", type_="primary")
    op.create_primary_key("thing_pkey", "thing", ["tenant_id", "id"])
    op.drop_constraint("thing_name_key", "thing", type_="unique")
    op.create_unique_constraint("thing_tenant_id_name_key", "thing", ["tenant_id", "name"])


def downgrade():
    op.drop_constraint("thing_tenant_id_name_key", "thing", type_="unique")
    op.create_unique_constraint("thing_name_key", "thing", ["name"])
    op.drop_constraint("thing_pkey", "thing", type_="primary")
    op.create_primary_key("thing_pkey", "thing", ["id"])
    op.drop_column("thing", "tenant_id")
