"""The async engine, built from the settings, and readable connection errors."""

from __future__ import annotations

{% if cookiecutter.database == "postgresql" %}
import uuid
{% endif %}
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .settings import DatabaseSettings


def create_engine(settings: DatabaseSettings, **kwargs: Any) -> AsyncEngine:
    """An AsyncEngine for the configured database; kwargs go to create_async_engine."""
    return create_async_engine(settings.async_url(), connect_args=connect_args(settings), **kwargs)


def connect_args(settings: DatabaseSettings) -> dict[str, Any]:
    """Driver arguments that do not belong in the URL (they would arrive as strings)."""
{% if cookiecutter.database == "postgresql" %}
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
{% elif cookiecutter.database == "mysql" %}
    args: dict[str, Any] = {"connect_timeout": settings.connect_timeout}
    url = settings.async_url()
    if url.password is not None:
        # asyncmy sends a str password as latin-1; the server expects UTF-8.
        args["password"] = url.password.encode()
    return args
{% else %}
    # aiosqlite's timeout is how long to wait for another writer's lock.
    return {"timeout": settings.connect_timeout}
{% endif %}


def describe_connect_error(exc: BaseException, settings: DatabaseSettings) -> str:
    """One line that says what went wrong, where, and which variable to check."""
    url = settings.async_url()
{% if cookiecutter.database == "sqlite" %}
    reason = _connect_reason(exc, settings)
    return f"cannot open SQLite database {url.database or ':memory:'}: {reason}; check {settings.variables()}"
{% else %}
    where = f"{url.host}:{url.port or ''}".rstrip(":")
    reason = _connect_reason(exc, settings)
    check = settings.variables(*_culprits(reason))
    message = f"cannot connect to the database at {where}: {reason}; check {check}"
    if url.password:
        # Drivers do not quote passwords, but a message must never leak one.
        message = message.replace(url.password, "***")
    return message
{% endif %}


def describe_error(exc: BaseException) -> str:
    """The first line of a driver's message, without SQLAlchemy's wrapping."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        exc = exc.orig
    # Driver exceptions wrapped by SQLAlchemy read "<class '...'>: message".
    text = str(exc).rpartition(">: ")[2].strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _connect_reason(exc: BaseException, settings: DatabaseSettings) -> str:
    if isinstance(exc, TimeoutError):
        # asyncio's TimeoutError carries no message of its own.
        return f"no answer within {settings.connect_timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running, and on this port?)"
    return describe_error(exc)
{% if cookiecutter.database != "sqlite" %}


NO_SUCH_DATABASE = ("does not exist", "unknown", "to database")


def _culprits(reason: str) -> tuple[str, ...]:
    """The settings that a connection failure points at."""
    lowered = reason.lower()
    # 'database "x" does not exist', "Unknown database 'x'", "Access denied ... to database 'x'"
    if "database" in lowered and any(words in lowered for words in NO_SUCH_DATABASE):
        return ("name",)
    if any(word in lowered for word in ("password", "access denied", "authentication", "role")):
        return ("user", "password")
    return ("host", "port")
{% endif %}
