"""Operations: a database that starts late, tenants in schemas, an owner role, readiness.

Against real servers: DATABASE_WAIT with a PostgreSQL cluster that starts only after the
migration began (first in recovery, refusing with SQLSTATE 57P03, then promoted) and with
a loopback port where MariaDB arrives late; DATABASE_SCHEMA with two tenants in one
database; DATABASE_MIGRATION_ROLE with the grants the rendered README shows, ownership read
from the catalog; the readiness API and `alembic current --check-heads` on each database,
empty, behind and at head. The rendered README ("Configure the database", "In production",
"Is the database ready?") promises what these check.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import yaml
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from rendering import Project, failed_line, make_project, render, subprocess_env
from servers import Server, _as_service_user, execute, free_port, pg_literal, pgbouncer, postgres_bindir, url_string
from service import SECRET, Service, assert_no_password, wait_for

MORE_MODEL = """
class More(Base):
    __tablename__ = "more"

    id: Mapped[int] = mapped_column(primary_key=True)
"""


def add_more(project: Project) -> None:
    """Model and revision 0002_more (after the Thing of 0001)."""
    project.add_model(MORE_MODEL)
    project.add_revision(
        "0002_more",
        "0001",
        'op.create_table("more", sa.Column("id", sa.Integer(), nullable=False),'
        ' sa.PrimaryKeyConstraint("id", name=op.f("pk_more")))',
        'op.drop_table("more")',
    )


def succeeded(result: subprocess.CompletedProcess) -> bool:
    assert result.returncode == 0, result.stdout + result.stderr
    return True


def start(project: Project, env: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    """`alembic ARGS` (default: upgrade head) in the background, its output into `log`."""
    with open(log, "w") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "alembic", *(args or ("upgrade", "head"))],
            cwd=project.path,
            env=subprocess_env(**env),
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def waits(output: str) -> list[str]:
    """The log lines of DATABASE_WAIT: one per try that failed while the server was not up."""
    return [line for line in output.splitlines() if "next try in" in line]


# --- DATABASE_WAIT: a server that is not up yet --------------------------------------


@dataclass
class LatePostgres:
    """A PostgreSQL cluster, made but not started: nothing listens on its port yet."""

    root: Path
    port: int
    run_as: list[str]

    @property
    def url(self) -> URL:
        return URL.create("postgresql", "postgres", SECRET, "127.0.0.1", self.port, "postgres")

    @property
    def server(self) -> Server:
        return Server("postgresql", self.url)

    def start_in_recovery(self) -> None:
        """Start it as a standby without hot standby: it answers every connection with
        SQLSTATE 57P03 (cannot_connect_now), as a server that is still starting up does."""
        signal = self.root / "data" / "standby.signal"
        signal.touch()
        if self.run_as:
            shutil.chown(signal, "postgres")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c hot_standby=off"
        self._pg_ctl("-l", str(self.root / "log"), "-o", options, "-W", "start")

    def promote(self) -> None:
        """End the recovery: from now on it takes connections."""
        self._pg_ctl("-w", "promote")

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run([*self.run_as, postgres_bindir() / "pg_ctl", "-D", self.root / "data", *args], check=True)


@contextlib.contextmanager
def late_postgres() -> Iterator[LatePostgres]:
    run_as = _as_service_user("postgres")
    root = Path(tempfile.mkdtemp(prefix="pg-late-"))
    (root / "pwfile").write_text(SECRET)
    if run_as:
        shutil.chown(root, "postgres")
        shutil.chown(root / "pwfile", "postgres")
    cluster = LatePostgres(root, free_port(), run_as)
    try:
        subprocess.run(
            [*run_as, postgres_bindir() / "initdb", "-D", root / "data", "-U", "postgres",
             "--auth=scram-sha-256", f"--pwfile={root / 'pwfile'}", "--no-sync", "-E", "UTF8", "--locale=C"],
            check=True, capture_output=True,
        )  # fmt: skip
        yield cluster
    finally:
        subprocess.run([*run_as, postgres_bindir() / "pg_ctl", "-D", root / "data", "-m", "immediate", "stop"],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


class LatePort:
    """A loopback port where a server arrives late. At first nothing listens (connections
    are refused); after listen() it accepts connections and says nothing (a server that
    does not answer yet), or with listen(closing=True) closes each at once (a container's
    published port before its server listens); after forward() it passes each new
    connection on to the real server at `target_port`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.forwarding = threading.Event()
        self.sockets: list[socket.socket] = []
        self.closing = False

    def listen(self, *, closing: bool = False) -> None:
        self.closing = closing
        listener = socket.create_server(("127.0.0.1", self.port))
        self.sockets.append(listener)
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def forward(self) -> None:
        self.forwarding.set()

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if not self.forwarding.is_set() and self.closing:
                client.close()
                continue
            self.sockets.append(client)
            if not self.forwarding.is_set():
                continue  # held open, and never a word
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets.append(server)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def test_wait_outlasts_a_postgresql_that_starts_late(project: Project, tmp_path: Path) -> None:
    """Refused while nothing listens, 57P03 while it recovers, then the migration runs."""
    project.add_thing()
    log = tmp_path / "migration.log"
    with late_postgres() as late:
        migration = start(project, {"DATABASE_URL": url_string(late.url), "DATABASE_WAIT": "2min"}, log)
        try:
            wait_for(lambda: waits(log.read_text()), "a refused try")
            late.start_in_recovery()
            # A try that the server itself turned down: it is there, but not ready.
            wait_for(lambda: [w for w in waits(log.read_text()) if "refused" not in w], "a try while it recovers")
            late.promote()
            migration.wait(timeout=60)
        finally:
            migration.kill()
        output = log.read_text()
        assert migration.returncode == 0, output
        assert "thing" in late.server.tables(late.url)
    refused, starting = waits(output)[0], waits(output)[-1]
    # One line per try: what failed, where, and when the next try comes; never the password.
    assert f"127.0.0.1:{late.port}: connection refused" in refused and "next try in 0.5 s" in refused
    assert "(DATABASE_WAIT: 1" in refused and " s left)" in refused
    assert "refused" not in starting and f"127.0.0.1:{late.port}" in starting
    assert "FAILED" not in output
    assert_no_password(output)


def test_wait_outlasts_a_mysql_that_arrives_late(mysql: Server, tmp_path: Path) -> None:
    """Refused while nothing listens, silent while it does not answer, then the migration runs."""
    project = make_project(tmp_path / "render", database="mysql")
    project.add_thing()
    url = mysql.create_database(password=SECRET)
    late = LatePort(url.port)
    log = tmp_path / "migration.log"
    env = {"DATABASE_URL": url_string(url.set(port=late.port)), "DATABASE_WAIT": "2min"}
    migration = start(project, {**env, "DATABASE_CONNECT_TIMEOUT": "1"}, log)
    try:
        wait_for(lambda: waits(log.read_text()), "a refused try")
        late.listen()
        wait_for(lambda: "no answer within 1 s" in log.read_text(), "a try that found no answer")
        late.forward()
        migration.wait(timeout=60)
    finally:
        migration.kill()
        late.close()
    output = log.read_text()
    assert migration.returncode == 0, output
    assert "thing" in mysql.tables(url)
    tries = waits(output)
    assert f"127.0.0.1:{late.port}" in tries[0] and "Can't connect to MySQL server" in tries[0]
    assert any("no answer within 1 s" in line for line in tries)
    assert_no_password(output)


@pytest.mark.parametrize("database", ["postgresql", "mysql"])
def test_wait_outlasts_a_port_that_closes_each_connection(
    request: pytest.FixtureRequest, database: str, tmp_path: Path
) -> None:
    server = request.getfixturevalue("postgres" if database == "postgresql" else "mysql")
    project = make_project(tmp_path / "render", database=database)
    project.add_thing()
    url = server.create_database(password=SECRET)
    late = LatePort(url.port)
    late.listen(closing=True)
    log = tmp_path / "migration.log"
    migration = start(project, {"DATABASE_URL": url_string(url.set(port=late.port)), "DATABASE_WAIT": "2min"}, log)
    try:
        wait_for(lambda: len(waits(log.read_text())) >= 2, "two tries on the closing port")
        late.forward()
        migration.wait(timeout=60)
    finally:
        migration.kill()
        late.close()
    output = log.read_text()
    assert migration.returncode == 0, output
    assert "thing" in server.tables(url)
    assert_no_password(output)


@pytest.mark.parametrize("database", ["postgresql", "mysql"])
def test_wait_ends_with_the_usual_failed_line(database: str, tmp_path: Path) -> None:
    project = make_project(tmp_path, database=database)
    port = free_port()  # where nothing ever listens
    url = URL.create(database, "app", SECRET, "127.0.0.1", port, "app")
    result = project.cli("upgrade", "head", env={"DATABASE_URL": url_string(url), "DATABASE_WAIT": "2s"})
    line = failed_line(result)
    assert f"cannot connect to the database at 127.0.0.1:{port}" in line
    assert line.endswith("still so after 2s (DATABASE_WAIT)")
    tries = waits(result.stderr)
    assert len(tries) >= 2 and all(f"127.0.0.1:{port}" in line for line in tries)
    assert_no_password(result.stdout, result.stderr)


@pytest.mark.parametrize(
    ("database", "wrong"),
    [
        pytest.param("postgresql", "password", id="postgresql-password"),
        pytest.param("postgresql", "database", id="postgresql-database"),
        pytest.param("mysql", "password", id="mysql-password"),
        pytest.param("mysql", "database", id="mysql-database"),
    ],
)
def test_wait_does_not_wait_for_what_waiting_cannot_fix(
    request: pytest.FixtureRequest, database: str, wrong: str, tmp_path: Path
) -> None:
    server = request.getfixturevalue("postgres" if database == "postgresql" else "mysql")
    project = make_project(tmp_path, database=database)
    url = server.create_database()
    url = url.set(password="not-" + url.password) if wrong == "password" else url.set(database="no_such_database")
    # Ten minutes of DATABASE_WAIT; the run ends long before the subprocess timeout.
    result = project.cli("upgrade", "head", env={"DATABASE_URL": url_string(url), "DATABASE_WAIT": "10min"}, timeout=60)
    line = failed_line(result)
    assert "cannot connect to the database" in line and "DATABASE_WAIT" not in line
    assert waits(result.stderr) == []


@pytest.mark.parametrize("database", ["postgresql", "mysql"])
def test_without_wait_a_refused_connection_fails_at_once(database: str, tmp_path: Path) -> None:
    project = make_project(tmp_path, database=database)
    url = URL.create(database, "app", SECRET, "127.0.0.1", free_port(), "app")
    result = project.cli("upgrade", "head", env={"DATABASE_URL": url_string(url)})
    assert "cannot connect to the database" in failed_line(result)
    assert waits(result.stderr) == []


@pytest.mark.parametrize(
    "answers",
    [
        pytest.param({"database": "postgresql"}, id="postgresql"),
        pytest.param({"database": "mysql", "env_prefix": "APP_"}, id="mysql-APP_"),
    ],
)
def test_the_deploy_files_give_the_database_time_to_come_up(answers: dict[str, str], tmp_path: Path) -> None:
    """compose.yaml's migrate and the Kubernetes Job wait for the database, within the Job's deadline."""
    path, prefix = render(tmp_path, **answers), answers.get("env_prefix", "")
    compose = yaml.safe_load((path / "compose.yaml").read_text())
    assert compose["services"]["migrate"]["environment"][f"{prefix}DATABASE_WAIT"] == "1min"
    config_map = yaml.safe_load((path / "deploy" / "kubernetes" / "configmap.yaml").read_text())
    job = yaml.safe_load((path / "deploy" / "kubernetes" / "job.yaml").read_text())
    assert config_map["data"][f"{prefix}DATABASE_WAIT"] == "2min"
    assert job["spec"]["activeDeadlineSeconds"] > 2 * 60


# --- DATABASE_SCHEMA: tenants in one database ---------------------------------------


def tables_in(service: Service, schema: str) -> dict[str, str]:
    """The tables of `schema`, with their owners, from the catalog."""
    return dict(service.query(f"SELECT tablename, tableowner FROM pg_tables WHERE schemaname = '{schema}'"))


def version_in(service: Service, schema: str) -> list[tuple]:
    return service.query(f"SELECT version_num FROM {schema}.alembic_version")


def test_two_tenants_in_one_database_keep_histories_of_their_own(service: Service) -> None:
    add_more(service.project)
    tenant_a, tenant_b = {"DATABASE_SCHEMA": "tenant_a"}, {"DATABASE_SCHEMA": "tenant_b"}
    assert succeeded(service.alembic("upgrade", "head", **tenant_a))
    assert succeeded(service.alembic("upgrade", "0001", **tenant_b))
    # Each schema has its own tables and its own alembic_version; the search_path's has none.
    assert tables_in(service, "tenant_a").keys() == {"alembic_version", "thing", "more"}
    assert tables_in(service, "tenant_b").keys() == {"alembic_version", "thing"}
    assert service.tables() == set()
    assert version_in(service, "tenant_a") == [("0002_more",)] and version_in(service, "tenant_b") == [("0001",)]
    assert "0002_more (head)" in service.alembic("current", **tenant_a).stdout
    assert "0001" in service.alembic("current", **tenant_b).stdout
    # autogenerate compares the models with the tenant's schema alone: neither the tenant
    # that is behind nor a table elsewhere in the database counts.
    service.query("CREATE TABLE public.legacy (id integer)")
    assert succeeded(service.alembic("check", **tenant_a))
    assert succeeded(service.alembic("upgrade", "head", **tenant_b))
    assert succeeded(service.alembic("check", **tenant_b))
    assert version_in(service, "tenant_b") == [("0002_more",)]
    # Down again, one tenant only.
    assert succeeded(service.alembic("downgrade", "base", **tenant_a))
    assert tables_in(service, "tenant_a").keys() == {"alembic_version"}
    assert tables_in(service, "tenant_b").keys() == {"alembic_version", "thing", "more"}


def test_autogenerate_compares_the_models_with_the_tenants_schema_alone(service: Service) -> None:
    """A table the tenant lacks is new, though another schema has it; another tenant's extra table is not its own."""
    for tenant in ("tenant_a", "tenant_b"):
        assert succeeded(service.alembic("upgrade", "head", DATABASE_SCHEMA=tenant))
    service.query("CREATE TABLE public.more (id integer PRIMARY KEY)")
    service.query("CREATE TABLE tenant_b.stale (id integer)")
    service.project.add_model(MORE_MODEL)
    result = service.alembic("revision", "--autogenerate", "-m", "more", DATABASE_SCHEMA="tenant_a")
    assert succeeded(result)
    [revision] = (service.project.path / "migrations" / "versions").glob("*_more.py")
    upgrade, _, downgrade = revision.read_text().partition("def downgrade")
    assert "op.create_table(" in upgrade and '"more"' in upgrade and '"thing"' not in upgrade
    assert "stale" not in upgrade and "alembic_version" not in upgrade + downgrade


def test_tenants_do_not_wait_for_each_others_migration_lock(service: Service, tmp_path: Path) -> None:
    service.add_revision(
        "0002_pause",
        "0001",
        """
        op.create_table("paused", sa.Column("id", sa.Integer))
        while os.environ.get("PAUSE_UNTIL") and not os.path.exists(os.environ["PAUSE_UNTIL"]):
            time.sleep(0.05)
        """,
    )
    revision = service.project.path / "migrations" / "versions" / "0002_pause.py"
    revision.write_text(revision.read_text().replace("import os\n", "import os\nimport time\n"))
    go_on, log = tmp_path / "go-on", tmp_path / "tenant_a.log"
    tenant_a = service.start("upgrade", "head", log=log, DATABASE_SCHEMA="tenant_a", PAUSE_UNTIL=str(go_on))
    try:
        wait_for(lambda: "Running upgrade 0001 -> 0002_pause" in log.read_text(), "tenant_a to hold its lock")
        # Another tenant migrates meanwhile, all the way ...
        other = service.alembic("upgrade", "head", DATABASE_SCHEMA="tenant_b", DATABASE_MIGRATION_LOCK_TIMEOUT="1s")
        # ... while a second run for tenant_a waits for the lock of the first.
        replica = service.alembic("upgrade", "head", DATABASE_SCHEMA="tenant_a", DATABASE_MIGRATION_LOCK_TIMEOUT="1s")
    finally:
        go_on.touch()
        tenant_a.wait(timeout=60)
    assert succeeded(other) and "waiting for the migration lock" not in other.stderr
    assert "another migration still holds the migration lock" in failed_line(replica)
    assert tenant_a.returncode == 0, log.read_text()
    assert version_in(service, "tenant_a") == version_in(service, "tenant_b") == [("0002_pause",)]


def test_a_schema_the_role_may_not_create_is_one_line_naming_the_variable(service: Service) -> None:
    database, user = service.url.database, service.url.username
    service.server.execute(f'REVOKE CREATE ON DATABASE "{database}" FROM "{user}"')
    line = failed_line(service.alembic("upgrade", "head", DATABASE_SCHEMA="tenant_a"))
    assert "cannot create the schema tenant_a (DATABASE_SCHEMA): permission denied" in line
    assert f'CREATE SCHEMA "tenant_a" AUTHORIZATION "{user}"' in line
    assert f'GRANT CREATE ON DATABASE "{database}" TO "{user}"' in line
    # Read-only commands do not try to create it.
    assert succeeded(service.alembic("current", DATABASE_SCHEMA="tenant_a"))
    # Created for the role, as the line says: the same command works.
    service.server.execute(f'CREATE SCHEMA tenant_a AUTHORIZATION "{user}"', database=database)
    assert succeeded(service.alembic("upgrade", "head", DATABASE_SCHEMA="tenant_a"))
    assert tables_in(service, "tenant_a").keys() == {"alembic_version", "thing"}


def test_a_schema_the_role_may_not_use_is_one_line_naming_the_variable(service: Service) -> None:
    """An existing schema without USAGE for the role: every command says so, `current` included."""
    service.query("CREATE SCHEMA kept_apart")
    for command in (["upgrade", "head"], ["current"]):
        line = failed_line(service.alembic(*command, DATABASE_SCHEMA="kept_apart"))
        assert "may not use the schema kept_apart (DATABASE_SCHEMA)" in line
        assert f'GRANT USAGE, CREATE ON SCHEMA "kept_apart" TO "{service.url.username}"' in line
    service.query(f'GRANT USAGE, CREATE ON SCHEMA kept_apart TO "{service.url.username}"')
    assert succeeded(service.alembic("upgrade", "head", DATABASE_SCHEMA="kept_apart"))
    assert tables_in(service, "kept_apart").keys() == {"alembic_version", "thing"}


@pytest.mark.parametrize("target", ["base", "-1"])
def test_a_downgrade_does_not_create_a_missing_schema(service: Service, target: str) -> None:
    """A misspelt tenant: nothing to undo there, said so, and no empty schema left behind."""
    line = failed_line(service.alembic("downgrade", target, DATABASE_SCHEMA="tenant_typo"))
    assert "the schema tenant_typo (DATABASE_SCHEMA) does not exist (a typo?): only a command that applies" in line
    assert service.query("SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_typo'") == [(0,)]


def test_a_blocked_tenant_names_its_own_blockers_only(service: Service) -> None:
    """Sessions that lock another tenant's table of the same name are not in the way, and not named."""
    for tenant in ("tenant_a", "tenant_b"):
        assert succeeded(service.alembic("upgrade", "0001", DATABASE_SCHEMA=tenant))
    service.add_revision(
        "0002_colour", "0001", 'op.add_column("thing", sa.Column("colour", sa.String(20)))',
        downgrade='op.drop_column("thing", "colour")',
    )  # fmt: skip

    def report(tenant: str) -> list[str]:
        return [f"SELECT set_config('application_name', '{tenant}-report', false)", f"SELECT * FROM {tenant}.thing"]

    with (
        service.server.holding(service.url.database, *report("tenant_a")),
        service.server.holding(service.url.database, *report("tenant_b")),
    ):
        result = service.alembic(
            "upgrade", "head", DATABASE_SCHEMA="tenant_b", DATABASE_LOCK_RETRY_BUDGET="0", DATABASE_LOCK_TIMEOUT="300ms"
        )
    line = failed_line(result)
    assert "waited 300ms for a lock" in line and "'tenant_b-report'" in line and "tenant_a-report" not in line


@pytest.mark.parametrize("variable", ["DATABASE_SCHEMA", "DATABASE_MIGRATION_ROLE"])
@pytest.mark.parametrize("value", ["", "ü" * 32], ids=["empty", "64-bytes"])
def test_a_name_postgresql_would_cut_short_is_refused_before_connecting(
    service: Service, variable: str, value: str
) -> None:
    result = service.alembic("upgrade", "head", **{variable: value})
    assert f"{variable} must be a name of 1 to 63 bytes" in failed_line(result)
    assert service.tables() == set()


# --- DATABASE_MIGRATION_ROLE: an owner role ---------------------------------------------


@dataclass
class OwnerRoles:
    """The roles of the README's "An owner role", with names of this test."""

    owner: str
    migrate_url: URL
    app_url: URL


@pytest.fixture
def owner_roles(service: Service) -> OwnerRoles:
    """The rendered README's roles and grants, run as they stand (names and database made unique)."""
    readme = (service.project.path / "README.md").read_text()
    match = re.search(r"<!-- owner-role-grants[^\n]*-->\n```sql\n(.*?)\n```", readme, re.DOTALL)
    assert match, "README.md has no owner-role-grants block"
    suffix, password = secrets.token_hex(4), "pw-" + secrets.token_hex(8)
    names = {name: f"{name}_{suffix}" for name in ("app_owner", "app_migrate", "app_rw")}
    sql = match[1]
    for name, unique in names.items():
        sql = re.sub(rf"\b{name}\b", unique, sql)
    assert sql.count("ON DATABASE app TO") == 1, "the README's grant names the database `app`"
    sql = sql.replace("ON DATABASE app TO", f'ON DATABASE "{service.url.database}" TO')
    sql = sql.replace("'CHANGE_ME'", pg_literal(password))
    code = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
    statements = [statement.strip() for statement in code.split(";") if statement.strip()]
    service.server.execute(*statements, database=service.url.database)
    return OwnerRoles(
        names["app_owner"],
        service.url.set(username=names["app_migrate"], password=password),
        service.url.set(username=names["app_rw"], password=password),
    )


def owners_in(service: Service, schema: str) -> dict[str, str]:
    """Every relation of `schema` (tables, indexes, sequences) with its owner, from the catalog."""
    rows = service.query(
        "SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_class c"
        f" JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = '{schema}'"
    )
    return dict(rows)


@pytest.mark.parametrize("schema", [None, "tenant_a"], ids=["search-path", "own-schema"])
def test_the_owner_role_owns_everything_the_migration_creates(
    service: Service, owner_roles: OwnerRoles, schema: str | None
) -> None:
    env = {"DATABASE_URL": url_string(owner_roles.migrate_url), "DATABASE_MIGRATION_ROLE": owner_roles.owner}
    if schema:
        env["DATABASE_SCHEMA"] = schema
    assert succeeded(service.project.cli("upgrade", "head", env=env))
    where = schema or "public"
    owners = owners_in(service, where)
    assert {"thing", "pk_thing", "thing_id_seq", "alembic_version", "alembic_version_pkc"} <= owners.keys()
    assert set(owners.values()) == {owner_roles.owner}, owners
    if schema:
        assert service.query(f"SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = '{schema}'") == [
            (owner_roles.owner,)
        ]
    # The application's login, with the README's default privileges: rows yes, tables no.
    assert execute(owner_roles.app_url, f"INSERT INTO {where}.thing (name) VALUES ('a') RETURNING id") == [(1,)]
    assert execute(owner_roles.app_url, f"SELECT name FROM {where}.thing") == [("a",)]
    with pytest.raises(DBAPIError, match="must be owner of table thing"):
        execute(owner_roles.app_url, f"ALTER TABLE {where}.thing ADD COLUMN x integer")
    # The next revision, by the same login, keeps the owner; and so does going down.
    add_more(service.project)
    assert succeeded(service.project.cli("upgrade", "head", env=env))
    assert owners_in(service, where)["more"] == owner_roles.owner
    assert execute(owner_roles.app_url, f"SELECT count(*) FROM {where}.more") == [(0,)]
    assert succeeded(service.project.cli("downgrade", "0001", env=env))


def test_a_role_the_login_may_not_set_is_one_line_naming_the_variable(service: Service) -> None:
    role = "r_" + secrets.token_hex(6)
    service.server.execute(f'CREATE ROLE "{role}" NOLOGIN')
    line = failed_line(service.alembic("upgrade", "head", DATABASE_MIGRATION_ROLE=role))
    assert f"cannot switch to the role {role} (DATABASE_MIGRATION_ROLE): permission denied to set role" in line
    assert f'GRANT "{role}" TO "{service.url.username}"' in line
    assert service.tables() == set()
    assert_no_password(line)


def test_a_role_that_does_not_exist_is_named_as_such(service: Service) -> None:
    line = failed_line(service.alembic("upgrade", "head", DATABASE_MIGRATION_ROLE="no_such_owner"))
    assert (
        'cannot switch to the role no_such_owner (DATABASE_MIGRATION_ROLE): role "no_such_owner" does not exist' in line
    )
    assert line.endswith("create the role, or correct DATABASE_MIGRATION_ROLE") and "GRANT" not in line
    assert service.tables() == set()


def test_sql_scripts_set_the_role_and_the_schema(service: Service, owner_roles: OwnerRoles) -> None:
    """`--sql` writes what an online run sets; the script, applied by hand as the login, gives the same schema."""
    env = {"DATABASE_SCHEMA": "tenant_a", "DATABASE_MIGRATION_ROLE": owner_roles.owner}
    result = service.alembic("upgrade", "head", "--sql", **env)
    assert succeeded(result)
    script = result.stdout
    order = [
        f'SET ROLE "{owner_roles.owner}";',
        'CREATE SCHEMA IF NOT EXISTS "tenant_a";',
        'SET search_path TO "tenant_a";',
        "CREATE TABLE tenant_a.alembic_version",
        "CREATE TABLE thing",
    ]
    assert [script.index(statement) for statement in order] == sorted(script.index(s) for s in order)

    async def apply() -> None:
        url = owner_roles.migrate_url
        connection = await asyncpg.connect(
            host=url.host, port=url.port, user=url.username, password=url.password, database=url.database
        )
        try:
            await connection.execute(script)
        finally:
            await connection.close()

    asyncio.run(apply())
    owners = owners_in(service, "tenant_a")
    assert {"thing", "alembic_version"} <= owners.keys() and set(owners.values()) == {owner_roles.owner}
    assert version_in(service, "tenant_a") == [("0001",)]
    # The online run agrees: nothing left to do.
    result = service.project.cli("upgrade", "head", env={"DATABASE_URL": url_string(owner_roles.migrate_url), **env})
    assert succeeded(result) and "Running upgrade" not in result.stderr


def test_through_pgbouncer_role_and_schema_stay_inside_the_migration(service: Service, owner_roles: OwnerRoles) -> None:
    """PgBouncer gives the next client the same server connection: SET LOCAL, so nothing stays on it."""
    with pgbouncer(service.server, owner_roles.migrate_url) as bouncer_url:
        env = {
            "DATABASE_URL": url_string(bouncer_url),
            "DATABASE_PGBOUNCER": "true",
            "DATABASE_SCHEMA": "tenant_a",
            "DATABASE_MIGRATION_ROLE": owner_roles.owner,
        }
        assert succeeded(service.project.cli("upgrade", "head", env=env))
        after = run_pgbouncer_client(bouncer_url)
    assert after == [(owner_roles.migrate_url.username, '"$user", public', "0")]
    owners = owners_in(service, "tenant_a")
    assert {"thing", "alembic_version"} <= owners.keys() and set(owners.values()) == {owner_roles.owner}


def run_pgbouncer_client(url: URL) -> list[tuple]:
    """Who a new client through PgBouncer is, its search_path and lock_timeout (no prepared statements)."""

    async def ask() -> list[tuple]:
        connection = await asyncpg.connect(
            host=url.host, port=url.port, user=url.username, password=url.password, database=url.database,
            statement_cache_size=0,
        )  # fmt: skip
        try:
            rows = await connection.fetch(
                "SELECT current_user::text, current_setting('search_path'), current_setting('lock_timeout')"
            )
            return [tuple(row) for row in rows]
        finally:
            await connection.close()

    return asyncio.run(ask())


def test_a_connection_handed_in_gets_its_role_and_search_path_back(
    service: Service, owner_roles: OwnerRoles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_SCHEMA", "tenant_a")
    monkeypatch.setenv("DATABASE_MIGRATION_ROLE", owner_roles.owner)
    who = text("SELECT current_user::text, current_setting('search_path')")
    with service.project.activated():
        migrate = service.project.module("migrate")

        async def startup() -> tuple[list[tuple], list[tuple]]:
            engine = service.project.engine(owner_roles.migrate_url)
            try:
                async with engine.connect() as connection:
                    before = [tuple(row) for row in await connection.execute(who)]
                    await connection.commit()
                    await migrate.upgrade_async(connection=connection)
                    return before, [tuple(row) for row in await connection.execute(who)]
            finally:
                await engine.dispose()

        before, after = asyncio.run(startup())
    assert before == after == [(owner_roles.migrate_url.username, '"$user", public')]
    assert set(owners_in(service, "tenant_a").values()) == {owner_roles.owner}


# --- readiness ---------------------------------------------------------------------------


def add_three_revisions(project: Project) -> None:
    project.add_thing()
    project.add_revision("0002", "0001", 'op.create_table("b", sa.Column("id", sa.Integer))', 'op.drop_table("b")')
    project.add_revision("0003", "0002", 'op.create_table("c", sa.Column("id", sa.Integer))', 'op.drop_table("c")')


@pytest.mark.parametrize(
    ("applied", "pending"),
    [
        pytest.param(None, ("0001", "0002", "0003"), id="empty-database"),
        pytest.param("0001", ("0002", "0003"), id="several-pending"),
        pytest.param("0002", ("0003",), id="one-pending"),
        pytest.param("0003", (), id="at-head"),
    ],
)
def test_readiness_says_what_is_pending(
    backend, backend_project: Project, monkeypatch: pytest.MonkeyPatch, applied: str | None, pending: tuple[str, ...]
) -> None:
    url = backend.create_database()
    env = {"DATABASE_URL": url_string(url)}
    add_three_revisions(backend_project)
    if applied:
        assert succeeded(backend_project.cli("upgrade", applied, env=env))
    # The CLI's answer, for a deploy step or a probe.
    check = backend_project.cli("current", "--check-heads", env=env)
    monkeypatch.setenv("DATABASE_URL", env["DATABASE_URL"])
    if pending:
        assert "Database is not on all head revisions" in failed_line(check)
    else:
        assert succeeded(check)
    with backend_project.activated():
        readiness = backend_project.module("readiness")
        status = readiness.migration_status()
        assert status.pending == pending and status.at_head == (not pending)
        assert status.current == ((applied,) if applied else ()) and status.heads == ("0003",)
        assert status.error is None and status.unknown == ()
        if pending:
            where = f"at {applied}" if applied else "empty (no revision applied)"
            assert str(status) == f"behind: {len(pending)} pending ({', '.join(pending)}); the database is {where}"
        else:
            assert str(status) == "at head (0003)"

        async def from_the_app() -> list:
            """The same answer from inside a running event loop: sync, async, and on a connection of the app."""
            answers = [readiness.migration_status(), await readiness.migration_status_async()]
            engine = backend_project.engine(url)
            try:
                async with engine.connect() as connection:
                    answers.append(await readiness.migration_status_async(connection=connection))
                    # It read, and left no transaction open on the app's connection.
                    assert not connection.in_transaction()
            finally:
                await engine.dispose()
            return answers

        assert asyncio.run(from_the_app()) == [status] * 3


def test_readiness_takes_no_lock_and_knows_each_tenant(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    add_more(service.project)
    assert succeeded(service.alembic("upgrade", "head", DATABASE_SCHEMA="tenant_a"))
    assert succeeded(service.alembic("upgrade", "0001", DATABASE_SCHEMA="tenant_b"))
    monkeypatch.setenv("DATABASE_URL", url_string(service.url))
    lock_of_a_migration = f"SELECT pg_advisory_lock({service.lock_key})"
    with service.project.activated():
        readiness = service.project.module("readiness")
        with service.server.holding(service.url.database, lock_of_a_migration):
            answers = {}
            for schema in ("tenant_a", "tenant_b", "tenant_c"):
                monkeypatch.setenv("DATABASE_SCHEMA", schema)
                answers[schema] = readiness.migration_status()
            monkeypatch.delenv("DATABASE_SCHEMA")
            answers["search_path"] = readiness.migration_status()
    assert answers["tenant_a"].at_head and answers["tenant_a"].current == ("0002_more",)
    assert answers["tenant_b"].pending == ("0002_more",) and answers["tenant_b"].current == ("0001",)
    # A tenant not migrated yet (its schema does not exist), and the search_path's schema: empty.
    for empty in ("tenant_c", "search_path"):
        assert answers[empty].current == () and answers[empty].pending == ("0001", "0002_more")
    assert service.query("SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_c'") == [(0,)]


def test_readiness_names_revisions_this_code_does_not_have(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """An older release, still serving after a newer one migrated: the database is not behind."""
    assert succeeded(service.alembic("upgrade", "head"))
    service.query("UPDATE alembic_version SET version_num = '9f3c2e1d0b7a'")
    monkeypatch.setenv("DATABASE_URL", url_string(service.url))
    with service.project.activated():
        status = service.project.module("readiness").migration_status()
    assert status.unknown == ("9f3c2e1d0b7a",) and status.pending == () and not status.at_head
    assert "9f3c2e1d0b7a, which migrations/ does not have" in str(status)


@pytest.mark.parametrize("database", ["postgresql", "mysql"])
def test_readiness_of_a_database_it_cannot_reach_is_an_answer(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = make_project(tmp_path, database=database)
    project.add_thing()
    port = free_port()
    monkeypatch.setenv("DATABASE_URL", url_string(URL.create(database, "app", SECRET, "127.0.0.1", port, "app")))
    # For migrations: a check does not wait.
    monkeypatch.setenv("DATABASE_WAIT", "10min")
    with project.activated():
        readiness = project.module("readiness")
        status = asyncio.run(asyncio.wait_for(readiness.migration_status_async(), timeout=60))
    assert not status.at_head and status.current == () and status.heads == ("0001",)
    assert status.error.startswith(f"cannot connect to the database at 127.0.0.1:{port}")
    assert str(status).startswith("cannot tell where the database is: cannot connect")
    assert_no_password(str(status), repr(status))
