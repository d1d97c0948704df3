"""The async engine, built from the settings, and readable connection errors."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .settings import DatabaseSettings


def create_engine(settings: DatabaseSettings, **kwargs: Any) -> AsyncEngine:
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


def describe_connect_error(exc: BaseException, settings: DatabaseSettings) -> str:
    """One line that says what went wrong, where, and which variable to check."""
    url = settings.async_url()
    where = f"{url.host}:{url.port or ''}".rstrip(":")
    reason = _reason(exc, settings)
    if _is_auth_error(reason):
        check = settings.variables("user", "password")
    else:
        check = settings.variables("host", "port")
    message = f"cannot connect to the database at {where}: {reason}; check {check}"
    if url.password:
        # Drivers do not quote passwords, but a message must never leak one.
        message = message.replace(url.password, "***")
    return message


def _reason(exc: BaseException, settings: DatabaseSettings) -> str:
    if isinstance(exc, TimeoutError):
        # asyncio's TimeoutError carries no message of its own.
        return f"no answer within {settings.connect_timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running, and on this port?)"
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        exc = exc.orig
    text = str(exc).strip() or type(exc).__name__
    # Driver exceptions wrapped by SQLAlchemy read "<class '...'>: message".
    return text.rpartition(">: ")[2].splitlines()[0]


def _is_auth_error(reason: str) -> bool:
    lowered = reason.lower()
    return "password" in lowered or "access denied" in lowered or "authentication" in lowered
