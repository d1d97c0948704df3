"""The database settings: where PostgreSQL is, and how migrations behave on it.

Every variable starts with DATABASE_ (README.md, "Configure the database").
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Self

from pydantic import Field, PrivateAttr, SecretStr, StringConstraints, field_validator, model_validator
from sqlalchemy.engine import URL

from .settings_base import (
    HOST,
    Duration,
    NoDatabaseSet,
    Port,
    Seconds,
    SettingsBase,
    Trimmed,
    env_var,
    parse_url,
)

ASYNC_DRIVER = "postgresql+asyncpg"
# postgres://, postgresql:// and postgresql+<any driver>:// all mean this database.
BACKENDS = frozenset({"postgres", "postgresql"})
EXAMPLE_URL = "postgresql://user:password@localhost:5432/dbname"
SEVERAL_HOSTS = "several servers go in ?host=: postgresql://user:password@/dbname?host=a:5432&host=b:5432"
# libpq's sslmode is what managed databases hand out; asyncpg calls it ssl.
SSL_PARAMS = {"sslmode": "ssl"}
# URL query parameters that reach asyncpg intact; anything else is an error
# here rather than a TypeError deep inside the driver. ?host= names a Unix socket
# directory (as managed databases hand out: /cloudsql/project:region:instance).
DRIVER_PARAMS = frozenset({"ssl", "target_session_attrs", "host"})
HOST_AND_PORT = re.compile("(?:" + HOST.pattern + r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?")
TARGET_SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")
# PostgreSQL's longest name (NAMEDATALEN - 1).
MAX_NAME_BYTES = 63
# Besides pg_*, which PostgreSQL reserves for itself.
SYSTEM_SCHEMAS = frozenset({"information_schema"})
# A name with spaces around it stripped (an empty one is refused with the name's length rule).
Stripped = Annotated[str, StringConstraints(strip_whitespace=True)]


class DatabaseSettings(SettingsBase):
    """Where the database is and how migrations talk to it."""

    # Either a whole URL (the password percent-encoded) ...
    url: SecretStr | None = None
    # ... or its parts (the password as it is, any characters). The host is a name, an
    # IP address, or the directory of a Unix socket (/var/run/postgresql), whose file
    # the port chooses.
    host: Trimmed | None = None
    port: Port = 5432
    user: Trimmed | None = None
    password: SecretStr | None = None
    name: Trimmed | None = None

    # Seconds to wait for the server to answer before giving up.
    connect_timeout: Seconds = 10.0
    # How long to keep trying the first connection while the server is not up yet: it
    # refuses, cannot be reached, does not answer, or says it is starting up (a database
    # container that starts next to this one). 0: fail at once. A wrong password or
    # database name fails at once either way: waiting does not fix it.
    wait: Duration = timedelta(0)

    # Lock waits (README.md, "In production"). A migration waiting for a table lock
    # makes every query on that table queue behind it: each attempt of a revision
    # waits at most lock_timeout (the first attempt lock_timeout_first, longer ones
    # after it), then rolls back, sleeps and tries again, for at most
    # lock_retry_budget per revision (0: a single attempt).
    lock_timeout: Duration = timedelta(milliseconds=400)
    lock_timeout_first: Duration = timedelta(milliseconds=100)
    lock_retry_budget: Duration = timedelta(seconds=30)
    # A statement running longer than this is cancelled (0: no limit).
    statement_timeout: Duration = timedelta(0)
    # A migration whose client went silent in the middle of a transaction is ended
    # after this, and its locks with it. A revision that computes in Python for
    # longer between two statements needs more.
    idle_in_transaction_timeout: Duration = timedelta(seconds=60)
    # Replicas that start together take turns: the first migrates, the others
    # wait for this lock (at most migration_lock_timeout), then find nothing to do.
    migration_lock: bool = True
    migration_lock_timeout: Duration = timedelta(minutes=5)
    # PgBouncer in transaction mode: no server-side prepared statement cache, and
    # each run in one transaction, so that the lock and the limits hold.
    pgbouncer: bool = False
    # What a DBA sees in pg_stat_activity.
    application_name: str = "my-service-migrations"

    # The schema of the tables and of alembic_version, created if missing; none: the
    # server's search_path. Each schema has a history of its own (one per tenant).
    # ("schema" would shadow a method of pydantic's models: the field has another name.)
    # Trimmed: a name with a space or newline at its end (a ConfigMap's `|` block adds one)
    # would be one schema to PostgreSQL and another to SQLAlchemy, which leaves it unquoted.
    schema_name: Stripped | None = Field(default=None, validation_alias=env_var("schema"))
    # SET ROLE to this role after connecting, so that it owns every object the migrations
    # create, alembic_version included (README.md, "An owner role").
    migration_role: Stripped | None = None

    _url: URL = PrivateAttr()
    names_the_database = ("url", "host", "port", "user", "name")

    @field_validator("host")
    @classmethod
    def _host(cls, host: str | None) -> str | None:
        if host is not None and not (host.startswith("/") or HOST.fullmatch(host)):
            raise ValueError(
                "expected a host name, an IP address or a socket directory (/var/run/postgresql);"
                f" the port goes in {env_var('port')}"
            )
        return host

    @model_validator(mode="after")
    def _build_url(self) -> Self:
        for field in ("lock_timeout", "lock_timeout_first"):
            if not getattr(self, field):
                # PostgreSQL's lock_timeout 0 waits for ever, and the application's queries behind it.
                raise ValueError(
                    f"{env_var(field)} must be more than 0 (0 would wait for a lock without a limit);"
                    f" for one long wait, set {env_var('lock_retry_budget')}=0 and {env_var('lock_timeout')}"
                )
        if self.lock_timeout_first > self.lock_timeout:
            raise ValueError(
                f"{env_var('lock_timeout_first')} is longer than {env_var('lock_timeout')}, the longest wait"
            )
        if self.url is not None:
            url = parse_url(self.url.get_secret_value(), BACKENDS, ASYNC_DRIVER, EXAMPLE_URL, SEVERAL_HOSTS)
            url = with_driver_params(url)
        elif self.host is None or self.user is None or self.name is None:
            missing = [env_var(field) for field in ("host", "user", "name") if getattr(self, field) is None]
            raise NoDatabaseSet(f"set {env_var('url')}, or {', '.join(missing)} (and {env_var('password')})")
        elif self.host.startswith("/"):
            url = URL.create(
                ASYNC_DRIVER, self.user, port=self.port, database=self.name, query={"host": self.host}
            )
        else:
            url = URL.create(ASYNC_DRIVER, self.user, host=self.host, port=self.port, database=self.name)
        if self.password is not None:
            if url.password is not None:
                raise ValueError(
                    f"{env_var('url')} holds a password and {env_var('password')} another: keep one"
                )
            url = url.set(password=self.password.get_secret_value())
        self._url = url
        return self

    @model_validator(mode="after")
    def _check_names(self) -> Self:
        for field, name in (("schema", self.schema_name), ("migration_role", self.migration_role)):
            # PostgreSQL would cut a longer name short, and then use another schema or role.
            if name is not None and not 0 < len(name.encode()) <= MAX_NAME_BYTES:
                raise ValueError(f"{env_var(field)} must be a name of 1 to {MAX_NAME_BYTES} bytes")
        if self.schema_name is not None and (
            self.schema_name.startswith("pg_") or self.schema_name in SYSTEM_SCHEMAS
        ):
            raise ValueError(f"{env_var('schema')} names a schema of PostgreSQL's own: choose another name")
        return self

    def async_url(self) -> URL:
        """The URL for the async engine (`str()` of it hides the password)."""
        return self._url

    def env_vars_for(self, *fields: str) -> str:
        """The variables that set `fields` (or the URL, when one is set), for messages."""
        if self.url is None and fields:
            return " and ".join(map(env_var, fields))
        if "password" in fields and self.password is not None:
            return f"{env_var('url')} and {env_var('password')}"
        return env_var("url")


def with_driver_params(url: URL) -> URL:
    """`url` with libpq's query parameters in asyncpg's words; one that asyncpg does not take is an error."""
    query = {SSL_PARAMS.get(key, key): value for key, value in url.query.items()}
    unsupported = sorted(set(query) - DRIVER_PARAMS)
    if unsupported:
        raise ValueError(
            f"{env_var('url')}: asyncpg does not take {', '.join(unsupported)} in the URL"
            f" (it takes {', '.join(sorted(DRIVER_PARAMS | SSL_PARAMS.keys()))};"
            " timeouts are settings of their own)"
        )
    hosts = query.get("host", ())
    for host in (hosts,) if isinstance(hosts, str) else hosts:
        # A socket directory, or one of several servers (host or host:port) to try in turn.
        if not (host.startswith("/") or HOST_AND_PORT.fullmatch(host)):
            raise ValueError(f"{env_var('url')}: ?host= takes a socket directory or host:port")
    if hosts and url.host:
        raise ValueError(f"{env_var('url')}: name the hosts either after the @ or in ?host=, not both")
    if query.get("target_session_attrs", "any") not in TARGET_SESSION_ATTRS:
        raise ValueError(
            f"{env_var('url')}: target_session_attrs must be {' or '.join(TARGET_SESSION_ATTRS)}"
        )
    return url.set(query=query)
