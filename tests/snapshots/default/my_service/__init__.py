"""A service whose database schema is managed by async Alembic migrations."""
