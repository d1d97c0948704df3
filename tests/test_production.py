"""Production behaviour on a real PostgreSQL with password authentication: getting there.

Servers that are down or silent, replicas that start together, TLS, PgBouncer, secret
files, passwords that must never show: every fault is made for real, on loopback.
What happens once connected, on a busy database, is in test_busy_database.py.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from rendering import failed_line
from servers import component_variables, free_port, pgbouncer, url_string
from service import SECRET, Service, assert_no_password, wait_for

# --- several replicas at once ---------------------------------------------------


def test_concurrent_upgrades_apply_each_revision_once(service: Service, tmp_path: Path) -> None:
    service.add_revision(
        "0002",
        "0001",
        """
        op.create_table("applied", sa.Column("revision", sa.String(10)))
        op.execute("INSERT INTO applied VALUES ('0002')")
        """,
    )
    service.add_revision("0003", "0002", "op.execute(\"INSERT INTO applied VALUES ('0003')\")")
    logs = [tmp_path / f"replica-{number}.log" for number in range(4)]
    # Hold the lock until all four replicas wait for it, so that they really race.
    with service.server.holding(service.url.database, f"SELECT pg_advisory_lock({service.lock_key})"):
        replicas = [service.start("upgrade", "head", log=log) for log in logs]
        try:
            wait_for(
                lambda: all("waiting for the migration lock" in log.read_text() for log in logs),
                "four replicas waiting for the migration lock",
            )
        finally:
            waited = [log.read_text() for log in logs]
    for replica in replicas:
        replica.wait(timeout=120)
    outputs = [log.read_text() for log in logs]
    assert [replica.returncode for replica in replicas] == [0, 0, 0, 0], outputs
    assert all("waiting for the migration lock" in output for output in waited)
    assert sorted(service.query("SELECT revision FROM applied")) == [("0002",), ("0003",)]
    assert service.version() == [("0003",)]
    # One replica ran the migrations; the others waited, then found nothing to do.
    assert sum("Running upgrade 0001 -> 0002" in output for output in outputs) == 1


def test_lock_wait_is_bounded_and_names_the_holder(service: Service) -> None:
    holder = "SELECT set_config('application_name', 'other-deploy', false), pg_advisory_lock({key})"
    with service.server.holding(service.url.database, holder.format(key=service.lock_key)):
        result = service.alembic("upgrade", "head", DATABASE_MIGRATION_LOCK_TIMEOUT="1s", timeout=30)
    line = failed_line(result)
    assert f"migration lock (advisory lock {service.lock_key}" in line
    assert "'other-deploy'" in line and "after 1s" in line and "DATABASE_MIGRATION_LOCK_TIMEOUT" in line
    assert "thing" not in service.tables()
    assert service.alembic("upgrade", "head").returncode == 0


@pytest.mark.same_on_stock("the stock env takes no lock")
def test_lock_can_be_turned_off_for_poolers(service: Service) -> None:
    with service.server.holding(service.url.database, f"SELECT pg_advisory_lock({service.lock_key})"):
        result = service.alembic("upgrade", "head", DATABASE_MIGRATION_LOCK="false")
    assert result.returncode == 0, result.stdout + result.stderr
    assert service.version() == [("0001",)]


@pytest.mark.same_on_stock("the stock env takes no lock")
def test_offline_sql_takes_no_lock(service: Service) -> None:
    with service.server.holding(service.url.database, f"SELECT pg_advisory_lock({service.lock_key})"):
        result = service.alembic("upgrade", "head", "--sql", DATABASE_MIGRATION_LOCK_TIMEOUT="1s")
    assert result.returncode == 0, result.stderr
    assert "pg_advisory" not in result.stdout and "CREATE TABLE thing" in result.stdout
    # A script applied by hand runs under the limits of an online run (no retries there:
    # the longest lock wait).
    assert "SET lock_timeout = '400ms';" in result.stdout
    assert "SET statement_timeout = '0ms';" in result.stdout
    assert "SET idle_in_transaction_session_timeout = '60000ms';" in result.stdout


def test_read_only_commands_do_not_wait_for_the_migration_lock(service: Service) -> None:
    """`current` and `check` from a DBA's shell answer while a migration holds the lock."""
    with service.server.holding(service.url.database, f"SELECT pg_advisory_lock({service.lock_key})"):
        # Also on a database that was never migrated (`current` creates no version table).
        fresh = service.alembic("current", DATABASE_MIGRATION_LOCK_TIMEOUT="1s", timeout=30)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert service.alembic("upgrade", "head").returncode == 0
    with service.server.holding(service.url.database, f"SELECT pg_advisory_lock({service.lock_key})"):
        current = service.alembic("current", DATABASE_MIGRATION_LOCK_TIMEOUT="1s", timeout=30)
        check = service.alembic("check", DATABASE_MIGRATION_LOCK_TIMEOUT="1s", timeout=30)
    assert current.returncode == 0 and "0001 (head)" in current.stdout, current.stdout + current.stderr
    assert check.returncode == 0, check.stdout + check.stderr


# --- timeouts ------------------------------------------------------------------


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts TCP connections and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def test_closed_port_fails_at_once(service: Service) -> None:
    port = free_port()
    result = service.alembic("current", DATABASE_URL=url_string(service.url.set(port=port)))
    line = failed_line(result)
    assert f"127.0.0.1:{port}" in line and "connection refused" in line and "DATABASE_URL" in line
    assert_no_password(result.stdout, result.stderr)


def test_silent_server_fails_within_the_connect_timeout(service: Service, silent_port: int) -> None:
    result = service.alembic(
        "current",
        DATABASE_URL=url_string(service.url.set(port=silent_port)),
        DATABASE_CONNECT_TIMEOUT="1",
        timeout=30,  # asyncpg alone would wait 60 s
    )
    line = failed_line(result)
    assert f"127.0.0.1:{silent_port}" in line and "no answer within 1 s" in line
    assert_no_password(result.stdout, result.stderr)


# --- URLs, drivers, poolers ------------------------------------------------------


@pytest.mark.parametrize(("query", "encrypted"), [("?sslmode=require", True), ("?sslmode=disable", False)])
def test_sslmode_in_the_url_is_honoured(service: Service, query: str, encrypted: bool) -> None:
    if service.server.execute("SHOW ssl") != [("on",)]:
        pytest.skip("the server of TEST_DATABASE_URL has TLS off (the suite's own cluster has it on)")
    service.add_revision(
        "0002_ssl",
        "0001",
        """
        op.create_table("conn", sa.Column("ssl", sa.Boolean), sa.Column("app", sa.Text))
        op.execute(
            "INSERT INTO conn SELECT ssl, current_setting('application_name')"
            " FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        """,
    )
    result = service.alembic("upgrade", "head", DATABASE_URL=url_string(service.url) + query)
    assert result.returncode == 0, result.stdout + result.stderr
    # application_name lets a DBA find the migration in pg_stat_activity.
    assert service.query("SELECT ssl, app FROM conn") == [(encrypted, "my-service-migrations")]


def test_through_pgbouncer_in_transaction_mode(service: Service) -> None:
    """One transaction of our own keeps one server connection: lock and limits hold."""
    service.add_revision(
        "0002_limits",
        "0001",
        """
        op.create_table("limits", sa.Column("lock_timeout", sa.Text), sa.Column("locked", sa.Boolean))
        op.execute(
            "INSERT INTO limits SELECT current_setting('lock_timeout'),"
            " EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())"
        )
        """,
        downgrade='op.drop_table("limits")',
    )
    # Migrated once already: the migration lock is taken when there is something to do.
    assert service.alembic("upgrade", "0001").returncode == 0
    with pgbouncer(service.server, service.url) as bouncer_url:
        through = {
            "DATABASE_URL": url_string(bouncer_url),
            "DATABASE_PGBOUNCER": "true",
            "DATABASE_LOCK_TIMEOUT_FIRST": "3s",
            "DATABASE_LOCK_TIMEOUT": "3s",
        }
        result = service.alembic("upgrade", "head", **through)
        assert result.returncode == 0, result.stdout + result.stderr
        assert service.query("SELECT lock_timeout, locked FROM limits") == [("3s", True)]
        assert service.alembic("downgrade", "base", **through).returncode == 0
        # Nothing of the migration session is left on PgBouncer's server connections.
        assert service.alembic("current", **through).returncode == 0
    assert service.tables() == {"alembic_version"} and service.version() == []


# PYTHONOPTIMIZE=1 is `python -O`: no assert may carry the refusal.
@pytest.mark.parametrize(
    "optimize", [pytest.param({}, id="python"), pytest.param({"PYTHONOPTIMIZE": "1"}, id="python-O")]
)
def test_autocommit_block_inside_one_transaction_is_a_clear_error(service: Service, optimize: dict[str, str]) -> None:
    """PgBouncer mode runs everything in one transaction, where autocommit_block() cannot."""
    service.add_revision(
        "0002_index",
        "0001",
        """
        with op.get_context().autocommit_block():
            op.create_index("ix_thing_name", "thing", ["name"], postgresql_concurrently=True)
        """,
    )
    line = failed_line(service.alembic("upgrade", "head", DATABASE_PGBOUNCER="true", **optimize))
    assert "0002_index.py uses autocommit_block()" in line and "DATABASE_PGBOUNCER" in line
    assert "nothing of this run was applied" in line and "direct connection" in line
    assert service.tables() == set()
    # Through a direct connection it works.
    assert service.alembic("upgrade", "head", **optimize).returncode == 0
    assert service.version() == [("0002_index",)]


def test_python_O_runs_and_fails_as_plain_python(service: Service) -> None:
    """`python -O -m alembic`: upgrade, a failing revision's line, downgrade, offline SQL."""
    optimize = {"PYTHONOPTIMIZE": "1"}
    service.add_revision("0002_bad", "0001", 'op.execute("SELECT no_such_function()")')
    line = failed_line(service.alembic("upgrade", "head", **optimize))
    assert "0002_bad.py failed" in line and "the database is at 0001" in line
    (service.project.path / "migrations" / "versions" / "0002_bad.py").unlink()
    assert service.alembic("upgrade", "head", "--sql", **optimize).returncode == 0
    assert service.alembic("downgrade", "base", **optimize).returncode == 0
    assert service.tables() == {"alembic_version"} and service.version() == []


# --- secrets ---------------------------------------------------------------------


@pytest.mark.same_on_stock("secret files are read by the settings module, not env.py")
def test_password_from_a_secret_file(service: Service, tmp_path: Path) -> None:
    secrets_dir = tmp_path / "run-secrets"
    secrets_dir.mkdir()
    (secrets_dir / "database_password").write_text(SECRET + "\n")
    variables = component_variables(service.url)
    del variables["DATABASE_PASSWORD"]
    result = service.project.cli("upgrade", "head", env={"SECRETS_DIR": str(secrets_dir), **variables})
    assert result.returncode == 0, result.stdout + result.stderr
    assert service.version() == [("0001",)]


@pytest.mark.same_on_stock("the settings module keeps the password out of messages")
def test_password_never_printed(service: Service) -> None:
    runs = [
        service.alembic("upgrade", "head"),  # Alembic's own INFO logging
        service.alembic("upgrade", "head", "--sql"),
        service.alembic("current", DATABASE_URL=url_string(service.url.set(port=free_port()))),
        service.alembic(
            "current", DATABASE_URL=url_string(service.url.set(host="no-such-host.invalid")), network=False
        ),
        service.alembic("current", DATABASE_URL=url_string(service.url).replace("@", "@@"), network=False),
        service.alembic("current", DATABASE_URL=url_string(service.url.set(username="nobody"))),
    ]
    assert runs[0].returncode == 0
    for result in runs:
        assert_no_password(result.stdout, result.stderr)
