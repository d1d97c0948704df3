"""Mistakes users make with the settings, as `alembic` reports them, against the real servers.

Each ends with one FAILED: line that names what to fix, before anything reaches a server
(or a DNS resolver), and shows no part of a password. test_settings.py checks the rules
themselves, without a server.
"""

from __future__ import annotations

import pytest
from sqlalchemy.engine import URL

from rendering import Project, failed_line
from servers import SQLiteFiles, component_variables, free_port, url_string
from service import Service, assert_no_password


def test_offline_sql_needs_no_settings_at_all(backend, backend_project: Project) -> None:
    """The template knows the kind of database: `--sql` needs no URL and no server."""
    backend_project.add_thing()
    result = backend_project.cli("upgrade", "head", "--sql", network=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CREATE TABLE thing" in result.stdout
    if isinstance(backend, SQLiteFiles):
        assert not list(backend_project.path.glob("*.sqlite3"))


def test_online_commands_still_need_the_database_named(backend, backend_project: Project) -> None:
    if isinstance(backend, SQLiteFiles):
        pytest.skip("SQLite has a default database file")
    line = failed_line(backend_project.cli("current"))
    assert "set DATABASE_URL, or DATABASE_HOST, DATABASE_USER, DATABASE_NAME" in line


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda userinfo: userinfo.replace("%40", "@"), id="unencoded-at-sign"),
        pytest.param(lambda userinfo: userinfo.replace("%2F", "/"), id="unencoded-slash"),
    ],
)
def test_url_that_cannot_be_right_never_reaches_a_resolver(service: Service, mangle) -> None:
    """`postgresql://app:Tr0ub@dor&3@host/db`: a piece of the password would be the host name."""
    encoded = url_string(service.url)
    userinfo, _, rest = encoded.partition("://")[2].rpartition("@")
    raw = f"postgresql://{mangle(userinfo)}@{rest}"
    result = service.alembic("current", DATABASE_URL=raw, network=False)
    line = failed_line(result)
    assert "DATABASE_URL cannot be right: check its host and port" in line and "percent-encode the user name" in line
    assert_no_password(result.stdout, result.stderr)
    # Neither the password's pieces (percent-encoded or not) nor the host nor the user.
    for piece in ("%", "127.0.0.1", service.url.username):
        assert piece not in line.partition("(python -c")[0]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        pytest.param("DATABASE_LOCK_TIMEOUT", "100d", id="lock-timeout-beyond-postgresql"),
        pytest.param("DATABASE_MIGRATION_LOCK_TIMEOUT", "100d", id="migration-lock-timeout"),
        pytest.param("DATABASE_CONNECT_TIMEOUT", "nan", id="connect-timeout-nan"),
        pytest.param("DATABASE_CONNECT_TIMEOUT", "0", id="connect-timeout-0"),
    ],
)
def test_bad_value_is_named_before_anything_is_sent(service: Service, variable: str, value: str) -> None:
    """The URL points at a closed port: had anything been sent, the line would say so."""
    closed = url_string(service.url.set(port=free_port()))
    line = failed_line(service.alembic("current", DATABASE_URL=closed, **{variable: value}))
    assert line.startswith(f"FAILED: database settings: {variable}: ") and "connect" not in line


def test_port_0_does_not_mean_the_default_port(service: Service) -> None:
    variables = component_variables(service.url) | {"DATABASE_PORT": "0"}
    line = failed_line(service.project.cli("current", env=variables))
    assert "DATABASE_PORT: Input should be greater than or equal to 1" in line


@pytest.mark.parametrize(
    ("password", "words"),
    [
        pytest.param("a", ["password authentication failed", "cannot connect to the database at"], id="one-letter"),
        pytest.param("127", ["127.0.0.1"], id="digits-of-the-address"),
    ],
)
def test_masking_cleans_only_the_drivers_words(service: Service, password: str, words: list[str]) -> None:
    """The password is hidden where it stands on its own, never by rewriting other words."""
    variables = component_variables(service.url) | {"DATABASE_PASSWORD": password}
    line = failed_line(service.project.cli("current", env=variables))
    for word in words:
        assert word in line
    assert "***" not in line


def test_unix_socket_directory_as_host(service: Service) -> None:
    if service.server.socket_dir is None:
        pytest.skip("TEST_DATABASE_URL names a server whose socket this suite cannot reach")
    variables = component_variables(service.url) | {"DATABASE_HOST": str(service.server.socket_dir)}
    result = service.project.cli("upgrade", "head", env=variables, network=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert service.version() == [("0001",)]
    # The same as a URL, as managed databases hand it out: the socket directory in ?host=.
    url = service.url
    socket = URL.create(url.drivername, url.username, url.password, None, url.port, url.database)
    as_url = url_string(socket.set(query={"host": str(service.server.socket_dir)}))
    result = service.alembic("downgrade", "base", DATABASE_URL=as_url, network=False)
    assert result.returncode == 0, result.stdout + result.stderr
    # A socket that is not there is named, with the port that chooses its file.
    variables["DATABASE_PORT"] = "1"
    line = failed_line(service.project.cli("current", env=variables, network=False))
    assert f"cannot connect to the database at {service.server.socket_dir} (port 1)" in line


def test_ipv6_address_is_written_as_in_a_url(service: Service) -> None:
    port = free_port()
    variables = component_variables(service.url) | {"DATABASE_HOST": "::1", "DATABASE_PORT": str(port)}
    line = failed_line(service.project.cli("current", env=variables))
    assert f"cannot connect to the database at [::1]:{port}" in line


def test_target_session_attrs_that_no_server_matches(service: Service) -> None:
    line = failed_line(
        service.alembic("current", DATABASE_URL=url_string(service.url) + "?target_session_attrs=standby")
    )
    assert "no server there is a standby server (target_session_attrs)" in line
    assert "SessionAttribute" not in line


def test_several_servers_in_the_url_and_the_one_that_fits(service: Service) -> None:
    """libpq's failover form: the hosts in ?host=, target_session_attrs picks the server."""
    url = service.url
    hosts = f"?host=127.0.0.1:{free_port()}&host=127.0.0.1:{url.port}&target_session_attrs=read-write"
    as_url = url_string(URL.create(url.drivername, url.username, url.password, database=url.database)) + hosts
    result = service.alembic("upgrade", "head", DATABASE_URL=as_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert service.version() == [("0001",)]


def test_a_wrong_password_beside_a_url_names_both_variables(service: Service) -> None:
    url = service.url
    without_password = url_string(URL.create(url.drivername, url.username, None, url.host, url.port, url.database))
    line = failed_line(service.alembic("current", DATABASE_URL=without_password, DATABASE_PASSWORD="wrong"))
    assert "password authentication failed" in line and line.endswith("check DATABASE_URL and DATABASE_PASSWORD")


def test_a_url_with_a_trailing_newline_works(service: Service) -> None:
    """A URL stored with `echo` into a secret ends in a newline: no part of the URL."""
    result = service.alembic("upgrade", "head", DATABASE_URL=url_string(service.url) + "\n")
    assert result.returncode == 0, result.stdout + result.stderr
