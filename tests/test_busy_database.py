"""Migrations a busy PostgreSQL does not notice, each fault made for real on loopback.

One transaction per revision; short lock waits, retried with the revision rolled back in
between; a migration lock that a replica waits for holding no snapshot; no lock left
behind by a process that was stopped, or whose network went silent; the Python API under
concurrency and cancellation. README.md ("In production") promises what these check.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from pathlib import Path

import pytest
from alembic.util import CommandError

from rendering import failed_line
from servers import pgbouncer, silent_proxy, url_string
from service import Service, wait_for

# Fast retries for the tests: the schedule is the production one, squeezed.
QUICK = {"DATABASE_LOCK_TIMEOUT_FIRST": "50ms", "DATABASE_LOCK_TIMEOUT": "200ms"}


def reader(table: str = "thing") -> list[str]:
    """A report that has read `table` (and keeps its lock) until the `holding` block ends."""
    return [
        "SELECT set_config('application_name', 'monthly-report', false)",
        f"SELECT count(*) FROM {table} WHERE id <> 12345678",
    ]


# An open snapshot older than the next write: CREATE INDEX CONCURRENTLY waits for it.
OLD_SNAPSHOT = ["SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", "SELECT count(*) FROM thing"]


def add_colour(service: Service, revision: str = "0002_colour", down: str = "0001", table: str = "thing") -> Path:
    return service.add_revision(
        revision,
        down,
        f'op.add_column("{table}", sa.Column("colour", sa.String(20)))',
        downgrade=f'op.drop_column("{table}", "colour")',
    )


# --- one transaction per revision ----------------------------------------------------


def test_failure_half_way_keeps_the_revisions_before_it(service: Service) -> None:
    revision = service.add_revision(
        "0002_half",
        "0001",
        """
        op.create_table("half", sa.Column("id", sa.Integer))
        op.execute("INSERT INTO half VALUES (1)")
        op.execute("SELECT no_such_function()")
        """,
        downgrade='op.drop_table("half")',
    )
    line = failed_line(service.alembic("upgrade", "head"))
    assert "migrations/versions/0002_half.py failed" in line and "no_such_function" in line
    # The failing revision rolled back; 0001 committed before it and stays.
    assert "it rolled back; the database is at 0001" in line
    assert service.tables() == {"alembic_version", "thing"} and service.version() == [("0001",)]
    revision.write_text(revision.read_text().replace('op.execute("SELECT no_such_function()")', ""))
    assert service.alembic("upgrade", "head").returncode == 0
    assert {"thing", "half"} <= service.tables() and service.version() == [("0002_half",)]


def test_python_error_in_a_revision_is_one_line_naming_it(service: Service) -> None:
    service.add_revision("0002_typo", "0001", 'op.add_column("thing", sa.Column("x", sa.Strin(20)))')
    line = failed_line(service.alembic("upgrade", "head"))
    assert "0002_typo.py failed: AttributeError: module 'sqlalchemy' has no attribute 'Strin'" in line
    assert "the database is at 0001" in line and "--raiseerr" in line


def test_statement_timeout_stops_a_runaway_revision(service: Service) -> None:
    service.add_revision("0002_slow", "0001", 'op.execute("SELECT pg_sleep(10)")')
    line = failed_line(service.alembic("upgrade", "head", DATABASE_STATEMENT_TIMEOUT="500ms"))
    assert "0002_slow.py failed" in line and "statement timeout" in line and "the database is at 0001" in line
    assert service.version() == [("0001",)]


def test_connection_killed_mid_run_keeps_what_committed(service: Service, tmp_path: Path) -> None:
    service.add_revision(
        "0002_killed",
        "0001",
        """
        op.create_table("killed", sa.Column("id", sa.Integer))
        if os.environ.get("SLOW_MIGRATION"):
            op.execute("SELECT pg_sleep(60)")
        """,
    )
    log = tmp_path / "migration.log"
    migration = service.start("upgrade", "head", log=log, SLOW_MIGRATION="1")
    try:
        terminate = (
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'my-service-migrations' AND query LIKE '%pg_sleep%'"
        )
        wait_for(lambda: service.query(terminate), "the migration to reach pg_sleep")
        migration.wait(timeout=60)
    finally:
        migration.kill()
    assert migration.returncode != 0
    assert "0002_killed.py failed" in log.read_text()
    assert service.tables() == {"alembic_version", "thing"} and service.version() == [("0001",)]
    assert service.alembic("upgrade", "head").returncode == 0
    assert service.version() == [("0002_killed",)]


# --- what a revision does to its transaction: no faked success ---------------------------

# A run of 0001 (table "thing"), 0002_first, 0003_middle and 0004_last, one of which does
# something to the transaction it runs in. Each body creates table "early" before that, "late" after.
EARLY = 'op.create_table("early", sa.Column("id", sa.Integer))'
LATE = 'op.create_table("late", sa.Column("id", sa.Integer))'
CONCURRENT_INDEX = """
with op.get_context().autocommit_block():
    op.create_index("ix_thing_name", "thing", ["name"], postgresql_concurrently=True)
"""
TRANSACTION_ENDINGS = {
    # id: (the revision that does it, its upgrade body)
    "commit": ("0003_middle", f"{EARLY}\nop.get_bind().commit()\n{LATE}"),
    # Warehouse's way to CREATE INDEX CONCURRENTLY: autocommit_block() then finds no transaction.
    "commit-then-autocommit-block": ("0003_middle", f"{EARLY}\nop.get_bind().commit()\n{CONCURRENT_INDEX}\n{LATE}"),
    "commit-then-begin": ("0003_middle", f"{EARLY}\nop.get_bind().commit()\nop.get_bind().begin()\n{LATE}"),
    "commit-at-the-end-of-the-last-revision": ("0004_last", f"{EARLY}\n{LATE}\nop.get_bind().commit()"),
    "sql-commit": ("0003_middle", f'{EARLY}\nop.execute("COMMIT")\n{LATE}'),
    # Not an ending: a ROLLBACK to a savepoint keeps the transaction.
    "savepoint": (
        "0003_middle",
        f'{EARLY}\nop.execute("SAVEPOINT s")\nop.execute("ROLLBACK WORK TO SAVEPOINT s")\n{LATE}',
    ),
    # Fails on a direct connection (what it did is gone: it cannot be recorded as applied).
    "rollback": ("0003_middle", f"{EARLY}\nop.get_bind().rollback()\n{LATE}"),
}
PLAIN = {"0003_middle": 'op.create_table("middle", sa.Column("id", sa.Integer))', "0004_last": "pass"}


def ending_history(service: Service, where: str, body: str) -> str:
    """The run above with `body` in revision `where`; that revision's file."""
    service.add_revision("0002_first", "0001", 'op.create_table("first", sa.Column("id", sa.Integer))')
    for revision, down in (("0003_middle", "0002_first"), ("0004_last", "0003_middle")):
        service.add_revision(revision, down, body if revision == where else PLAIN[revision])
    return f"migrations/versions/{where}.py"


def last_logged(stderr: str) -> str:
    """The revision of the last `Running upgrade A -> B` line."""
    return [line.rpartition(" -> ")[2].split(",")[0] for line in stderr.splitlines() if "Running upgrade" in line][-1]


# After a COMMIT in SQL every statement commits on its own: the stock env cannot fake success there.
STOCK_TOO = pytest.mark.same_on_stock("each statement after a COMMIT in SQL commits on its own there too")


@pytest.mark.parametrize(
    "ending",
    [
        pytest.param(ending, marks=[STOCK_TOO] if ending in ("sql-commit", "savepoint") else [])
        for ending in TRANSACTION_ENDINGS
        if ending != "rollback"
    ],
)
def test_a_revision_that_ends_its_transaction_cannot_fake_success(service: Service, ending: str) -> None:
    """Whatever the revision does to its transaction, the run ends where its log says, and a
    second run finds nothing to do (instead of failing on "already exists")."""
    ending_history(service, *TRANSACTION_ENDINGS[ending])
    result = service.alembic("upgrade", "head")
    assert result.returncode == 0, result.stdout + result.stderr
    assert last_logged(result.stderr) == "0004_last" and service.version() == [("0004_last",)]
    assert {"first", "early", "late"} <= service.tables()
    if ending == "commit-then-autocommit-block":
        valid = service.query("SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_thing_name'::regclass")
        assert valid == [(True,)]
    again = service.alembic("upgrade", "head")
    assert again.returncode == 0 and "Running upgrade" not in again.stderr, again.stdout + again.stderr


FAILS = 'op.execute("SELECT no_such_function()")'
PERMANENT = "it had made part of its work permanent (autocommit_block() or a commit() of its own), which stays"
SQL_COMMITTED = "a COMMIT in its SQL had ended its transaction: what it did before that, and each statement after it"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(f"{EARLY}\nop.get_bind().commit()\n{LATE}\n{FAILS}", PERMANENT, id="commit-then-error"),
        pytest.param(f'{EARLY}\nop.execute("COMMIT")\n{LATE}\n{FAILS}', SQL_COMMITTED, id="sql-commit-then-error"),
        # Refused before it runs: Alembic would record the revision without what it threw away.
        pytest.param(
            f'{EARLY}\nop.execute("ROLLBACK")\n{LATE}', "a ROLLBACK in its SQL would throw away", id="sql-rollback"
        ),
        pytest.param(
            f'{EARLY}\nop.execute("/* undo */ rollback work")\n{LATE}',
            "a ROLLBACK in its SQL would throw away",
            id="sql-rollback-after-a-comment",
        ),
        # Alembic's transaction is open: SQLAlchemy refuses a second one.
        pytest.param(f"{EARLY}\nop.get_bind().begin()", "InvalidRequestError", id="begin"),
        # What it did is gone: recorded as applied, it would be a revision that is not there.
        pytest.param(TRANSACTION_ENDINGS["rollback"][1], "rolled back its own transaction", id="rollback"),
    ],
)
def test_a_revision_that_ends_its_transaction_then_fails_says_what_stays(
    service: Service, body: str, message: str
) -> None:
    """One FAILED line (no traceback) naming the revision, and where the database really is."""
    revision = ending_history(service, "0003_middle", body)
    line = failed_line(service.alembic("upgrade", "head"))
    assert revision in line and message in line
    assert "the database is at 0002_first" in line and service.version() == [("0002_first",)]
    # What it says stays is there; what it says rolled back is not.
    assert ("early" in service.tables()) is (message in (PERMANENT, SQL_COMMITTED))
    assert ("late" in service.tables()) is (message == SQL_COMMITTED)


@pytest.mark.parametrize("pgbouncer", [pytest.param("false", id="direct"), pytest.param("true", id="one-transaction")])
def test_a_failure_at_commit_says_it_rolled_back(service: Service, pgbouncer: str) -> None:
    """A deferred constraint fails at COMMIT, after Alembic recorded the version: nothing of it stays."""
    service.add_revision(
        "0002_child",
        "0001",
        """
        op.execute("CREATE TABLE child (parent_id integer REFERENCES thing (id) DEFERRABLE INITIALLY DEFERRED)")
        op.execute("INSERT INTO child VALUES (12345)")
        """,
    )
    line = failed_line(service.alembic("upgrade", "head", DATABASE_PGBOUNCER=pgbouncer))
    assert "violates foreign key constraint" in line and "made part of its work permanent" not in line
    assert ("the database is at 0001" if pgbouncer == "false" else "the database has no revision applied") in line
    assert "child" not in service.tables()


# --- short lock waits, retried -------------------------------------------------------


def test_lock_retries_wait_out_a_reader(service: Service, tmp_path: Path) -> None:
    assert service.alembic("upgrade", "head").returncode == 0
    # So that the migration role sees how long other roles' transactions have been open.
    service.server.execute(f'GRANT pg_read_all_stats TO "{service.url.username}"')
    add_colour(service)
    # The revision after it starts again from the first, shortest wait.
    service.add_revision(
        "0003_after",
        "0002_colour",
        """
        op.create_table("waits", sa.Column("lock_timeout", sa.Text))
        op.execute("INSERT INTO waits SELECT current_setting('lock_timeout')")
        """,
    )
    log = tmp_path / "migration.log"
    with service.server.holding(service.url.database, *reader()):
        migration = service.start("upgrade", "head", log=log, **QUICK)
        wait_for(lambda: log.read_text().count("retrying in") >= 2, "two retries")
    migration.wait(timeout=60)
    output = log.read_text()
    assert migration.returncode == 0, output
    assert service.columns("thing") == ["id", "name", "colour"]
    assert service.query("SELECT lock_timeout FROM waits") == [("50ms",)]
    retries = [line for line in output.splitlines() if "lock timeout in migrations/versions/0002_colour.py" in line]
    # One line per retry: revision, attempt, this attempt's timeout, who was in the way.
    assert "attempt 1 (lock_timeout 50ms)" in retries[0] and "attempt 2 (lock_timeout 88ms)" in retries[1]
    assert "blocked by pid" in retries[0] and "'monthly-report', transaction open" in retries[0]
    assert "retrying in" in retries[0]
    assert "12345678" not in output  # never a query's text: it may hold data


def test_a_reader_that_never_lets_go_makes_the_revision_give_up_within_its_budget(service: Service) -> None:
    assert service.alembic("upgrade", "head").returncode == 0
    add_colour(service)
    with service.server.holding(service.url.database, *reader()):
        result = service.alembic("upgrade", "head", DATABASE_LOCK_RETRY_BUDGET="2s", timeout=60, **QUICK)
        locked_after = service.locked_tables()
    line = failed_line(result)
    assert "migrations/versions/0002_colour.py failed" in line and "lock timeout" in line
    assert "attempts in" in line and "DATABASE_LOCK_RETRY_BUDGET is 2s" in line
    # Without pg_read_all_stats, other roles' sessions show no times: the line says how to see them.
    assert "blocked by pid" in line and "'monthly-report', transaction open for: grant pg_read_all_stats" in line
    assert "it rolled back; the database is at 0001" in line
    assert "12345678" not in result.stdout + result.stderr
    assert service.columns("thing") == ["id", "name"] and locked_after == set()
    assert service.alembic("upgrade", "head").returncode == 0


def test_retries_off_is_one_attempt_at_the_lock_timeout(service: Service) -> None:
    assert service.alembic("upgrade", "head").returncode == 0
    add_colour(service)
    with service.server.holding(service.url.database, *reader()):
        result = service.alembic(
            "upgrade", "head", DATABASE_LOCK_RETRY_BUDGET="0", DATABASE_LOCK_TIMEOUT="300ms", timeout=30
        )
    line = failed_line(result)
    assert "waited 300ms for a lock (DATABASE_LOCK_TIMEOUT)" in line and "'monthly-report'" in line
    assert "retrying" not in result.stderr
    assert service.version() == [("0001",)]


def test_a_waiting_revision_holds_no_lock_of_the_revisions_before_it(service: Service, tmp_path: Path) -> None:
    """Revision 2 altered `thing`; while revision 3 waits for `other`, `thing` is free."""
    service.add_revision("0002_other", "0001", 'op.create_table("other", sa.Column("id", sa.Integer))')
    assert service.alembic("upgrade", "head").returncode == 0
    add_colour(service, "0003_colour", "0002_other")
    service.add_revision("0004_other", "0003_colour", 'op.add_column("other", sa.Column("x", sa.Integer))')
    log = tmp_path / "migration.log"
    with service.server.holding(service.url.database, *reader(table="other")):
        migration = service.start("upgrade", "head", log=log, DATABASE_LOCK_RETRY_BUDGET="20s", **QUICK)
        try:
            wait_for(lambda: "lock timeout in migrations/versions/0004_other.py" in log.read_text(), "a retry")
            # The migration's sessions hold nothing on `thing` while they wait for `other`.
            assert "thing" not in service.locked_tables()
            assert service.version() == [("0003_colour",)]
        finally:
            migration.terminate()
            migration.wait(timeout=30)
    assert "colour" in service.columns("thing")


@pytest.mark.parametrize(
    ("start", "command", "expected"),
    [
        pytest.param("0001", ["upgrade", "+2"], "0003_c", id="upgrade-plus-2"),
        pytest.param("head", ["downgrade", "-2"], "0002_b", id="downgrade-minus-2"),
        pytest.param("0002_b", ["stamp", "0003_c"], "0003_c", id="stamp"),
    ],
)
def test_a_retry_does_not_overshoot_a_relative_target(
    service: Service, tmp_path: Path, start: str, command: list[str], expected: str
) -> None:
    """The second step waits and is retried; the run still ends where it would without that."""
    touch = 'op.execute("SELECT FROM thing LIMIT 1")'
    service.add_revision("0002_b", "0001", 'op.create_table("b", sa.Column("id", sa.Integer))', 'op.drop_table("b")')
    service.add_revision("0003_c", "0002_b", touch, touch)  # this step waits for `thing`
    service.add_revision("0004_d", "0003_c", 'op.create_table("d", sa.Column("id", sa.Integer))', 'op.drop_table("d")')
    assert service.alembic("upgrade", start).returncode == 0
    # A stamp only writes alembic_version: a lock that lets reads through makes it wait.
    holder = "LOCK TABLE alembic_version IN EXCLUSIVE MODE" if command[0] == "stamp" else "LOCK TABLE thing"
    log = tmp_path / "run.log"
    with service.server.holding(service.url.database, holder):
        migration = service.start(*command, log=log, **QUICK)
        wait_for(lambda: "retrying in" in log.read_text(), "a retry")
    migration.wait(timeout=60)
    assert migration.returncode == 0, log.read_text()
    assert service.version() == [(expected,)]


def two_at_once(service: Service, tmp_path: Path, *command: str) -> list[str]:
    """Two `alembic COMMAND` that both wait for the migration lock, then take turns: their
    outputs, the one that succeeded first (the other must have failed)."""
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    with service.server.holding(service.url.database, f"SELECT pg_advisory_lock({service.lock_key})"):
        runs = [service.start(*command, log=log) for log in logs]
        wait_for(lambda: all("waiting for the migration lock" in log.read_text() for log in logs), "both to wait")
    for run in runs:
        run.wait(timeout=60)
    outputs = sorted((log.read_text() for log in logs), key=lambda output: "FAILED" in output)
    assert [run.returncode == 0 for run in runs].count(True) == 1, outputs
    return outputs


def test_a_relative_target_is_not_taken_again_after_waiting_for_the_lock(service: Service, tmp_path: Path) -> None:
    """Two `downgrade -1` at once: one undoes the last revision; the other, having waited, does
    not undo one more (that would drop another revision's tables)."""
    for revision, down in (("0002", "0001"), ("0003", "0002")):
        service.add_revision(revision, down, f'op.create_table("t{revision}", sa.Column("id", sa.Integer))',
                             downgrade=f'op.drop_table("t{revision}")')  # fmt: skip
    assert service.alembic("upgrade", "head").returncode == 0
    outputs = two_at_once(service, tmp_path, "downgrade", "-1")
    assert "Running downgrade 0003 -> 0002" in outputs[0]
    assert "another migration moved the database from 0003 to 0002 while this one waited" in outputs[1]
    assert "-1 from there would be another revision, so nothing was done" in outputs[1]
    assert service.version() == [("0002",)] and "t0002" in service.tables()


def test_a_relative_target_on_an_empty_database_is_not_taken_again(service: Service, tmp_path: Path) -> None:
    """Two `upgrade +1` on a database without revisions: one applies 0001, the other does not apply 0002."""
    service.add_revision("0002", "0001", 'op.create_table("t0002", sa.Column("id", sa.Integer))')
    outputs = two_at_once(service, tmp_path, "upgrade", "+1")
    assert "another migration moved the database from base to 0001 while this one waited" in outputs[1]
    assert service.version() == [("0001",)] and "t0002" not in service.tables()


# --- the migration lock cannot deadlock ---------------------------------------------


def test_replica_arriving_during_create_index_concurrently_waits_then_finds_nothing(
    service: Service, tmp_path: Path
) -> None:
    """CREATE INDEX CONCURRENTLY waits for every older snapshot: a replica waiting for the
    migration lock must hold none, or the two deadlock."""
    service.add_revision(
        "0002_index",
        "0001",
        """
        with op.get_context().autocommit_block():
            op.create_index("ix_thing_name", "thing", ["name"], postgresql_concurrently=True)
        """,
        downgrade='op.drop_index("ix_thing_name", "thing")',
    )
    assert service.alembic("upgrade", "0001").returncode == 0
    logs = {name: tmp_path / f"{name}.log" for name in ("first", "second")}
    # An old snapshot keeps the index build of the first replica waiting for a while.
    with service.server.holding(service.url.database, *OLD_SNAPSHOT):
        service.query("INSERT INTO thing (id, name) VALUES (1, 'newer than the snapshot')")
        first = service.start(
            "upgrade", "head", log=logs["first"], DATABASE_LOCK_TIMEOUT="30s", DATABASE_LOCK_RETRY_BUDGET="0"
        )
        building = (
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'CREATE INDEX CONCURRENTLY%'"
            " AND wait_event_type = 'Lock'"
        )
        wait_for(lambda: service.query(building) == [(1,)], "the index build to wait for the old snapshot")
        second = service.start("upgrade", "head", log=logs["second"])
        wait_for(lambda: "waiting for the migration lock" in logs["second"].read_text(), "the second replica")
        # The second replica waits outside the server: no session of the migration but the
        # index build sits in a lock wait (where it would keep a snapshot the build waits for).
        waiting = [query for _, _, wait, query in service.migration_backends() if wait == "Lock"]
        assert len(waiting) == 1 and waiting[0].startswith("CREATE INDEX CONCURRENTLY"), waiting
        dba = service.alembic("current", timeout=30)  # a DBA's look does not wait either
    for replica in (first, second):
        replica.wait(timeout=60)
    outputs = {name: log.read_text() for name, log in logs.items()}
    assert first.returncode == 0 and second.returncode == 0, outputs
    assert dba.returncode == 0 and "0001" in dba.stdout
    assert "Running upgrade" not in outputs["second"]
    assert service.query("SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_thing_name'::regclass") == [(True,)]


# --- autocommit_block(): what stays when it fails --------------------------------------


def index_revision(service: Service, then: str = "") -> Path:
    return service.add_revision(
        "0002_index",
        "0001",
        f"""
        op.create_table("before_the_block", sa.Column("id", sa.Integer))
        with op.get_context().autocommit_block():
            op.create_index("ix_thing_name", "thing", ["name"], postgresql_concurrently=True)
        {then}
        """,
        downgrade='op.drop_index("ix_thing_name", "thing")\nop.drop_table("before_the_block")',
    )


@pytest.mark.same_on_stock("the stock env sets no lock_timeout: its index builds wait as long as they must")
def test_index_build_waits_for_older_transactions_without_failing(service: Service, tmp_path: Path) -> None:
    """CREATE INDEX CONCURRENTLY waits for every older snapshot (a backup, a long report) and
    makes no query of the application wait meanwhile: it gets the whole retry budget in one
    wait, rather than short ones that would throw the build away each time."""
    service.add_revision(
        "0002_index",
        "0001",
        """
        with op.get_context().autocommit_block():
            op.create_index("ix_thing_name", "thing", ["name"], postgresql_concurrently=True)
        """,
    )
    assert service.alembic("upgrade", "0001").returncode == 0
    log = tmp_path / "migration.log"
    waiting = (
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'CREATE INDEX CONCURRENTLY%'"
        " AND wait_event_type = 'Lock'"
    )
    with service.server.holding(service.url.database, *OLD_SNAPSHOT):
        service.query("INSERT INTO thing (id, name) VALUES (1, 'newer than the snapshot')")
        migration = service.start("upgrade", "head", log=log, **QUICK)
        wait_for(lambda: service.query(waiting) == [(1,)], "the index build to wait for the old snapshot")
        time.sleep(1)  # longer than any short lock wait (QUICK: at most 200ms)
        # Meanwhile the application reads and writes the table.
        service.query("INSERT INTO thing (id, name) VALUES (2, 'written while the index is built')")
    migration.wait(timeout=60)
    output = log.read_text()
    assert migration.returncode == 0, output
    assert "retrying" not in output
    assert service.query("SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_thing_name'::regclass") == [(True,)]


@pytest.mark.parametrize(
    ("reads", "in_the_way", "index"),
    [
        # A report that read the table: it holds a lock on it, which the drop waits for too.
        pytest.param("thing", "blocked by pid", "left the INVALID index public.ix_thing_name, which", id="a-report"),
        # A backup: a snapshot that holds no lock on the table; the INVALID index can go.
        pytest.param("pg_class", "waiting for older transactions: pid", "public.ix_thing_name that", id="a-backup"),
    ],
)
def test_index_build_that_gives_up_says_why_and_the_next_run_builds_it(
    service: Service, reads: str, in_the_way: str, index: str
) -> None:
    service.add_revision(
        "0002_index",
        "0001",
        """
        with op.get_context().autocommit_block():
            op.create_index("ix_thing_name", "thing", ["name"], postgresql_concurrently=True)
        """,
    )
    assert service.alembic("upgrade", "0001").returncode == 0
    # So that the migration role sees the other roles' sessions.
    service.server.execute(f'GRANT pg_read_all_stats TO "{service.url.username}"')
    old_snapshot = ["SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", f"SELECT count(*) FROM {reads}"]
    with service.server.holding(service.url.database, *old_snapshot):
        service.query("INSERT INTO thing (id, name) VALUES (1, 'newer than the snapshot')")
        result = service.alembic("upgrade", "head", DATABASE_LOCK_RETRY_BUDGET="1s", timeout=60, **QUICK)
    line = failed_line(result)
    assert "0002_index.py failed" in line and in_the_way in line and index in line
    assert "the database is at 0001" in line
    # Running it again (the snapshot is gone now) drops any leftover and builds the index.
    result = service.alembic("upgrade", "head")
    assert result.returncode == 0, result.stdout + result.stderr
    assert service.query("SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_thing_name'::regclass") == [(True,)]


def test_failure_after_an_autocommit_block_says_what_stays(service: Service) -> None:
    index_revision(service, then='op.execute("SELECT no_such_function()")')
    line = failed_line(service.alembic("upgrade", "head"))
    assert "0002_index.py failed" in line and "no_such_function" in line
    assert "made part of its work permanent (autocommit_block() or a commit() of its own), which stays" in line
    assert "the database is at 0001" in line and "rolled back, the schema is as it was" not in line
    # What it says is what is there: the table and the index from before and inside the block.
    assert "before_the_block" in service.tables()
    assert service.query("SELECT count(*) FROM pg_indexes WHERE indexname = 'ix_thing_name'") == [(1,)]


# --- no orphaned locks -------------------------------------------------------------


def slow_revision(service: Service) -> None:
    service.add_revision(
        "0002_slow",
        "0001",
        """
        op.add_column("thing", sa.Column("colour", sa.String(20)))
        op.execute("SELECT pg_sleep(60)")
        """,
    )


def test_sigterm_cancels_the_statement_and_releases_every_lock(service: Service, tmp_path: Path) -> None:
    slow_revision(service)
    log = tmp_path / "migration.log"
    migration = service.start("upgrade", "head", log=log)
    sleeping = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'"
    wait_for(lambda: service.query(sleeping) == [(1,)], "the migration to reach pg_sleep")
    assert "thing" in service.locked_tables()
    migration.send_signal(signal.SIGTERM)  # what Docker and Kubernetes send
    migration.wait(timeout=15)
    assert migration.returncode != 0
    assert "FAILED: stopped by SIGTERM" in log.read_text()
    # Nothing of the migration is left in the server: no backend, no lock.
    wait_for(lambda: not service.migration_backends(), "the migration's backends to end", timeout=10)
    assert service.locked_tables() == set() and service.version() == [("0001",)]
    assert service.columns("thing") == ["id", "name"]


def test_ctrl_c_is_one_line_too(service: Service, tmp_path: Path) -> None:
    slow_revision(service)
    log = tmp_path / "migration.log"
    migration = service.start("upgrade", "head", log=log)
    sleeping = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'"
    wait_for(lambda: service.query(sleeping) == [(1,)], "the migration to reach pg_sleep")
    migration.send_signal(signal.SIGINT)
    migration.wait(timeout=15)
    output = log.read_text()
    assert migration.returncode != 0 and "FAILED: stopped by Ctrl-C" in output and "Traceback" not in output
    wait_for(lambda: not service.migration_backends(), "the migration's backends to end", timeout=10)
    assert service.locked_tables() == set() and service.version() == [("0001",)]


def test_sigterm_during_create_index_concurrently(service: Service, tmp_path: Path) -> None:
    """Stopped while the index build waits: one line, and the next run builds the index."""
    service.add_revision(
        "0002_index",
        "0001",
        """
        with op.get_context().autocommit_block():
            op.create_index("ix_thing_name", "thing", ["name"], postgresql_concurrently=True)
        """,
    )
    assert service.alembic("upgrade", "0001").returncode == 0
    log = tmp_path / "migration.log"
    building = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'CREATE INDEX CONCURRENTLY%'"
    with service.server.holding(service.url.database, *OLD_SNAPSHOT):
        service.query("INSERT INTO thing (id, name) VALUES (1, 'newer than the snapshot')")
        migration = service.start("upgrade", "head", log=log, DATABASE_LOCK_TIMEOUT="1min")
        wait_for(lambda: service.query(building) == [(1,)], "the index build")
        migration.send_signal(signal.SIGTERM)
        migration.wait(timeout=15)
    output = log.read_text()
    assert "FAILED: stopped by SIGTERM" in output and "Traceback" not in output, output
    result = service.alembic("upgrade", "head")
    assert result.returncode == 0, result.stdout + result.stderr
    assert service.query("SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_thing_name'::regclass") == [(True,)]


def test_a_client_killed_during_a_long_statement_leaves_no_locks(service: Service, tmp_path: Path) -> None:
    """SIGKILL cannot be caught: the server notices the client is gone (client_connection_check_interval)."""
    if int(service.server.execute("SHOW server_version_num")[0][0]) < 140000:
        pytest.skip("client_connection_check_interval needs PostgreSQL 14")
    slow_revision(service)
    migration = service.start("upgrade", "head", log=tmp_path / "migration.log")
    sleeping = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'"
    wait_for(lambda: service.query(sleeping) == [(1,)], "the migration to reach pg_sleep")
    migration.kill()
    migration.wait(timeout=15)
    wait_for(lambda: "thing" not in service.locked_tables(), "the server to release the lock", timeout=20)
    assert service.version() == [("0001",)]


def test_a_client_whose_network_goes_silent_leaves_no_locks(service: Service, tmp_path: Path) -> None:
    """Mid-revision the link goes dead: the backend, idle in its transaction, is ended."""
    service.add_revision(
        "0002_pause",
        "0001",
        """
        op.add_column("thing", sa.Column("colour", sa.String(20)))
        while not os.path.exists(os.environ["GO_ON"]):
            time.sleep(0.05)
        op.execute("SELECT 1")
        """,
    )
    revision = service.project.path / "migrations" / "versions" / "0002_pause.py"
    revision.write_text(revision.read_text().replace("import os\n", "import os\nimport time\n"))
    go_on = tmp_path / "go-on"
    with silent_proxy(service.url.port) as proxy:
        migration = service.start(
            "upgrade",
            "head",
            log=tmp_path / "migration.log",
            DATABASE_URL=url_string(service.url.set(port=proxy.port)),
            DATABASE_IDLE_IN_TRANSACTION_TIMEOUT="2s",
            GO_ON=str(go_on),
        )
        try:
            idle = "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"
            wait_for(lambda: "thing" in service.locked_tables(), "the migration to lock thing")
            proxy.silence()
            go_on.touch()  # the next statement goes nowhere
            wait_for(lambda: service.query(idle) == [(1,)], "the backend to wait for its client")
            wait_for(lambda: "thing" not in service.locked_tables(), "the server to end the backend", timeout=20)
        finally:
            migration.kill()
            migration.wait(timeout=15)
    assert service.version() == [("0001",)] and service.columns("thing") == ["id", "name"]


def test_the_session_limits(service: Service) -> None:
    """What the migration's session runs under (README.md, "In production")."""
    names = [
        "lock_timeout",
        "statement_timeout",
        "idle_in_transaction_session_timeout",
        "tcp_keepalives_idle",
        "tcp_keepalives_interval",
        "tcp_keepalives_count",
        "application_name",
    ]
    service.add_revision(
        "0002_limits",
        "0001",
        f"""
        op.create_table("limits", sa.Column("name", sa.Text), sa.Column("value", sa.Text))
        for name in {names!r}:
            op.execute(f"INSERT INTO limits SELECT '{{name}}', current_setting('{{name}}')")
        """,
    )
    assert service.alembic("upgrade", "head").returncode == 0
    assert dict(service.query("SELECT name, value FROM limits")) == {
        "lock_timeout": "100ms",
        "statement_timeout": "0",
        "idle_in_transaction_session_timeout": "1min",
        "tcp_keepalives_idle": "10",
        "tcp_keepalives_interval": "5",
        "tcp_keepalives_count": "3",
        "application_name": "my-service-migrations",
    }


# --- PgBouncer: one transaction per run ---------------------------------------------------


def test_a_pooler_without_pgbouncer_mode_is_refused_before_anything_is_set(service: Service) -> None:
    """Session settings and the session lock would stay on the pooler's server connection,
    for its other clients (the application's lock_timeout, say)."""
    with pgbouncer(service.server, service.url) as bouncer_url:
        line = failed_line(service.alembic("upgrade", "head", DATABASE_URL=url_string(bouncer_url)))
        assert "goes through a pooler" in line and "set DATABASE_PGBOUNCER=true" in line
        assert service.tables() == set()
        # The pooler's next client finds the server connection as it was.
        check = "SELECT current_setting('lock_timeout'), current_setting('application_name')"
        assert service.server.execute(check, database=service.url.database) == [("0", "")]


def test_pgbouncer_mode_retries_the_whole_run(service: Service, tmp_path: Path) -> None:
    assert service.alembic("upgrade", "head").returncode == 0
    add_colour(service)
    service.add_revision("0003_more", "0002_colour", 'op.create_table("more", sa.Column("id", sa.Integer))')
    with pgbouncer(service.server, service.url) as bouncer_url:
        through = {"DATABASE_URL": url_string(bouncer_url), "DATABASE_PGBOUNCER": "true", **QUICK}
        log = tmp_path / "upgrade.log"
        with service.server.holding(service.url.database, *reader()):
            migration = service.start("upgrade", "head", log=log, **through)
            wait_for(lambda: "retrying in" in log.read_text(), "a retry")
        migration.wait(timeout=60)
        assert migration.returncode == 0, log.read_text()
        assert "lock timeout in migrations/versions/0002_colour.py" in log.read_text()
        with service.server.holding(service.url.database, *reader()):
            failed = service.alembic("downgrade", "0001", DATABASE_LOCK_RETRY_BUDGET="1s", timeout=60, **through)
    assert service.version() == [("0003_more",)] and "more" in service.tables()
    line = failed_line(failed)
    # The downgrade of 0003 ran first, then 0002's waited: one transaction, all rolled back.
    assert "0002_colour.py failed" in line and "the whole run rolled back" in line
    assert "the database is at 0003_more" in line


def test_one_transaction_retries_are_bounded_by_one_budget(service: Service) -> None:
    """In one transaction every attempt runs the whole run again: revisions blocked in turn
    (a report that reads one table, then the other) must not reset the budget."""
    service.add_revision("0002_other", "0001", 'op.create_table("other", sa.Column("id", sa.Integer))')
    assert service.alembic("upgrade", "head").returncode == 0
    add_colour(service, "0003_colour", "0002_other")
    service.add_revision("0004_other", "0003_colour", 'op.add_column("other", sa.Column("x", sa.Integer))')
    stop = threading.Event()

    def report_in_turns() -> None:
        """Always one of the two tables read: the next read begins before the last one ends."""
        last = contextlib.ExitStack()
        while not stop.is_set():
            for table in ("other", "thing"):
                holding = contextlib.ExitStack()
                holding.enter_context(service.server.holding(service.url.database, f"SELECT * FROM {table}"))
                last.close()
                last = holding
                stop.wait(0.9)
        last.close()

    reader = threading.Thread(target=report_in_turns, daemon=True)
    reader.start()
    try:
        # Without a bound the run would retry until the subprocess times out.
        result = service.alembic(
            "upgrade", "head", DATABASE_PGBOUNCER="true", DATABASE_LOCK_RETRY_BUDGET="3s", timeout=60, **QUICK
        )
    finally:
        stop.set()
        reader.join(10)
    line = failed_line(result)
    assert "DATABASE_LOCK_RETRY_BUDGET is 3s" in line and "the whole run rolled back" in line
    assert service.version() == [("0002_other",)]


@pytest.mark.parametrize(
    ("ending", "line_says", "version", "made"),
    [
        pytest.param("commit", "the database is at 0002_first", "0002_first", {"first", "early"}, id="commit"),
        pytest.param(
            "commit-at-the-end-of-the-last-revision",
            "the database is at 0003_middle",
            "0003_middle",
            {"first", "middle", "early", "late"},
            id="commit-at-the-end-of-the-last-revision",
        ),
        pytest.param("rollback", "the database has no revision applied", None, set(), id="rollback"),
        # After a COMMIT in SQL each statement commits on its own, the version row included.
        pytest.param(
            "sql-commit",
            "`alembic current` shows where the database is",
            "0003_middle",
            {"first", "early", "late"},
            id="sql-commit",
        ),
    ],
)
def test_pgbouncer_mode_a_revision_that_ends_the_one_transaction_fails_naming_it(
    service: Service, ending: str, line_says: str, version: str | None, made: set[str]
) -> None:
    """The migration lock and the SET LOCAL limits end with the run's one transaction: the run
    stops with one FAILED line naming the revision, and the database is where the line says."""
    revision = ending_history(service, *TRANSACTION_ENDINGS[ending])
    with pgbouncer(service.server, service.url) as bouncer_url:
        result = service.alembic("upgrade", "head", DATABASE_URL=url_string(bouncer_url), DATABASE_PGBOUNCER="true")
    line = failed_line(result)
    assert f"{revision} ended the one transaction that the whole run shares" in line and line_says in line
    assert service.version() == ([(version,)] if version else [])
    assert service.tables() - {"alembic_version", "thing"} == made


# --- the Python API under concurrency --------------------------------------------------


def test_concurrent_upgrade_async_calls_take_turns(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", url_string(service.url))
    add_colour(service)
    with service.project.activated():
        migrate = service.project.module("migrate")

        async def three_at_once() -> None:
            await asyncio.gather(*(migrate.upgrade_async() for _ in range(3)))

        asyncio.run(three_at_once())
    assert service.version() == [("0002_colour",)]


@pytest.mark.same_on_stock("the stock env.py installs no SIGTERM handler of its own")
def test_upgrade_leaves_the_applications_sigterm_handler_alone(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """upgrade() from sync code stops on SIGTERM while it runs, then hands SIGTERM back to the app."""
    monkeypatch.setenv("DATABASE_URL", url_string(service.url))

    def graceful_shutdown(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, graceful_shutdown)
    try:
        with service.project.activated():
            service.project.module("migrate").upgrade()
        assert signal.getsignal(signal.SIGTERM) is graceful_shutdown
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert service.version() == [("0001",)]


def test_cancelling_upgrade_async_cancels_the_migration(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", url_string(service.url))
    slow_revision(service)
    with service.project.activated():
        migrate = service.project.module("migrate")

        async def startup_cancelled() -> None:
            task = asyncio.create_task(migrate.upgrade_async())
            sleeping = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'"
            for _ in range(600):  # 30 s at most; a migration that failed at once ends the wait
                if task.done() or await asyncio.to_thread(service.query, sleeping) == [(1,)]:
                    break
                await asyncio.sleep(0.05)
            assert not task.done(), "the migration ended before it reached pg_sleep"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(startup_cancelled())
    wait_for(lambda: not service.migration_backends(), "the migration's backend to end", timeout=10)
    assert service.version() == [("0001",)] and service.locked_tables() == set()


def test_a_revision_that_commits_the_callers_transaction_fails_naming_it(service: Service) -> None:
    """upgrade_async(connection=...) inside the caller's transaction runs in that one transaction."""
    revision = ending_history(service, *TRANSACTION_ENDINGS["commit"])
    with service.project.activated():
        migrate = service.project.module("migrate")

        async def in_a_transaction() -> None:
            engine = service.project.engine(service.url)
            try:
                async with engine.connect() as connection, connection.begin():
                    await migrate.upgrade_async(connection=connection)
            finally:
                await engine.dispose()

        with pytest.raises(CommandError) as failed:
            asyncio.run(in_a_transaction())
    message = str(failed.value)
    assert f"{revision} ended the one transaction that the whole run shares (a commit() of its own)" in message
    assert "the database is at 0002_first" in message and service.version() == [("0002_first",)]
