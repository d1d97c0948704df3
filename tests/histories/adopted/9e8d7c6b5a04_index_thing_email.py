"""index thing email

Revision ID: 9e8d7c6b5a04
Revises: c4d1e2f3a4b5
Create Date: 2020-02-03 18:20:55
"""

from alembic import op

revision = "9e8d7c6b5a04"
down_revision = "c4d1e2f3a4b5"
branch_labels = None
depends_on = None


def upgrade():
    # CREATE INDEX CONCURRENTLY cannot run inside a transaction block: end it first.
    op.get_bind().commit()
    with op.get_context().autocommit_block():
        op.create_index("thing_email_idx", "thing", ["email"], unique=True, postgresql_concurrently=True)


def downgrade():
    op.drop_index("thing_email_idx", table_name="thing")
