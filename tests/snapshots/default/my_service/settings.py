"""Database settings, read from environment variables, `.env` and secret files.

Sources, highest priority first: environment variables, the `.env` file in the
current directory, files in the secrets directory (SECRETS_DIR, default
/run/secrets, one file per variable, named like it), then the defaults below.
Every database variable starts with DATABASE_.
"""

from __future__ import annotations

import os
import re
from typing import Self

from pydantic import PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

ENV_PREFIX = "DATABASE_"
SECRETS_DIR_VAR = "SECRETS_DIR"
DEFAULT_SECRETS_DIR = "/run/secrets"

ASYNC_DRIVER = "postgresql+asyncpg"
# What tools that need a synchronous driver get from sync_url().
SYNC_DRIVER = "postgresql+psycopg"
# postgres://, postgresql:// and postgresql+<any driver>:// all mean this database.
BACKENDS = frozenset({"postgres", "postgresql"})
EXAMPLE_URL = "postgresql://user:password@localhost:5432/dbname"
# libpq's sslmode is what managed databases hand out; asyncpg calls it ssl.
SSL_PARAMS = {"sslmode": "ssl"}
# URL query parameters that reach asyncpg intact; anything else is an error
# here rather than a TypeError deep inside the driver.
DRIVER_PARAMS = frozenset({"ssl", "target_session_attrs"})
# A PostgreSQL duration, as lock_timeout and statement_timeout take it.
DURATION = re.compile(r"\d+(\.\d+)?\s*(us|ms|s|min|h|d)?")


class SettingsError(ValueError):
    """The settings are missing or invalid; the message names what to set."""


def env_var(field: str) -> str:
    """The environment variable that sets `field`."""
    return ENV_PREFIX + field.upper()


class DatabaseSettings(BaseSettings):
    """Where the database is and how migrations talk to it."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        # A shared .env holds other services' keys too: ignore them.
        extra="ignore",
        # Never echo a rejected value: it may be a password.
        hide_input_in_errors=True,
    )

    # Either a whole URL (the password percent-encoded) ...
    url: SecretStr | None = None
    # ... or its parts (the password as it is, any characters).
    host: str | None = None
    port: int = 5432
    user: str | None = None
    password: SecretStr | None = None
    name: str | None = None

    # Seconds to wait for the server before giving up.
    connect_timeout: float = 10.0
    # Migration session limits: a migration must not queue behind a long
    # transaction for ever (lock_timeout), nor run without bound (statement_timeout).
    # PostgreSQL interval syntax: "5s", "2min", "0" for no limit.
    lock_timeout: str = "5s"
    statement_timeout: str = "0"
    # Replicas that start together take turns: the first migrates, the others
    # wait for this lock, then find nothing left to do.
    migration_lock: bool = True
    migration_lock_timeout: str = "5min"
    # PgBouncer in transaction mode: no server-side prepared statement cache,
    # and the whole run in one transaction, so that lock and limits hold.
    pgbouncer: bool = False
    # What a DBA sees in pg_stat_activity.
    application_name: str = "my-service-migrations"

    _url: URL = PrivateAttr()

    @field_validator("lock_timeout", "statement_timeout", "migration_lock_timeout")
    @classmethod
    def _duration(cls, value: str) -> str:
        if not DURATION.fullmatch(value.strip()):
            raise ValueError("expected a duration like 500ms, 5s, 2min or 0")
        return value.strip()

    @model_validator(mode="after")
    def _build_url(self) -> Self:
        if self.url is not None:
            self._url = parse_url(self.url.get_secret_value())
            return self
        missing = [field for field in ("host", "user", "name") if getattr(self, field) is None]
        if missing:
            variables = ", ".join(map(env_var, missing))
            raise ValueError(f"set {env_var('url')}, or {variables} (and {env_var('password')})")
        password = self.password.get_secret_value() if self.password else None
        self._url = URL.create(
            ASYNC_DRIVER,
            username=self.user,
            password=password,
            host=self.host,
            port=self.port,
            database=self.name,
        )
        return self

    def async_url(self) -> URL:
        """The URL for the async engine (`str()` of it hides the password)."""
        return self._url

    def sync_url(self) -> URL:
        """The same database through a synchronous driver, for tools that need one."""
        query = {("sslmode" if key == "ssl" else key): value for key, value in self._url.query.items()}
        return self._url.set(drivername=SYNC_DRIVER, query=query)

    def variables(self, *fields: str) -> str:
        """The variables that set `fields` (or the URL, when one is set), for messages."""
        if self.url is not None or not fields:
            return env_var("url")
        return " and ".join(map(env_var, fields))


def parse_url(raw: str) -> URL:
    """Turn a DATABASE_URL value into the async driver's URL."""
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):
        # These messages quote the URL, password and all.
        raise ValueError(f"{env_var('url')} is not a URL like {EXAMPLE_URL}") from None
    if url.get_backend_name() not in BACKENDS:
        raise ValueError(f"{env_var('url')} must be a URL like {EXAMPLE_URL}, not {url.drivername}://...")
    query = {SSL_PARAMS.get(key, key): value for key, value in url.query.items()}
    unsupported = sorted(set(query) - DRIVER_PARAMS)
    if unsupported:
        raise ValueError(
            f"{env_var('url')}: asyncpg does not take {', '.join(unsupported)} in the URL"
            f" (it takes {', '.join(sorted(DRIVER_PARAMS | SSL_PARAMS.keys()))};"
            " timeouts are settings of their own)"
        )
    return url.set(drivername=ASYNC_DRIVER, query=query)


def load_settings(**overrides: object) -> DatabaseSettings:
    """Read the settings; raise SettingsError with one line naming what to fix."""
    secrets_dir = os.environ.get(SECRETS_DIR_VAR, DEFAULT_SECRETS_DIR)
    try:
        return DatabaseSettings(
            # A missing secrets directory is normal outside a container.
            _secrets_dir=secrets_dir if os.path.isdir(secrets_dir) else None,
            **overrides,
        )
    except ValidationError as exc:
        raise SettingsError(f"database settings: {describe(exc)}") from None


def describe(exc: ValidationError) -> str:
    """One line for all of a ValidationError, naming env vars, never values."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        cause = error.get("ctx", {}).get("error")
        message = str(cause) if cause is not None else error["msg"]
        if error["loc"]:
            message = f"{env_var(str(error['loc'][0]))}: {message}"
        problems.append(message)
    return "; ".join(problems)
