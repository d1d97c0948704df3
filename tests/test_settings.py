"""The rendered settings module: where values come from and what errors say (no database needed)."""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import pytest
from alembic.config import Config
from sqlalchemy.engine import make_url

from rendering import make_project

SECRET = "s3cr%t@:/#?+ ü"


ALL = ["postgresql", "mysql", "sqlite"]
SERVERS = ["postgresql", "mysql"]


@pytest.fixture(scope="module")
def rendered_settings(tmp_path_factory) -> Iterator[dict[str, SimpleNamespace]]:
    """The settings of a render with env_prefix APP_, for each database (a package of its own each)."""
    modules = {}
    for database in ALL:
        project = make_project(
            tmp_path_factory.mktemp(database), database=database, env_prefix="APP_", package_name=f"svc_{database}"
        )
        sys.path.insert(0, str(project.path))
        settings = importlib.import_module(f"{project.package}.settings")
        base = importlib.import_module(f"{project.package}.settings_base")
        modules[database] = SimpleNamespace(
            DatabaseSettings=settings.DatabaseSettings,
            load_settings=settings.DatabaseSettings.load,
            SettingsError=base.SettingsError,
            ASYNC_DRIVER=settings.ASYNC_DRIVER,
            __file__=settings.__file__,
        )
        sys.path.remove(str(project.path))
    yield modules


@pytest.fixture
def settings_module(rendered_settings, database: str) -> SimpleNamespace:
    return rendered_settings[database]


@pytest.fixture
def in_empty_dir(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("database", ALL)
def test_prefixed_url_is_read_and_unprefixed_ignored(settings_module, database, in_empty_dir, monkeypatch) -> None:
    url = {"postgresql": "postgresql://a:b@h/db", "mysql": "mysql://a:b@h/db", "sqlite": "sqlite:///x.db"}[database]
    monkeypatch.setenv("DATABASE_URL", "postgresql://wrong:wrong@wrong/wrong")
    monkeypatch.setenv("APP_DATABASE_URL", url)
    settings = settings_module.load_settings()
    assert settings.async_url().drivername == settings_module.ASYNC_DRIVER
    assert settings.async_url().database == make_url(url).database


@pytest.mark.parametrize("database", SERVERS)
def test_one_variable_from_several_places_takes_the_first(settings_module, database, in_empty_dir, monkeypatch):
    """env var > .env > secret file > default, for each variable."""
    secrets_dir = in_empty_dir / "secrets"
    secrets_dir.mkdir()
    monkeypatch.setenv("APP_SECRETS_DIR", str(secrets_dir))
    # Docker and Kubernetes write lower-case file names with a trailing newline.
    (secrets_dir / "app_database_password").write_text(f"  {SECRET}\n")
    (in_empty_dir / ".env").write_text(
        "APP_DATABASE_PASSWORD=from-dotenv\nAPP_DATABASE_NAME=from-dotenv\nOTHER_SERVICE_KEY=ignored\n"
    )
    for name, value in {"HOST": "db.internal", "USER": "app", "NAME": "from-env"}.items():
        monkeypatch.setenv(f"APP_DATABASE_{name}", value)
    url = settings_module.load_settings().async_url()
    assert (url.host, url.username, url.database, url.password) == ("db.internal", "app", "from-env", "from-dotenv")
    assert url.port == settings_module.DatabaseSettings.model_fields["port"].default
    # The password alone may come from the secret file; leading and trailing whitespace is
    # not part of it (README.md says so).
    (in_empty_dir / ".env").unlink()
    assert settings_module.load_settings().async_url().password == SECRET


@pytest.mark.parametrize("database", SERVERS)
@pytest.mark.parametrize(
    ("environment", "dotenv", "secrets", "message"),
    [
        pytest.param(
            {"HOST": "h", "USER": "u", "NAME": "n"},
            {"URL": "{database}://other:pw@elsewhere/other"},
            {},
            "APP_DATABASE_URL (in .env), APP_DATABASE_HOST (in the environment), APP_DATABASE_USER (in the"
            " environment), APP_DATABASE_NAME (in the environment) all say which database to use",
            id="url-in-dotenv-parts-in-environment",
        ),
        pytest.param(
            {"URL": "{database}://u:pw@h/n", "NAME": "other"},
            {},
            {},
            "all say which database to use: set the URL or its parts, not both",
            id="url-and-a-part-in-one-place",
        ),
        pytest.param(
            {"HOST": "h", "USER": "u"},
            {"NAME": "n"},
            {},
            "come from different places (APP_DATABASE_HOST, APP_DATABASE_USER in the environment;"
            " APP_DATABASE_NAME in .env): set them all in one place",
            id="parts-from-two-places",
        ),
        pytest.param(
            {"HOST": "h", "USER": "u"},
            {},
            {"app_database_name": "n"},
            "APP_DATABASE_NAME in {secrets}",
            id="a-part-from-a-secret-file",
        ),
    ],
)
def test_the_database_is_named_in_one_place_only(
    settings_module, database, in_empty_dir, monkeypatch, environment, dotenv, secrets, message
) -> None:
    """A database pieced together from two places may be one nobody meant: refused, naming both."""
    secrets_dir = in_empty_dir / "secrets"
    secrets_dir.mkdir()
    monkeypatch.setenv("APP_SECRETS_DIR", str(secrets_dir))
    for name, value in environment.items():
        monkeypatch.setenv(f"APP_DATABASE_{name}", value.format(database=database))
    lines = [f"APP_DATABASE_{name}={value.format(database=database)}" for name, value in dotenv.items()]
    (in_empty_dir / ".env").write_text("\n".join(lines) + "\n")
    for name, value in secrets.items():
        (secrets_dir / name).write_text(value)
    with pytest.raises(settings_module.SettingsError) as caught:
        settings_module.load_settings()
    assert message.format(secrets=secrets_dir) in str(caught.value)
    assert "pw" not in str(caught.value)


@pytest.mark.parametrize("database", SERVERS)
def test_a_connection_handed_in_names_the_database(settings_module, database, in_empty_dir, monkeypatch) -> None:
    """Code that names the database (a connection handed to env.py) wins over every variable."""
    monkeypatch.setenv("APP_DATABASE_HOST", "app.internal")
    (in_empty_dir / ".env").write_text("APP_DATABASE_NAME=app\n")
    url = settings_module.load_settings(url=f"{database}://u:p@test.internal/test").async_url()
    assert (url.host, url.database) == ("test.internal", "test")


@pytest.mark.parametrize("database", SERVERS)
@pytest.mark.parametrize("given", ["u:p@test.internal", "u@test.internal"], ids=["with-password", "without"])
def test_a_connection_handed_in_brings_its_own_password(
    settings_module, database, in_empty_dir, monkeypatch, given
) -> None:
    """DATABASE_PASSWORD (a secret file, .env) is for the variables' database, not for one the
    caller names: an app's own engine handed to upgrade_async(), or the tests' TEST_DATABASE_URL."""
    monkeypatch.setenv("APP_DATABASE_PASSWORD", SECRET)
    url = settings_module.load_settings(url=f"{database}://{given}/test").async_url()
    assert url.password == ("p" if ":" in given else None)


@pytest.mark.parametrize("database", SERVERS)
def test_password_beside_a_url(settings_module, database, in_empty_dir, monkeypatch) -> None:
    """A URL without a password takes DATABASE_PASSWORD (a secret file, say); with one, it is refused."""
    monkeypatch.setenv("APP_DATABASE_URL", f"{database}://app@h/db")
    monkeypatch.setenv("APP_DATABASE_PASSWORD", SECRET)
    assert settings_module.load_settings().async_url().password == SECRET
    monkeypatch.setenv("APP_DATABASE_URL", f"{database}://app:other@h/db")
    with pytest.raises(
        settings_module.SettingsError, match="APP_DATABASE_URL holds a password and APP_DATABASE_PASSWORD"
    ):
        settings_module.load_settings()


@pytest.mark.parametrize("database", SERVERS)
@pytest.mark.parametrize(
    ("named", "problem"),
    [
        pytest.param("a-file", "names {path}, which is not a directory", id="a-file"),
        pytest.param("missing", "names {path}, which is not a directory", id="missing"),
        pytest.param("not-utf8", "{path}/app_database_password is not UTF-8 text", id="not-utf-8"),
        pytest.param("unreadable", "cannot read {path}/app_database_password: Permission denied", id="unreadable"),
        pytest.param("dangling", "cannot read {path}/APP_DATABASE_PASSWORD: No such file", id="dangling-link"),
        pytest.param("directory", "cannot read {path}/app_database_password: Is a directory", id="a-directory"),
        pytest.param(
            "two-spellings", "APP_DATABASE_PASSWORD and app_database_password in {path}: keep one", id="twice"
        ),
    ],
)
def test_secrets_directory_that_cannot_be_used_is_named(
    settings_module, database, in_empty_dir, monkeypatch, named, problem
) -> None:
    path = in_empty_dir / named
    if named == "a-file":
        path.write_text("")
    elif named != "missing":
        path.mkdir()
        secret = path / "app_database_password"
        if named == "not-utf8":
            secret.write_bytes(b"\xff\xfe latin-1 \xe9")
        elif named == "unreadable":
            secret.write_text("pw")
            secret.chmod(0)
            if os.access(secret, os.R_OK):
                pytest.skip("root reads any file: nothing to refuse")
        elif named == "dangling":
            (path / "APP_DATABASE_PASSWORD").symlink_to(path / "gone")
        elif named == "directory":
            secret.mkdir()
        elif named == "two-spellings":
            secret.write_text("pw")
            (path / "APP_DATABASE_PASSWORD").write_text("other")
    monkeypatch.setenv("APP_SECRETS_DIR", str(path))
    monkeypatch.setenv("APP_DATABASE_URL", f"{database}://app@h/db")
    with pytest.raises(settings_module.SettingsError, match=re.escape(problem.format(path=path))):
        settings_module.load_settings()


@pytest.mark.parametrize("database", ALL)
@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param(b"APP_DATABASE_NAME=\xe9t\xe9\n", ".env is not UTF-8 text", id="not-utf-8"),
        pytest.param(None, "cannot read .env: Is a directory", id="a-directory"),
    ],
)
def test_dotenv_that_cannot_be_read_is_named(settings_module, database, in_empty_dir, content, problem) -> None:
    if content is None:
        (in_empty_dir / ".env").mkdir()
    else:
        (in_empty_dir / ".env").write_bytes(content)
    with pytest.raises(settings_module.SettingsError, match=re.escape(problem)):
        settings_module.load_settings()


@pytest.mark.parametrize("database", SERVERS)
def test_one_name_in_two_spellings_is_refused(settings_module, database, in_empty_dir, monkeypatch) -> None:
    monkeypatch.setenv("APP_DATABASE_URL", f"{database}://app@h/db")
    monkeypatch.setenv("app_database_url", f"{database}://app@elsewhere/db")
    with pytest.raises(settings_module.SettingsError, match="APP_DATABASE_URL and app_database_url in the environment"):
        settings_module.load_settings()


@pytest.mark.parametrize("database", SERVERS)
@pytest.mark.parametrize(
    ("second", "message"),
    [
        pytest.param("app_database_url", "APP_DATABASE_URL and app_database_url in .env", id="two-spellings"),
        pytest.param("export APP_DATABASE_URL", "APP_DATABASE_URL twice in .env", id="twice"),
    ],
)
def test_one_name_twice_in_dotenv_is_refused(settings_module, database, in_empty_dir, second, message) -> None:
    """python-dotenv keeps the last line: which database that is should not depend on line order."""
    (in_empty_dir / ".env").write_text(
        f"APP_DATABASE_URL={database}://app@h/db\n{second}={database}://app@elsewhere/db\n"
    )
    with pytest.raises(settings_module.SettingsError, match=re.escape(f"{message}: keep one")):
        settings_module.load_settings()


@pytest.mark.parametrize("database", SERVERS)
def test_password_never_in_repr_or_str(settings_module, database, in_empty_dir, monkeypatch) -> None:
    monkeypatch.setenv("APP_DATABASE_URL", f"{database}://app:{quote(SECRET, safe='')}@h/db")
    settings = settings_module.load_settings()
    for text in (repr(settings), str(settings), str(settings.async_url()), repr(settings.async_url())):
        assert SECRET not in text and quote(SECRET, safe="") not in text


@pytest.mark.parametrize("database", ALL)
@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        pytest.param("PORT", "not-a-port" + SECRET, "APP_DATABASE_PORT: Input should be a valid", id="bad-port"),
        pytest.param("PORT", "0", "APP_DATABASE_PORT: Input should be greater than or equal to 1", id="port-0"),
        pytest.param("PORT", "65536", "APP_DATABASE_PORT: Input should be less than or equal to 65535", id="port-big"),
        pytest.param("URL", "http//" + SECRET, "APP_DATABASE_URL is not a URL like", id="unparsable-url"),
        pytest.param("URL", f"oracle://u:{quote(SECRET, safe='')}@h/db", "must be a URL like", id="other-database"),
        pytest.param("CONNECT_TIMEOUT", "soon", "APP_DATABASE_CONNECT_TIMEOUT: Input should be", id="bad-timeout"),
        pytest.param("CONNECT_TIMEOUT", "0", "APP_DATABASE_CONNECT_TIMEOUT: Input should be greater than 0", id="0"),
        pytest.param("CONNECT_TIMEOUT", "-1", "APP_DATABASE_CONNECT_TIMEOUT: Input should be greater than 0", id="-1"),
        pytest.param("CONNECT_TIMEOUT", "nan", "APP_DATABASE_CONNECT_TIMEOUT: Input should be a finite", id="nan"),
        pytest.param("CONNECT_TIMEOUT", "inf", "APP_DATABASE_CONNECT_TIMEOUT: Input should be a finite", id="inf"),
        pytest.param("CONNECT_TIMEOUT", "1e308", "APP_DATABASE_CONNECT_TIMEOUT: Input should be less than", id="huge"),
    ],
)
def test_invalid_values_are_named_not_echoed(
    settings_module, database, in_empty_dir, monkeypatch, variable, value, expected
) -> None:
    if variable == "PORT" and database == "sqlite":
        pytest.skip("SQLite has no port")
    if "oracle" in value and database == "sqlite":
        value = value.replace("oracle", "postgresql")
    monkeypatch.setenv(f"APP_DATABASE_{variable}", value)
    if variable == "PORT":
        for name, part in {"HOST": "h", "USER": "u", "NAME": "n"}.items():
            monkeypatch.setenv(f"APP_DATABASE_{name}", part)
    elif variable != "URL" and database != "sqlite":
        monkeypatch.setenv("APP_DATABASE_URL", f"{database}://u@h/db")
    with pytest.raises(settings_module.SettingsError) as caught:
        settings_module.load_settings()
    message = str(caught.value)
    assert expected in message
    assert SECRET not in message and "\n" not in message


# An unencoded @ / # or ? in a password or user name moves a piece of it into the host,
# which a connect would send to the DNS resolver: refused before, printing none of it.
MANGLED = [
    pytest.param("app:Tr0ub@dor&3@db.internal/app", id="at-sign-in-password"),
    pytest.param("app:Tr0ub/dor&3@db.internal/app", id="slash-in-password"),
    pytest.param("app:Tr0ub#dor&3@db.internal/app", id="hash-in-password"),
    pytest.param("app:Tr0ub?dor&3@db.internal/app", id="question-mark-in-password"),
    pytest.param("app:p@ss/w0rd@db.internal/app", id="at-and-slash"),
    pytest.param("us/er@db.internal/app", id="slash-in-user"),
]


@pytest.mark.parametrize("database", SERVERS)
@pytest.mark.parametrize("userinfo_host_path", MANGLED)
def test_url_with_unencoded_characters_is_refused_without_quoting_it(
    settings_module, database, in_empty_dir, monkeypatch, userinfo_host_path
) -> None:
    monkeypatch.setenv("APP_DATABASE_URL", f"{database}://{userinfo_host_path}")
    with pytest.raises(settings_module.SettingsError) as caught:
        settings_module.load_settings()
    message = str(caught.value)
    assert "APP_DATABASE_URL cannot be right: check its host and port" in message and "percent-encode" in message
    for piece in ("Tr0ub", "dor", "w0rd", "us/er", "db.internal"):
        assert piece not in message


@pytest.mark.parametrize("database", ALL)
@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("{database}://u@h:0/db", "APP_DATABASE_URL: the port must be 1 to 65535", id="port-0"),
        pytest.param("{database}://u@h:99999/db", "APP_DATABASE_URL: the port must be 1 to 65535", id="port-99999"),
        # The server would choose one (PostgreSQL: the user's name), maybe one nobody meant.
        pytest.param("{database}://u:p@h:5432", "APP_DATABASE_URL names no database", id="no-database"),
        pytest.param("{database}://u:p@h/", "APP_DATABASE_URL names no database", id="empty-database"),
        pytest.param("{database}://u@h1,h2:5432/db", "APP_DATABASE_URL names several hosts", id="several-hosts"),
        pytest.param(
            "{database}://u@%2Fvar%2Frun/db", "a Unix socket directory goes in ?host=/path", id="libpq-socket"
        ),
    ],
)
def test_url_parts_that_are_named(settings_module, database, in_empty_dir, monkeypatch, url, message) -> None:
    if database == "sqlite":
        pytest.skip("SQLite URLs have no host")
    monkeypatch.setenv("APP_DATABASE_URL", url.format(database=database))
    with pytest.raises(settings_module.SettingsError, match=re.escape(message)):
        settings_module.load_settings()


@pytest.mark.parametrize("database", ["sqlite"])
def test_sqlite_url_takes_no_parameters(settings_module, database, in_empty_dir, monkeypatch) -> None:
    monkeypatch.setenv("APP_DATABASE_URL", "sqlite:///x.db?timeout=abc")
    with pytest.raises(settings_module.SettingsError, match="takes no \\?parameters: APP_DATABASE_CONNECT_TIMEOUT"):
        settings_module.load_settings()


@pytest.mark.parametrize("database", SERVERS)
def test_surrounding_whitespace_is_no_part_of_the_database(settings_module, database, in_empty_dir, monkeypatch):
    """Values pasted with a trailing newline (a secret written with `echo`)."""
    for name, value in {"HOST": " db.internal\n", "USER": "app\n", "NAME": "\tapp "}.items():
        monkeypatch.setenv(f"APP_DATABASE_{name}", value)
    url = settings_module.load_settings().async_url()
    assert (url.host, url.username, url.database) == ("db.internal", "app", "app")


@pytest.mark.parametrize("database", SERVERS)
def test_kubernetes_service_link_is_named(settings_module, database, in_empty_dir, monkeypatch) -> None:
    """A Service named `database` makes Kubernetes set DATABASE_PORT=tcp://10.0.0.1:5432."""
    for name, value in {"HOST": "db", "USER": "u", "NAME": "n", "PORT": "tcp://10.96.0.10:5432"}.items():
        monkeypatch.setenv(f"APP_DATABASE_{name}", value)
    with pytest.raises(settings_module.SettingsError, match="enableServiceLinks: false"):
        settings_module.load_settings()
    monkeypatch.setenv("APP_DATABASE_URL", f"{database}://u@db/n")
    for name in ("HOST", "USER", "NAME"):
        monkeypatch.delenv(f"APP_DATABASE_{name}")
    with pytest.raises(settings_module.SettingsError, match="APP_DATABASE_PORT is a Kubernetes service link"):
        settings_module.load_settings()


@pytest.mark.parametrize("database", SERVERS)
@pytest.mark.parametrize("host", ["app:pw@db", "db internal", "db/app", "#db", "db:5433", "dead:beef"])
def test_host_that_is_no_host_is_refused(settings_module, database, in_empty_dir, monkeypatch, host) -> None:
    for name, value in {"HOST": host, "USER": "u", "NAME": "n"}.items():
        monkeypatch.setenv(f"APP_DATABASE_{name}", value)
    with pytest.raises(settings_module.SettingsError, match="APP_DATABASE_HOST: expected a host name"):
        settings_module.load_settings()


@pytest.mark.parametrize("database", ["postgresql"])
@pytest.mark.parametrize(
    ("variables", "socket", "port"),
    [
        pytest.param({"HOST": "/var/run/postgresql", "PORT": "5433"}, "/var/run/postgresql", 5433, id="host-variable"),
        pytest.param({"URL": "postgresql://u@/n?host=/var/run/postgresql"}, "/var/run/postgresql", None, id="url"),
        pytest.param(
            {"URL": "postgresql://u@:6432/n?host=/cloudsql/project:region:instance"},
            "/cloudsql/project:region:instance",
            6432,
            id="cloud-sql-path",
        ),
    ],
)
def test_unix_socket_directories(settings_module, database, in_empty_dir, monkeypatch, variables, socket, port):
    monkeypatch.setenv("APP_DATABASE_USER", "u") if "HOST" in variables else None
    monkeypatch.setenv("APP_DATABASE_NAME", "n") if "HOST" in variables else None
    for name, value in variables.items():
        monkeypatch.setenv(f"APP_DATABASE_{name}", value)
    url = settings_module.load_settings().async_url()
    assert (url.host, url.query["host"], url.port) == (None, socket, port)


@pytest.mark.parametrize("database", ["postgresql"])
@pytest.mark.parametrize(
    ("query", "message"),
    [
        pytest.param("?host=db internal", "?host= takes a socket directory or host:port", id="host-not-a-host"),
        pytest.param("?target_session_attrs=bogus", "target_session_attrs must be any or primary", id="bad-attrs"),
    ],
)
def test_postgresql_query_values_are_checked(settings_module, database, in_empty_dir, monkeypatch, query, message):
    monkeypatch.setenv("APP_DATABASE_URL", f"postgresql://u@/db{query}")
    with pytest.raises(settings_module.SettingsError, match=re.escape(message)):
        settings_module.load_settings()


DURATIONS = ["LOCK_TIMEOUT", "LOCK_TIMEOUT_FIRST", "LOCK_RETRY_BUDGET", "STATEMENT_TIMEOUT"]
DURATIONS += ["IDLE_IN_TRANSACTION_TIMEOUT", "MIGRATION_LOCK_TIMEOUT"]


@pytest.mark.parametrize("database", ["postgresql"])
@pytest.mark.parametrize("variable", DURATIONS)
@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param("1 fortnight", "expected a duration like 500ms, 5s, 2min or 0", id="not-a-duration"),
        pytest.param("100d", "at most 2147483647ms (about 24 days)", id="beyond-postgresql"),
        pytest.param("500us", "shorter than 1ms, it would round to 0", id="rounds-to-0"),
    ],
)
def test_durations_are_checked_before_they_reach_the_server(
    settings_module, in_empty_dir, monkeypatch, variable, value, message
) -> None:
    monkeypatch.setenv("APP_DATABASE_URL", "postgresql://u:p@h/db")
    # The first lock wait may not be longer than the longest: these two leave room for the others.
    monkeypatch.setenv("APP_DATABASE_LOCK_TIMEOUT_FIRST", "1ms")
    monkeypatch.setenv("APP_DATABASE_LOCK_TIMEOUT", "1min")
    monkeypatch.setenv(f"APP_DATABASE_{variable}", value)
    with pytest.raises(settings_module.SettingsError, match=re.escape(f"APP_DATABASE_{variable}: {message}")):
        settings_module.load_settings()
    monkeypatch.setenv(f"APP_DATABASE_{variable}", " 1500ms ")
    assert getattr(settings_module.load_settings(), variable.lower()) == timedelta(milliseconds=1500)


@pytest.mark.parametrize("database", ["postgresql"])
@pytest.mark.parametrize("variable", ["LOCK_TIMEOUT", "LOCK_TIMEOUT_FIRST"])
def test_a_lock_wait_of_0_is_refused(settings_module, database, in_empty_dir, monkeypatch, variable) -> None:
    """PostgreSQL's lock_timeout 0 waits for ever: no retry, no budget, and every query behind it."""
    monkeypatch.setenv("APP_DATABASE_URL", "postgresql://u:p@h/db")
    monkeypatch.setenv(f"APP_DATABASE_{variable}", "0")
    with pytest.raises(settings_module.SettingsError, match=f"APP_DATABASE_{variable} must be more than 0"):
        settings_module.load_settings()


@pytest.mark.parametrize("database", ["postgresql"])
@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        pytest.param("SCHEMA", "tenant_a\n", "tenant_a", id="schema-from-a-configmap-block"),
        pytest.param("SCHEMA", " tenant_a ", "tenant_a", id="schema-pasted-with-spaces"),
        pytest.param("MIGRATION_ROLE", "owner\n", "owner", id="role-with-a-newline"),
    ],
)
def test_names_lose_surrounding_whitespace(
    settings_module, database, in_empty_dir, monkeypatch, variable, value, expected
) -> None:
    """PostgreSQL would take "tenant_a\n" as a schema of its own, SQLAlchemy as tenant_a."""
    monkeypatch.setenv("APP_DATABASE_URL", "postgresql://u:p@h/db")
    monkeypatch.setenv(f"APP_DATABASE_{variable}", value)
    settings = settings_module.load_settings()
    assert (settings.schema_name if variable == "SCHEMA" else settings.migration_role) == expected


@pytest.mark.parametrize("database", ["mysql", "sqlite"])
@pytest.mark.parametrize("variable", ["SCHEMA", "MIGRATION_ROLE"])
@pytest.mark.parametrize("place", ["environment", ".env", "secrets"])
def test_postgresqls_settings_are_refused_elsewhere(
    settings_module, database, in_empty_dir, monkeypatch, variable, place
) -> None:
    """A tenant's schema or an owner role that MySQL would ignore: whoever set it expects it to act."""
    monkeypatch.setenv("APP_DATABASE_URL", f"{database}://u:p@h/db" if database == "mysql" else "sqlite:///x.db")
    if place == "environment":
        monkeypatch.setenv(f"APP_DATABASE_{variable}", "tenant_a")
    elif place == ".env":
        (in_empty_dir / ".env").write_text(f"app_database_{variable.lower()}=tenant_a\n")
    else:
        secrets = in_empty_dir / "secrets"
        secrets.mkdir()
        (secrets / f"APP_DATABASE_{variable}").write_text("tenant_a\n")
        monkeypatch.setenv("APP_SECRETS_DIR", str(secrets))
    with pytest.raises(
        settings_module.SettingsError, match=f"APP_DATABASE_{variable} is PostgreSQL's and would have no effect here"
    ):
        settings_module.load_settings()


@pytest.mark.parametrize("database", ["postgresql"])
@pytest.mark.parametrize("schema", ["pg_tenant", "pg_catalog", "information_schema"])
def test_postgresqls_own_schemas_are_refused(settings_module, database, in_empty_dir, monkeypatch, schema) -> None:
    monkeypatch.setenv("APP_DATABASE_URL", "postgresql://u:p@h/db")
    monkeypatch.setenv("APP_DATABASE_SCHEMA", schema)
    with pytest.raises(settings_module.SettingsError, match="APP_DATABASE_SCHEMA names a schema of PostgreSQL's own"):
        settings_module.load_settings()


@pytest.mark.parametrize("database", ["postgresql"])
def test_first_lock_wait_is_not_longer_than_the_longest(settings_module, database, in_empty_dir, monkeypatch):
    monkeypatch.setenv("APP_DATABASE_URL", "postgresql://u:p@h/db")
    monkeypatch.setenv("APP_DATABASE_LOCK_TIMEOUT_FIRST", "2s")
    with pytest.raises(settings_module.SettingsError, match="APP_DATABASE_LOCK_TIMEOUT_FIRST is longer than"):
        settings_module.load_settings()


@pytest.mark.parametrize("database", SERVERS)
def test_missing_parts_are_named(settings_module, database, in_empty_dir, monkeypatch) -> None:
    monkeypatch.setenv("APP_DATABASE_HOST", "db.internal")
    with pytest.raises(
        settings_module.SettingsError, match="set APP_DATABASE_URL, or APP_DATABASE_USER, APP_DATABASE_NAME"
    ):
        settings_module.load_settings()


@pytest.mark.parametrize("database", ["sqlite"])
def test_sqlite_default_lives_in_the_project(settings_module, database, in_empty_dir) -> None:
    path = Path(settings_module.load_settings().async_url().database)
    assert path.is_absolute() and path.parent == Path(settings_module.__file__).parent.parent


@pytest.mark.parametrize("database", ["sqlite"])
@pytest.mark.parametrize(
    "given",
    ["sqlite:///relative/dir/../app.db", "sqlite:////abs/dir/../app.db", "sqlite:///:memory:", "sqlite://"],
)
def test_sqlite_paths_are_not_mangled(settings_module, database, in_empty_dir, monkeypatch, given) -> None:
    monkeypatch.setenv("APP_DATABASE_URL", given)
    url = settings_module.load_settings().async_url()
    assert url.drivername == "sqlite+aiosqlite"
    assert url.database == make_url(given).database


@pytest.mark.parametrize("database", ["postgresql"])
def test_postgresql_libpq_only_parameters_are_a_clear_error(settings_module, database, in_empty_dir, monkeypatch):
    monkeypatch.setenv(
        "APP_DATABASE_URL", "postgresql://u:p@h/db?sslmode=require&sslrootcert=/ca.pem&connect_timeout=5"
    )
    with pytest.raises(settings_module.SettingsError, match="asyncpg does not take connect_timeout, sslrootcert"):
        settings_module.load_settings()


@pytest.mark.parametrize("password", ["%", "%%", "100%", "%(here)s", "a%40b", SECRET, "%s%d%%%"])
def test_config_round_trip_returns_the_exact_url(tmp_path: Path, password: str) -> None:
    """What env.py hands set_main_option comes back from get_main_option unchanged."""
    project = make_project(tmp_path)
    url = make_url("postgresql+asyncpg://app@h:5432/db").set(password=password)
    real = url.render_as_string(hide_password=False)
    config = Config(str(project.path / "alembic.ini"))
    with project.activated():
        migrate = importlib.import_module(f"{project.package}.migrate")
        config.set_main_option("sqlalchemy.url", migrate.ini_escape(real))
    assert config.get_main_option("sqlalchemy.url") == real
    assert make_url(config.get_main_option("sqlalchemy.url")).password == password
