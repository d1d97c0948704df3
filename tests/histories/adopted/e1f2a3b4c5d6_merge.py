"""merge email and tenant branches

Revision ID: e1f2a3b4c5d6
Revises: 9e8d7c6b5a04, 5d7f9b1c3e05
Create Date: 2020-07-02 08:55:13
"""

revision = "e1f2a3b4c5d6"
down_revision = ("9e8d7c6b5a04", "5d7f9b1c3e05")
branch_labels = None
depends_on = None


def upgrade():
    pass


def downgrade():
    pass
