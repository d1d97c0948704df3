"""The async engine for PostgreSQL (asyncpg), and what its errors mean."""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from socket import gaierror
from typing import Any

from asyncpg.exceptions import TargetServerAttributeNotMatched
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .settings import DatabaseSettings
from .settings_base import env_var, readable

log = logging.getLogger(__name__)

# What the SQLSTATE of a failed connect says is wrong, as the settings to check.
CONNECT_FAILURES = {
    "3D000": ("name",),  # invalid_catalog_name: no such database
    "28P01": ("user", "password"),  # invalid_password
    "28000": ("user", "password"),  # invalid_authorization_specification: no such role, or pg_hba.conf
}
# What a failed revision leaves behind (migration_session.py says more).
AFTER_A_FAILED_REVISION = "it rolled back"
# Failed connects that waiting may fix (DATABASE_WAIT): nothing listens on the
# server's port or socket yet, the network or DNS does not reach it yet (a container or a
# Kubernetes Service that is not there yet), it does not answer, or it says it is starting
# up, shutting down or in recovery (SQLSTATE 57P03, cannot_connect_now).
NOT_UP_YET_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ENOENT,
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
    errno.ETIMEDOUT,
}
NOT_UP_YET_SQLSTATES = {"57P03"}
# Seconds between tries: doubling from the first to the longest.
FIRST_RETRY_DELAY, LONGEST_RETRY_DELAY = 0.5, 5.0


class CannotConnect(ConnectionError):
    """The database cannot be reached; the message is one line that names what to check."""


def engine_for(settings: DatabaseSettings, **kwargs: Any) -> AsyncEngine:
    """An AsyncEngine for the configured database; kwargs go to create_async_engine."""
    return create_async_engine(settings.async_url(), connect_args=connect_args(settings), **kwargs)


def connect_args(settings: DatabaseSettings) -> dict[str, Any]:
    """Driver arguments that do not belong in the URL (they would arrive as strings)."""
    args: dict[str, Any] = {"timeout": settings.connect_timeout}
    if settings.pgbouncer:
        # PgBouncer hands each transaction to any server connection: a cached or
        # named prepared statement may not exist there (asyncpg/SQLAlchemy docs).
        args |= {
            "statement_cache_size": 0,
            "prepared_statement_cache_size": 0,
            "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",
        }
    return args


@asynccontextmanager
async def connect(engine: AsyncEngine, settings: DatabaseSettings) -> AsyncIterator[AsyncConnection]:
    """engine.connect(), tried again while the server is not up yet, for at most
    DATABASE_WAIT; CannotConnect with one readable line when that fails."""
    connection = await first_connection(engine, settings)
    try:
        yield connection
    finally:
        await connection.close()


async def first_connection(engine: AsyncEngine, settings: DatabaseSettings) -> AsyncConnection:
    """engine.connect(); while the server is not up yet, one log line and another try,
    until settings.wait is over."""
    deadline = time.monotonic() + settings.wait.total_seconds()
    delay = FIRST_RETRY_DELAY
    while True:
        try:
            return await engine.connect()
        except Exception as exc:
            # Whatever fails here failed to connect: refused, timed out, rejected
            # (SQLAlchemy 2.0 lets some driver errors through unwrapped).
            failure = connect_error(exc, settings)
            if not settings.wait or not not_up_yet(exc):
                raise CannotConnect(failure) from exc
            left = deadline - time.monotonic()
            if left <= 0:
                raise CannotConnect(
                    f"{failure}; still so after {readable(settings.wait)} ({env_var('wait')})"
                ) from exc
            delay = min(delay, left)
            log.warning("%s; next try in %.1f s (%s: %.1f s left)", failure, delay, env_var("wait"), left)
            await asyncio.sleep(delay)
            delay = min(delay * 2, LONGEST_RETRY_DELAY)


def not_up_yet(exc: BaseException) -> bool:
    """Whether a failed connect may succeed later on its own: the server is not up yet."""
    error = driver_error(exc)
    if isinstance(error, TimeoutError | gaierror):
        return True
    if isinstance(error, ssl.SSLError):
        # A certificate or TLS setting that does not fit will not fit later either.
        return False
    if isinstance(error, OSError):
        # Several addresses for the host (localhost: ::1 and 127.0.0.1) that all failed
        # differently come as one plain OSError without an errno; a connection closed as
        # soon as it was accepted (a container's published port before its server
        # listens) as a plain ConnectionError without one.
        return error.errno in NOT_UP_YET_ERRNOS or (
            type(error) in (OSError, ConnectionError) and error.errno is None
        )
    return sqlstate(exc) in NOT_UP_YET_SQLSTATES


def connect_error(exc: BaseException, settings: DatabaseSettings) -> str:
    """One line: what went wrong, where, and which variables to check."""
    where = place(settings)
    error = driver_error(exc)
    if isinstance(error, TimeoutError):
        # asyncio's TimeoutError carries no message of its own.
        reason = f"no answer within {settings.connect_timeout:g} s"
    elif isinstance(error, ConnectionRefusedError):
        reason = "connection refused (is the server running, and on this port?)"
    elif isinstance(error, TargetServerAttributeNotMatched):
        reason = "no server there is a {} server (target_session_attrs)".format(
            settings.async_url().query["target_session_attrs"]
        )
    else:
        # The server's or the driver's own words: neither ever quotes a password.
        reason = driver_message(exc)
    check = settings.env_vars_for(*CONNECT_FAILURES.get(sqlstate(exc) or "", ("host", "port")))
    return f"cannot connect to the database at {where}: {reason}; check {check}"


def place(settings: DatabaseSettings) -> str:
    """Where the database is, as a message says it: host and port, socket directories, or hosts."""
    url = settings.async_url()
    hosts = url.query.get("host")
    if isinstance(hosts, tuple):
        return ", ".join(hosts)
    if hosts:
        return f"{hosts} (port {url.port or 5432})"
    if url.host is None:
        return f"the local server (no host given; port {url.port or 5432})"
    return f"[{url.host}]:{url.port or 5432}" if ":" in url.host else f"{url.host}:{url.port or 5432}"


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a PostgreSQL error, wrapped by SQLAlchemy or not."""
    return getattr(driver_error(exc), "sqlstate", None)


def driver_error(exc: BaseException) -> BaseException:
    """The driver's own exception, without SQLAlchemy's wrapping (its asyncpg adapter raises
    an error of its own from asyncpg's)."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return exc.orig.__cause__ or exc.orig
    return exc


def driver_message(exc: BaseException) -> str:
    """The server's or the driver's own words for `exc` (the first line)."""
    error = driver_error(exc)
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
