"""The rendered settings module: where values come from and what errors say (no database needed)."""

from __future__ import annotations

import importlib
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
def test_sources_in_priority_order(settings_module, database, in_empty_dir, monkeypatch) -> None:
    """env var > .env > secret file > default."""
    secrets_dir = in_empty_dir / "secrets"
    secrets_dir.mkdir()
    monkeypatch.setenv("APP_SECRETS_DIR", str(secrets_dir))
    # Docker and Kubernetes write lower-case file names with a trailing newline.
    (secrets_dir / "app_database_host").write_text("from-secret\n")
    (secrets_dir / "app_database_user").write_text("from-secret\n")
    (secrets_dir / "app_database_name").write_text("from-secret\n")
    (secrets_dir / "app_database_password").write_text(SECRET + "\n")
    (in_empty_dir / ".env").write_text(
        "APP_DATABASE_USER=from-dotenv\nAPP_DATABASE_NAME=from-dotenv\nOTHER_SERVICE_KEY=ignored\n"
    )
    monkeypatch.setenv("APP_DATABASE_NAME", "from-env")
    url = settings_module.load_settings().async_url()
    assert (url.host, url.username, url.database) == ("from-secret", "from-dotenv", "from-env")
    assert url.password == SECRET
    assert url.port == settings_module.DatabaseSettings.model_fields["port"].default


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
        pytest.param("URL", "http//" + SECRET, "APP_DATABASE_URL is not a URL like", id="unparsable-url"),
        pytest.param("URL", f"oracle://u:{quote(SECRET)}@h/db", "must be a URL like", id="other-database"),
        pytest.param("URL", f"mysql://u:{SECRET}@h:1/db", "_URL is not a URL like", id="password-not-encoded"),
        pytest.param("CONNECT_TIMEOUT", "soon", "APP_DATABASE_CONNECT_TIMEOUT: Input should be", id="bad-timeout"),
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
    with pytest.raises(settings_module.SettingsError) as caught:
        settings_module.load_settings()
    message = str(caught.value)
    assert expected in message
    assert SECRET not in message and "\n" not in message


@pytest.mark.parametrize("database", ["postgresql"])
@pytest.mark.parametrize("variable", ["LOCK_TIMEOUT", "STATEMENT_TIMEOUT", "MIGRATION_LOCK_TIMEOUT"])
def test_durations_are_checked_before_they_reach_the_server(settings_module, in_empty_dir, monkeypatch, variable):
    monkeypatch.setenv("APP_DATABASE_URL", "postgresql://u:p@h/db")
    monkeypatch.setenv(f"APP_DATABASE_{variable}", "1 fortnight")
    with pytest.raises(settings_module.SettingsError, match=f"APP_DATABASE_{variable}: expected a duration like"):
        settings_module.load_settings()
    monkeypatch.setenv(f"APP_DATABASE_{variable}", " 1500ms ")
    assert getattr(settings_module.load_settings(), variable.lower()) == timedelta(milliseconds=1500)


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
