"""What every settings class of this project shares: sources, value types, error lines.

Sources, highest priority first: environment variables, the `.env` file in the
current directory, files in the secrets directory (SECRETS_DIR, default
/run/secrets, one file per variable, named like it, read as UTF-8 without leading and
trailing whitespace), then the defaults. The variables that say which database to use
must all come from one of these places: a database pieced together from two places may
be one nobody meant (and `alembic downgrade` would drop its tables).
"""

from __future__ import annotations

import math
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, StringConstraints, ValidationError
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

ENV_PREFIX = "DATABASE_"
SECRETS_DIR_VAR = "SECRETS_DIR"
DEFAULT_SECRETS_DIR = "/run/secrets"


class SettingsError(ValueError):
    """The settings are missing or invalid; the message names what to fix."""


class NoDatabaseSet(SettingsError):
    """No variable says which database to use (offline SQL needs none)."""


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
        raise ValueError("shorter than 1ms, it would round to 0: use 0, or 1ms or more")
    if milliseconds > LONGEST / timedelta(milliseconds=1):
        raise ValueError("at most 2147483647ms (about 24 days)")
    return timedelta(milliseconds=milliseconds)


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
# Seconds to wait for something: more than 0, at most an hour.
Seconds = Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)]


def refuse_service_link(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("tcp://"):
        # Kubernetes sets <SERVICE>_PORT=tcp://10.0.0.1:5432 for a Service named like this
        # variable's prefix (DATABASE_PORT for a Service "database").
        raise ValueError(
            "holds a Kubernetes service link (tcp://...): set `enableServiceLinks: false` in the pod"
        )
    return value


Port = Annotated[int, BeforeValidator(refuse_service_link), Field(ge=1, le=65535)]
# A value as people paste it: surrounding whitespace (a trailing newline) is no part of it.
Trimmed = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


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


# What a host name or an IP address may hold; anything else in a URL's host is a piece of
# something else (a password with an unencoded @, say) and must never reach a DNS lookup.
HOST = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*(?:%[A-Za-z0-9_.-]+)?")
# The names a .env file sets, one per line (`export NAME=value` too).
DOTENV_NAME = re.compile(r"^[ \t]*(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_.]*)[ \t]*=", re.MULTILINE)
ENCODE = "python -c 'import urllib.parse,sys; print(urllib.parse.quote(sys.argv[1], safe=\"\"))' 'pa@ss'"


def parse_url(
    raw: str,
    backends: frozenset[str],
    driver: str,
    example: str,
    several_hosts: str = "name one host",
    *,
    needs_database: bool = True,
) -> URL:
    """A DATABASE_URL value as `driver`'s URL; it must name one of `backends`
    (and, `needs_database`, a database)."""
    # Surrounding whitespace is no part of a URL (a secret written with `echo` ends in a newline).
    raw = raw.strip()
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):
        # These messages quote the URL, password and all.
        raise ValueError(f"{env_var('url')} is not a URL like {example}") from None
    if url.host and "," in url.host:
        raise ValueError(f"{env_var('url')} names several hosts after the @: {several_hosts}")
    if url.host and url.host.lower().startswith("%2f"):
        raise ValueError(
            f"{env_var('url')}: a Unix socket directory goes in ?host=/path, the host left empty"
        )
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ValueError(f"{env_var('url')}: the port must be 1 to 65535")
    # A second parser, that reads URLs as the standards do: when the two disagree on the host
    # or the port, or the path holds an @, an @ / # or ? in the user name or password was not
    # percent-encoded, and a piece of it would be taken for the host (and looked up).
    try:
        parts = urlsplit(raw)
        mangled = (parts.hostname, parts.port) != (url.host.lower() if url.host else None, url.port)
    except ValueError:
        mangled = True
    if mangled or (parts.netloc and "@" in parts.path) or (url.host and not HOST.fullmatch(url.host)):
        raise ValueError(
            f"{env_var('url')} cannot be right: check its host and port (1 to 65535), and percent-encode"
            f" the user name and password ({ENCODE})"
        )
    if needs_database and not url.database:
        # The server would pick one itself (PostgreSQL: the user's name): maybe one nobody meant.
        raise ValueError(f"{env_var('url')} names no database: it ends in /<database name>, like {example}")
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

    # The fields that say which database to use: they must all come from one place.
    names_the_database: ClassVar[tuple[str, ...]] = ()
    # PostgreSQL's settings that this database has not: set, they would be ignored.
    postgresql_only: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def load(cls, **overrides: Any) -> Self:
        """Read the settings; raise SettingsError with one line naming what to fix.

        `overrides` win over every source; when they name the database (a connection
        handed to Alembic does), the variables that would have are not consulted, nor
        the password: the database the caller names is the whole of it.
        """
        secrets = secrets_dir()
        check_files(cls, secrets)
        given = names_given(secrets)
        refuse_settings_of_another_database(cls, given)
        if overrides.keys() & set(cls.names_the_database):
            if "password" in cls.model_fields:
                overrides.setdefault("password", None)
        else:
            refuse_names_in_two_cases(cls, given)
            check_one_place(cls, secrets)
        try:
            return cls(_secrets_dir=secrets, **overrides)
        except ValidationError as exc:
            for error in exc.errors():
                if isinstance(error.get("ctx", {}).get("error"), NoDatabaseSet):
                    raise NoDatabaseSet(f"database settings: {error['ctx']['error']}") from None
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


def check_files(settings: type[BaseSettings], secrets: str | None) -> None:
    """`.env` and every secret file this project reads must be readable UTF-8 text: say which
    one is not, rather than let a traceback (or pydantic's warning) say it."""
    files = [Path(".env")] if Path(".env").exists() else []
    if secrets is not None:
        names = {env_var(field).lower() for field in settings.model_fields}
        files += [path for path in sorted(Path(secrets).iterdir()) if path.name.lower() in names]
    for path in files:
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SettingsError(f"database settings: {path} is not UTF-8 text") from None
        except OSError as exc:
            # A directory, a dangling symlink, a file this user may not read.
            raise SettingsError(f"database settings: cannot read {path}: {exc.strerror}") from None


def check_one_place(settings: type[SettingsBase], secrets: str | None) -> None:
    """Refuse a database named by variables from different places, or by a URL and its parts."""
    sources = {"the environment": EnvSettingsSource(settings), ".env": DotEnvSettingsSource(settings)}
    if secrets is not None:
        sources[secrets] = SecretsSettingsSource(settings, secrets_dir=secrets)
    found: dict[str, str] = {}  # field: the place of highest priority that sets it
    link = ""
    for place, source in sources.items():
        for field, value in source().items():
            if field in settings.names_the_database and value is not None:
                found.setdefault(field, place)
                if str(value).startswith("tcp://"):
                    link = (
                        f" ({env_var(field)} is a Kubernetes service link: set `enableServiceLinks: false`)"
                    )
    parts = [field for field in found if field != "url"]
    if "url" in found and parts:
        named = ", ".join(f"{env_var(field)} (in {found[field]})" for field in ["url", *parts])
        raise SettingsError(
            f"database settings: {named} all say which database to use: set the URL or its parts,"
            f" not both{link}"
        )
    if len(set(found.values())) > 1:
        places = {
            place: [env_var(field) for field in found if found[field] == place] for place in found.values()
        }
        named = "; ".join(f"{', '.join(variables)} in {place}" for place, variables in places.items())
        raise SettingsError(
            f"database settings: the variables that say which database to use come from different places"
            f" ({named}): set them all in one place"
        )


def names_given(secrets: str | None) -> dict[str, list[str]]:
    """The variable names each place sets, as written there: {place: names}."""
    places = {"the environment": list(os.environ)}
    if Path(".env").is_file():
        places[".env"] = DOTENV_NAME.findall(Path(".env").read_text(encoding="utf-8"))
    if secrets is not None:
        places[secrets] = [path.name for path in Path(secrets).iterdir()]
    return places


def refuse_settings_of_another_database(settings: type[SettingsBase], given: dict[str, list[str]]) -> None:
    """Whoever set PostgreSQL's DATABASE_SCHEMA for MySQL expects it to act: say it would not."""
    names = {name.upper() for found in given.values() for name in found}
    for field in settings.postgresql_only:
        if env_var(field).upper() in names:
            raise SettingsError(
                f"database settings: {env_var(field)} is PostgreSQL's and would have no effect here: unset it"
            )


def refuse_names_in_two_cases(settings: type[BaseSettings], given: dict[str, list[str]]) -> None:
    """Names are read in any case: two that differ only in case (DATABASE_URL and database_url)
    would leave it to chance which one counts; in .env, so would one name set twice."""
    names = {env_var(field).lower() for field in settings.model_fields}
    for place, found in given.items():
        for name in names:
            spellings = sorted(entry for entry in found if entry.lower() == name)
            if len(spellings) > 1:
                twice = f"{spellings[0]} twice" if len(set(spellings)) == 1 else " and ".join(spellings)
                raise SettingsError(f"database settings: {twice} in {place}: keep one")


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
