"""What every settings class of this project shares: sources, value types, error lines.

Sources, highest priority first: environment variables, the `.env` file in the
current directory, files in the secrets directory (SECRETS_DIR, default
/run/secrets, one file per variable, named like it), then the defaults.
"""

from __future__ import annotations

import math
import os
import re
from datetime import timedelta
from typing import Annotated, Any, Self

from pydantic import BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

ENV_PREFIX = "DATABASE_"
SECRETS_DIR_VAR = "SECRETS_DIR"
DEFAULT_SECRETS_DIR = "/run/secrets"


class SettingsError(ValueError):
    """The settings are missing or invalid; the message names what to fix."""


def env_var(field: str) -> str:
    """The environment variable that sets `field`."""
    return ENV_PREFIX + field.upper()


# Durations are written as PostgreSQL writes them (500ms, 5s, 2min, 1h, 1d; a bare
# number is milliseconds) and must fit PostgreSQL's timeouts: 2147483647 ms at most.
DURATION = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>us|ms|s|min|h|d)?")
UNITS = {"us": 0.001, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000, None: 1}
LONGEST = timedelta(milliseconds=2_147_483_647)


def parse_duration(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    match = DURATION.fullmatch(value.strip())
    if match is None:
        raise ValueError("expected a duration like 500ms, 5s, 2min or 0")
    milliseconds = float(match["number"]) * UNITS[match["unit"]]
    if 0 < milliseconds < 1:
        raise ValueError("durations shorter than 1ms would mean no limit at all: use 1ms or more")
    if milliseconds > LONGEST / timedelta(milliseconds=1):
        raise ValueError("at most 2147483647ms (about 24 days), PostgreSQL's limit")
    return timedelta(milliseconds=milliseconds)


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
# Seconds to wait for something: more than 0, and finite.
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Port = Annotated[int, Field(ge=1, le=65535)]


def milliseconds(duration: timedelta) -> str:
    """`duration` as a PostgreSQL setting value (0 for none)."""
    return f"{round(duration / timedelta(milliseconds=1))}ms"


def readable(duration: timedelta) -> str:
    """`duration` as people write it: 400ms, 30s, 5min."""
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        count = duration / timedelta(milliseconds=size)
        if count >= 1 and math.isclose(count, round(count)):
            return f"{round(count)}{unit}"
    return milliseconds(duration)


def parse_url(raw: str, backends: frozenset[str], driver: str, example: str) -> URL:
    """A DATABASE_URL value as `driver`'s URL; it must name one of `backends`."""
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):
        # These messages quote the URL, password and all.
        raise ValueError(f"{env_var('url')} is not a URL like {example}") from None
    if url.get_backend_name() not in backends:
        raise ValueError(f"{env_var('url')} must be a URL like {example}, not {url.drivername}://...")
    return url.set(drivername=driver)


class SettingsBase(BaseSettings):
    """Reads DATABASE_* variables; errors name variables, never values."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        # A shared .env holds other services' keys too: ignore them.
        extra="ignore",
        # Never echo a rejected value: it may be a password.
        hide_input_in_errors=True,
    )

    @classmethod
    def load(cls, **overrides: Any) -> Self:
        """Read the settings; raise SettingsError with one line naming what to fix."""
        try:
            return cls(_secrets_dir=secrets_dir(), **overrides)
        except ValidationError as exc:
            raise SettingsError(f"database settings: {validation_message(exc)}") from None


def secrets_dir() -> str | None:
    """The secrets directory: the one SECRETS_DIR names (it must exist), or
    /run/secrets when there is one (there is none outside a container)."""
    named = os.environ.get(SECRETS_DIR_VAR)
    if named is None:
        return DEFAULT_SECRETS_DIR if os.path.isdir(DEFAULT_SECRETS_DIR) else None
    if not os.path.isdir(named):
        raise SettingsError(f"{SECRETS_DIR_VAR} names {named}, which is not a directory")
    return named


def validation_message(exc: ValidationError) -> str:
    """One line for all of a ValidationError, naming env vars, never values."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        cause = error.get("ctx", {}).get("error")
        message = str(cause) if cause is not None else error["msg"]
        if error["loc"]:
            message = f"{env_var(str(error['loc'][0]))}: {message}"
        problems.append(message)
    return "; ".join(problems)
