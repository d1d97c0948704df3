"""The ORM models: `alembic revision --autogenerate` compares them with the database."""

from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

# Named constraints, so that a later migration can drop or alter them by name
# on every backend (https://alembic.sqlalchemy.org/en/latest/naming.html).
# Alembic applies the convention to every revision's op.* calls too: revisions
# written without it belong in a project rendered with naming_convention=n
# (README.md: "Bring an existing history").
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Base class of every model; its metadata is what the migrations track."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
