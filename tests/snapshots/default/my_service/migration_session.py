"""How migrations run on PostgreSQL without disturbing a busy database.

migrations/env.py runs every online command through MigrationSession.run(). Read
top-down, this is what happens:

1. Role, schema and limits. With DATABASE_MIGRATION_ROLE the session switches to
   that role (SET ROLE), which then owns everything the migrations create,
   alembic_version included. With DATABASE_SCHEMA its search_path is that schema
   alone: the tables and alembic_version go there, and autogenerate compares the
   models with that schema and no other. The session gets statement_timeout,
   idle_in_transaction_session_timeout and (PostgreSQL 14+)
   client_connection_check_interval, so that neither a runaway statement nor a client
   that went away keeps tables locked.
2. The migration lock, taken once there is something to migrate: `current`, `check`
   or an `upgrade` with nothing to do never wait for it. A replica waits for it by
   polling pg_try_advisory_lock outside any transaction, so that it holds no
   snapshot, which a CREATE INDEX CONCURRENTLY in the replica that migrates would
   wait for (the two would deadlock). There is one lock per schema: tenants in
   schemas of their own migrate at the same time. A missing schema is created
   under the lock, before Alembic creates alembic_version in it.
3. One transaction per revision: a revision's table locks end when it commits.
4. Lock retries. Each attempt of a revision waits at most a short lock_timeout, so
   that the application's queries never queue behind it for long. A lock timeout
   rolls the revision back, so that no lock is held while the session sleeps, then
   the revision runs again with a longer timeout, until its retry budget is spent.
5. Release: the lock, and the settings (role and search_path included) of a
   connection that was handed in.

Through PgBouncer in transaction mode, or on a caller's connection that is inside a
transaction, all of it happens in that one transaction: a transaction-level lock,
SET LOCAL role, search_path and limits, and every attempt of the whole run inside a
savepoint.
"""

from __future__ import annotations

import ast
import asyncio
import logging
import random
import re
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from types import CodeType
from typing import Any

from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationInfo
from alembic.util import CommandError
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from .database import AFTER_A_FAILED_REVISION, driver_message, sqlstate
from .migrate import Revisions
from .settings import DatabaseSettings
from .settings_base import env_var, milliseconds, readable

log = logging.getLogger(__name__)

# One key per project (advisory locks belong to one database): replicas of this service
# wait for each other, other services' migrations in the same database do not. With
# DATABASE_SCHEMA, one key per schema (migration_lock_key()).
MIGRATION_LOCK_KEY = zlib.crc32(b"my_service:alembic")
# GitLab's with_lock_retries in spirit: per attempt of a revision, how far its
# lock_timeout has grown from lock_timeout_first (0) to lock_timeout (1), and how many
# seconds to sleep, holding no lock, after it timed out. The last row repeats until
# the revision's lock_retry_budget is spent. Sleeps vary by +-25 %, so that replicas
# do not retry in step.
LOCK_RETRY_SCHEDULE = [
    (0.0, 0.2),
    (0.25, 0.3),
    (0.5, 0.5),
    (0.75, 0.7),
    (1.0, 1.0),
]
# Failures that only mean "another transaction was in the way": the attempt rolled
# back, and running it again is safe.
LOCK_WAIT_FAILURES = {"55P03": "lock timeout", "40P01": "deadlock"}
DUPLICATE_TABLE = "42P07"
# Alembic's name for it, which env.py keeps.
VERSION_TABLE = "alembic_version"
# Who is in the way of a statement that timed out waiting: the sessions holding locks on the
# tables it names, else (a CREATE INDEX CONCURRENTLY waits for older transactions) the
# sessions with the oldest snapshots. Never their queries: those may hold data.
# The tables a statement names are those of its schemas, or else of the search_path: another
# tenant's table of the same name (DATABASE_SCHEMA), or another database's, is not in the way.
BLOCKERS = text(
    "SELECT DISTINCT a.pid, a.application_name, extract(epoch FROM now() - a.xact_start)::float8"
    " FROM pg_locks l JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace"
    " JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.granted AND l.pid <> pg_backend_pid() AND c.relname = ANY(:names)"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND (n.nspname = ANY(:names) OR n.nspname = ANY(current_schemas(false)))"
    " ORDER BY 3 DESC NULLS LAST LIMIT 3"
)
OLD_SNAPSHOTS = text(
    "SELECT pid, application_name, extract(epoch FROM now() - xact_start)::float8 FROM pg_stat_activity"
    " WHERE backend_xmin IS NOT NULL AND pid <> pg_backend_pid() AND datname = current_database()"
    " ORDER BY age(backend_xmin) DESC LIMIT 3"
)
# SET ROLE to a role the login is not a member of (one that does not exist: 22023).
INSUFFICIENT_PRIVILEGE = "42501"
# How often a server checks that the client of a running statement is still there.
CLIENT_CHECK_INTERVAL = "5s"


class _LockFirst(Exception):
    """There is something to migrate: take the migration lock, then plan from the heads read then."""


class MigrationSession:
    """One online Alembic command on `connection`, run as the module docstring says."""

    def __init__(
        self, context: EnvironmentContext, connection: Connection, settings: DatabaseSettings, **options: Any
    ) -> None:
        self.context, self.connection, self.settings, self.options = context, connection, settings, options
        self.lock_key = migration_lock_key(settings)
        # PgBouncer keeps a client on one server connection only for a transaction.
        self.own_transaction = settings.pgbouncer and not connection.in_transaction()
        self.one_transaction = settings.pgbouncer or connection.in_transaction()
        self.callers_transaction = connection.get_transaction()
        self.locked = False
        self.retrying: tuple[str | None, int, float] = (None, 0, 0.0)  # revision, attempt, first began
        # The session's lock_timeout as last set (None: a rollback may have undone that).
        self.session_lock_timeout: timedelta | None = self._attempt_timeout(1)

    def run(self) -> None:
        """Run the command's revisions: limits, lock, a transaction per revision, retries, release."""
        if self.own_transaction:
            self.connection.begin()
        previous = self._set_limits()
        try:
            revisions = Revisions(self.context, self.connection, **self.options)
            revisions.before_step = self._before_step
            revisions.server_in_transaction = in_server_transaction
            changes = not self.context.get_context().opts.get("dont_mutate")
            self._check_schema()
            if changes and not self._version_table_exists():
                # Alembic creates it before the first revision: only one replica may. A relative
                # target (+1) counts from no revision, even if another replica migrates meanwhile.
                revisions.planned_from = ()
                self._take_lock()
                self._create_schema(revisions)
            self._run_with_retries(revisions)
            if self.own_transaction:
                try:
                    self.connection.commit()
                except DBAPIError as exc:
                    # A deferred constraint, say: checked at COMMIT, after the last revision.
                    outcome = self._outcome(revisions, [], [])
                    raise CommandError(
                        f"the run failed at its commit: {driver_message(exc)}; {outcome};"
                        f" {revisions.position(revisions.start_heads)}"
                    ) from exc
        finally:
            self._release(previous)

    # --- 1. role, schema and limits ----------------------------------------------------

    def _limits(self) -> dict[str, str]:
        limits = {}
        if self.settings.schema_name is not None:
            limits["search_path"] = quoted(self.settings.schema_name)
        limits |= {
            "application_name": self.settings.application_name,
            "lock_timeout": milliseconds(self._attempt_timeout(1)),
            "statement_timeout": milliseconds(self.settings.statement_timeout),
            "idle_in_transaction_session_timeout": milliseconds(self.settings.idle_in_transaction_timeout),
        }
        if (self.connection.dialect.server_version_info or (0,)) >= (14,):
            limits["client_connection_check_interval"] = CLIENT_CHECK_INTERVAL
        # A client that vanished while its session sat idle (holding the migration lock,
        # between two retries) is noticed by TCP keepalives: after about 25 s, not 2 hours.
        limits |= {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3"}
        return limits

    def _set_limits(self) -> dict[str, str]:
        """Set the role and the limits (with SET, which PgBouncer passes on); return what they replace."""
        role, limits = self.settings.migration_role, self._limits()
        names = ["role", *limits] if role is not None else list(limits)
        backend, *current = self._select(
            "pg_backend_pid()", *(f"current_setting('{name}')" for name in names)
        )
        if (
            not self.settings.pgbouncer
            and backend != self.connection.connection.driver_connection.get_server_pid()
        ):
            # The server process is not the one the connection was opened to: a pooler in
            # between, which hands each transaction to any server connection, where the
            # session's settings and lock would stay for its other clients.
            self._end_setup_transaction()
            raise CommandError(
                "this connection goes through a pooler (PgBouncer?), which may hand each transaction"
                f" to another server connection: set {env_var('pgbouncer')}=true, so that the migration"
                " runs in one transaction and leaves no settings or lock behind"
            )
        previous = dict(zip(names, current, strict=True))
        if role is not None:
            self._switch_role(role)
        self._set_config(limits)
        self._end_setup_transaction()
        return previous

    def _switch_role(self, role: str) -> None:
        """SET ROLE: the role that owns what the migrations create."""
        try:
            self._set_config({"role": role})
        except DBAPIError as exc:
            if not self.one_transaction:
                self.connection.rollback()
            login = quoted(self.settings.async_url().username or "")
            fix = f"create the role, or correct {env_var('migration_role')}"
            if sqlstate(exc) == INSUFFICIENT_PRIVILEGE:
                fix = f"the login role needs to be a member of it: GRANT {quoted(role)} TO {login}"
            raise CommandError(
                f"cannot switch to the role {role} ({env_var('migration_role')}):"
                f" {driver_message(exc)}; {fix}"
            ) from exc

    def _check_schema(self) -> None:
        """An existing schema that the role may not use: say so, rather than let the first
        query that reads alembic_version fail."""
        schema = self.settings.schema_name
        if schema is None:
            return
        usable = text(
            "SELECT to_regnamespace(:name) IS NULL OR has_schema_privilege(to_regnamespace(:name), 'USAGE')"
        )
        if self.connection.execute(usable, {"name": quoted(schema)}).scalar():
            self._end_setup_transaction()
            return
        self._end_setup_transaction()
        owner = quoted(self.settings.migration_role or self.settings.async_url().username or "")
        raise CommandError(
            f"the role that migrates may not use the schema {schema} ({env_var('schema')}):"
            f" GRANT USAGE, CREATE ON SCHEMA {quoted(schema)} TO {owner}"
        )

    def _create_schema(self, revisions: Revisions) -> None:
        """Create the schema if it is missing, for a command that applies revisions (an
        upgrade, a stamp): `current` changes nothing, and a downgrade has nothing to undo there."""
        schema = self.settings.schema_name
        if schema is None:
            return
        exists = text("SELECT to_regnamespace(:name) IS NOT NULL")
        if self.connection.execute(exists, {"name": quoted(schema)}).scalar():
            self._end_setup_transaction()
            return
        self._end_setup_transaction()
        if not revisions.applies_any():
            raise CommandError(
                f"the schema {schema} ({env_var('schema')}) does not exist (a typo?): only a command that"
                " applies revisions creates it, and this one applies none"
            )
        try:
            # As the migration role, which owns it then. Not CREATE SCHEMA IF NOT EXISTS on
            # every run: it needs the CREATE privilege on the database even when the schema exists.
            self.connection.exec_driver_sql(f"CREATE SCHEMA {quoted(schema)}")
        except DBAPIError as exc:
            url = self.settings.async_url()
            owner = quoted(self.settings.migration_role or url.username or "")
            database = quoted(url.database or "")
            raise CommandError(
                f"cannot create the schema {schema} ({env_var('schema')}): {driver_message(exc)}; create it"
                f" for the role that migrates (CREATE SCHEMA {quoted(schema)} AUTHORIZATION {owner}), or let"
                f" that role create schemas (GRANT CREATE ON DATABASE {database} TO {owner})"
            ) from exc
        self._end_setup_transaction()

    def _set_config(self, values: dict[str, str], *, local: bool = False) -> None:
        """SET the values for the session (for the transaction, with `local` or in one transaction)."""
        scope = "true" if local or self.one_transaction else "false"
        calls = [f"set_config('{name}', :{name}, {scope})" for name in values]
        self.connection.execute(text(f"SELECT {', '.join(calls)}"), values)

    def _select(self, *expressions: str) -> tuple[Any, ...]:
        return tuple(self.connection.execute(text(f"SELECT {', '.join(expressions)}")).one())

    def _end_setup_transaction(self) -> None:
        if not self.one_transaction:
            # The statements began a transaction: end it, so that Alembic begins
            # (and commits) one per revision.
            self.connection.commit()

    def _version_table_exists(self) -> bool:
        table = quoted(self.options.get("version_table", VERSION_TABLE))
        schema = self.options.get("version_table_schema")
        name = f"{quoted(schema)}.{table}" if schema else table
        exists = self.connection.execute(text("SELECT to_regclass(:name) IS NOT NULL"), {"name": name})
        found = bool(exists.scalar())
        self._end_setup_transaction()
        return found

    # --- 2. the migration lock --------------------------------------------------------

    def _take_lock(self) -> None:
        """Wait for the migration lock, outside any transaction (or in the one transaction)."""
        if not self.settings.migration_lock or self.locked:
            return
        self._end_setup_transaction()
        try_lock = "pg_try_advisory_xact_lock" if self.one_transaction else "pg_try_advisory_lock"
        timeout = self.settings.migration_lock_timeout
        deadline = time.monotonic() + timeout.total_seconds()
        delay = 0.05
        while True:
            (self.locked,) = self._select(f"{try_lock}({self.lock_key})")
            self._end_setup_transaction()
            if self.locked:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CommandError(
                    f"another migration still holds the migration lock (advisory lock {self.lock_key},"
                    f" {self._lock_holder()}) after {readable(timeout)}; let it finish, or wait longer with"
                    f" {env_var('migration_lock_timeout')}"
                )
            if delay == 0.05:
                log.warning("waiting for the migration lock, held by %s", self._lock_holder())
            self._sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)

    def _lock_holder(self) -> str:
        rows = self.connection.execute(
            text(
                "SELECT a.pid, a.application_name, extract(epoch FROM now() - a.backend_start)::float8"
                " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 AND l.objid = :key"
            ),
            {"key": self.lock_key},
        ).all()
        self._end_setup_transaction()
        return ", ".join(session(*row, "connected") for row in rows) or "its holder is gone now"

    # --- 3. and 4. a transaction per revision, lock retries ------------------------------

    def _before_step(self, info: MigrationInfo) -> None:
        if self.settings.migration_lock and not self.locked:
            # Taken outside the attempt (and its savepoint, which would release it).
            raise _LockFirst()
        if self.one_transaction:
            refuse_autocommit_block(info)
            return
        if uses_autocommit_block(info):
            # Its statements run outside any transaction, and CREATE INDEX CONCURRENTLY makes
            # no query of the application wait: it may wait for older transactions for the
            # whole budget at once (a short wait would throw the index build away).
            self._session_lock_timeout(max(self.settings.lock_retry_budget, self.settings.lock_timeout))
            return
        self._session_lock_timeout(self._attempt_timeout(1))
        revision, attempt, _ = self.retrying
        if revision == info.up_revision_id and attempt > 1:
            # This attempt's own lock_timeout, for its transaction only.
            self._set_config({"lock_timeout": milliseconds(self._attempt_timeout(attempt))}, local=True)

    def _session_lock_timeout(self, timeout: timedelta) -> None:
        if timeout != self.session_lock_timeout:
            self._set_config({"lock_timeout": milliseconds(timeout)})
            self.session_lock_timeout = timeout

    def _run_with_retries(self, revisions: Revisions) -> None:
        """Attempts of the run until it is done; after a failed one, sleep and go again, or give up."""
        while True:
            try:
                with self._attempt():
                    revisions.run()
                return
            except _LockFirst:
                self._take_lock()
                revisions.replan()
            except Exception as exc:
                if not revisions.explains(exc):
                    raise
                self._sleep(self._after_failed_attempt(revisions, exc))

    def _after_failed_attempt(self, revisions: Revisions, exc: Exception) -> float:
        """The seconds to sleep before the next attempt; the FAILED line when there is none."""
        self.session_lock_timeout = None
        failed = revisions.running
        if failed is None:
            raise revisions.failure(exc, "no revision had begun") from exc
        if revisions.ended is not None:
            raise revisions.failure(exc) from exc
        if not self.one_transaction and not self.connection.invalidated and self.connection.in_transaction():
            # The revision ended Alembic's transaction on its own (commit()) and failed in the
            # one it went on in, which Alembic leaves open: roll that back before looking around.
            self.connection.rollback()
        if self.one_transaction:
            # The savepoint rolled back everything this run did.
            revisions.restart()
        revision, attempt, started = self.retrying
        # The budget is a revision's; in one transaction, where every attempt runs the whole
        # run again, it is the run's (or revisions blocked in turn would retry for ever).
        if revision is None or (revision != failed.up_revision_id and not self.one_transaction):
            revision, attempt, started = failed.up_revision_id, 1, time.monotonic()
        code = sqlstate(exc) if isinstance(exc, DBAPIError) else None
        retry = code in LOCK_WAIT_FAILURES and not revisions.committed_work
        budget = self.settings.lock_retry_budget.total_seconds()
        # A failed CREATE INDEX CONCURRENTLY leaves an INVALID index behind. Dropping it waits
        # for the sessions that the build waited for, holding no lock that the application's
        # queries would queue behind: it may take the rest of the budget.
        wait = budget - (time.monotonic() - started) if retry else 0
        dropped, left = self._drop_invalid_indexes(exc, max(wait, self.settings.lock_timeout.total_seconds()))
        if code == DUPLICATE_TABLE and dropped and not revisions.committed_work:
            # The INVALID index of an earlier failed build was in the way: gone now.
            retry = True
        outcome = self._outcome(revisions, dropped, left)
        blocked_by = self._blockers(exc) if code in LOCK_WAIT_FAILURES else ""
        if not retry or left:
            raise revisions.failure(exc, f"{blocked_by}; {outcome}" if blocked_by else outcome) from exc
        elapsed = time.monotonic() - started
        sleep = jittered(LOCK_RETRY_SCHEDULE[min(attempt, len(LOCK_RETRY_SCHEDULE)) - 1][1])
        if elapsed + sleep + self._attempt_timeout(attempt + 1).total_seconds() > budget:
            outcome = f"{self._gave_up(attempt, elapsed)}; {blocked_by}; {outcome}"
            raise revisions.failure(exc, outcome) from exc
        log.warning(
            "%s in %s, attempt %d (lock_timeout %s): %s; retrying in %.1f s",
            LOCK_WAIT_FAILURES.get(code, "an INVALID index in the way"),
            revisions.name(failed),
            attempt,
            readable(self._attempt_timeout(attempt)),
            blocked_by,
            sleep,
        )
        self.retrying = (revision, attempt + 1, started)
        return sleep

    @contextmanager
    def _attempt(self) -> Iterator[None]:
        """One attempt of the run; in the one transaction, inside a savepoint."""
        if not self.one_transaction:
            yield
            return
        savepoint = self.connection.begin_nested()
        _, attempt, _ = self.retrying
        if attempt > 1:
            self._set_config({"lock_timeout": milliseconds(self._attempt_timeout(attempt))})
        try:
            yield
        except BaseException:
            # Unless a COMMIT in a revision's SQL took the savepoint with it.
            alive = not self.connection.invalidated and in_server_transaction(self.connection)
            if savepoint.is_active and alive:
                savepoint.rollback()
            raise
        savepoint.commit()

    def _attempt_timeout(self, attempt: int) -> timedelta:
        first, longest = self.settings.lock_timeout_first, self.settings.lock_timeout
        if not self.settings.lock_retry_budget:
            return longest
        share, _ = LOCK_RETRY_SCHEDULE[min(attempt, len(LOCK_RETRY_SCHEDULE)) - 1]
        return first + (longest - first) * share

    def _gave_up(self, attempts: int, elapsed: float) -> str:
        if not self.settings.lock_retry_budget:
            return f"waited {readable(self.settings.lock_timeout)} for a lock ({env_var('lock_timeout')})"
        return (
            f"still blocked after {attempts} attempts in {elapsed:.0f} s"
            f" ({env_var('lock_retry_budget')} is {readable(self.settings.lock_retry_budget)})"
        )

    def _blockers(self, exc: BaseException) -> str:
        """Who is in the way: the sessions that hold locks on the tables the failed statement
        names, else (for CREATE INDEX CONCURRENTLY) those that hold the oldest snapshots."""
        names = identifiers(getattr(exc, "statement", None) or "")
        rows = self.connection.execute(BLOCKERS, {"names": names}).all()
        snapshots = [] if rows else self.connection.execute(OLD_SNAPSHOTS).all()
        if not self.one_transaction:
            self.connection.rollback()
        if rows:
            return "blocked by " + ", ".join(session(*row, "transaction open") for row in rows)
        if snapshots:
            return "waiting for older transactions: " + ", ".join(
                session(*row, "transaction open") for row in snapshots
            )
        return "no session that this role may see holds a lock on its tables now (GRANT pg_read_all_stats)"

    def _outcome(self, revisions: Revisions, dropped: list[str], left: list[str]) -> str:
        """What a failure of the revision that runs leaves behind, truthfully."""
        if self.one_transaction:
            where = "PgBouncer mode" if self.settings.pgbouncer else "the caller's transaction"
            return f"the whole run rolled back (it runs in one transaction: {where})"
        outcome = AFTER_A_FAILED_REVISION
        if revisions.autocommitting:
            outcome = (
                "a COMMIT in its SQL had ended its transaction: what it did before that, and each"
                " statement after it (committed on its own), stays"
            )
        elif revisions.committed_work:
            outcome = (
                "it had made part of its work permanent (autocommit_block() or a commit() of its own),"
                " which stays; the rest rolled back"
            )
        if dropped:
            outcome += (
                f"; the INVALID index {', '.join(dropped)} that its CREATE INDEX CONCURRENTLY"
                " left behind was dropped, so that the revision can run again"
            )
        if left:
            outcome += (
                f"; its CREATE INDEX CONCURRENTLY left the INVALID index {', '.join(left)}, which could not"
                " be dropped yet (the next run drops it before it builds the index again)"
            )
        return outcome

    def _drop_invalid_indexes(self, exc: BaseException, wait: float) -> tuple[list[str], list[str]]:
        """Drop the INVALID indexes that the failed statement was building, waiting at most `wait`
        seconds; the ones dropped, and the ones left."""
        names = identifiers(getattr(exc, "statement", None) or "")
        if self.one_transaction or self.connection.invalidated or not names:
            return [], []
        query = text(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_index i"
            " JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE NOT i.indisvalid AND c.relname = ANY(:names) AND pg_table_is_visible(c.oid)"
            " AND NOT EXISTS (SELECT FROM pg_stat_progress_create_index p WHERE p.index_relid = c.oid)"
        )
        invalid = list(self.connection.execute(query, {"names": names}).scalars())
        self.connection.rollback()
        if not invalid:
            return [], []
        dropped = []
        # Outside a transaction, as Alembic's autocommit_block() runs CREATE INDEX CONCURRENTLY.
        self.connection.execution_options(isolation_level="AUTOCOMMIT")
        try:
            self._set_config({"lock_timeout": milliseconds(timedelta(seconds=wait))})
            for index in invalid:
                self.connection.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {index}")
                dropped.append(index)
        except DBAPIError as drop_failed:
            index = invalid[len(dropped)]
            log.warning("could not drop the INVALID index %s: %s", index, driver_message(drop_failed))
        finally:
            self._set_config({"lock_timeout": milliseconds(self._attempt_timeout(1))})
            self.session_lock_timeout = self._attempt_timeout(1)
            # SQLAlchemy tracks a transaction even in autocommit: end it before switching back.
            self.connection.commit()
            self.connection.execution_options(isolation_level=self.connection.default_isolation_level)
        return dropped, invalid[len(dropped) :]

    def _sleep(self, seconds: float) -> None:
        """Sleep without blocking the event loop the connection runs on."""
        self.connection.connection.dbapi_connection.run_async(lambda _: asyncio.sleep(seconds))

    # --- 5. release ---------------------------------------------------------------

    def _release(self, previous: dict[str, str]) -> None:
        if self.connection.invalidated or self.connection.closed:
            # The backend is gone, and its lock and settings with it.
            return
        callers = self.callers_transaction
        if callers is not None and self.connection.get_transaction() is not callers:
            # A revision ended the caller's transaction (the run failed, naming it), and the lock
            # and SET LOCAL limits with it; what the connection is in now is the caller's business.
            return
        if self.own_transaction:
            if self.connection.in_transaction():
                self.connection.rollback()
            return
        if not self.one_transaction and self.connection.in_transaction():
            self.connection.rollback()
        self._set_config(previous)
        if self.locked and not self.one_transaction:
            self.connection.execute(text(f"SELECT pg_advisory_unlock({self.lock_key})"))
        self._end_setup_transaction()


def migration_lock_key(settings: DatabaseSettings) -> int:
    """The advisory lock key of migrations into the configured schema (or into the search_path)."""
    if settings.schema_name is None:
        return MIGRATION_LOCK_KEY
    key = f"my_service:alembic:{settings.schema_name}"
    return zlib.crc32(key.encode())


def schema_options(settings: DatabaseSettings) -> dict[str, Any]:
    """Alembic's options for DATABASE_SCHEMA: alembic_version in that schema, and, as
    the search_path is that schema alone, autogenerate compares the models with its tables."""
    if settings.schema_name is None:
        return {}
    return {"version_table_schema": settings.schema_name, "include_name": not_the_version_table}


def not_the_version_table(name: str | None, type_: str, parent_names: dict[str, str | None]) -> bool:
    """Leave alembic_version out of autogenerate's look at the search_path's tables.

    Alembic leaves it out only where it looks for version_table_schema by name, which it
    does not: the models' tables have no schema, and it reflects the search_path for them.
    """
    return not (type_ == "table" and name == VERSION_TABLE and parent_names.get("schema_name") is None)


def offline_sql(settings: DatabaseSettings) -> list[str]:
    """The role, the schema and the session limits as SQL, for scripts written with --sql
    and applied by hand."""
    statements = []
    if settings.migration_role is not None:
        statements.append(f"SET ROLE {quoted(settings.migration_role)}")
    if settings.schema_name is not None:
        schema = quoted(settings.schema_name)
        statements += [f"CREATE SCHEMA IF NOT EXISTS {schema}", f"SET search_path TO {schema}"]
    limits = {
        "lock_timeout": settings.lock_timeout,
        "statement_timeout": settings.statement_timeout,
        "idle_in_transaction_session_timeout": settings.idle_in_transaction_timeout,
    }
    return statements + [f"SET {name} = '{milliseconds(value)}'" for name, value in limits.items()]


def quoted(name: str) -> str:
    """A PostgreSQL name as a quoted identifier: any characters, case kept."""
    return '"' + name.replace('"', '""') + '"'


def refuse_autocommit_block(info: MigrationInfo) -> None:
    """A revision that uses autocommit_block() cannot run inside one transaction: say so before it runs."""
    path = Path(info.up_revision.path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if any(isinstance(node, ast.Attribute) and node.attr == "autocommit_block" for node in ast.walk(tree)):
        raise CommandError(
            f"{path.name} uses autocommit_block(), which cannot run inside one transaction"
            f" ({env_var('pgbouncer')} or a caller's transaction): nothing of this run was applied;"
            " run it through a direct connection"
        )


def in_server_transaction(connection: Connection) -> bool:
    """Whether the server has the session inside a transaction block, as asyncpg tracks it
    (True when the driver cannot tell)."""
    is_in_transaction = getattr(connection.connection.driver_connection, "is_in_transaction", None)
    return is_in_transaction() if is_in_transaction is not None else True


def uses_autocommit_block(info: MigrationInfo) -> bool:
    """Whether the function that runs (upgrade or downgrade) calls autocommit_block()."""
    function = getattr(info.up_revision.module, "upgrade" if info.is_upgrade else "downgrade", None)
    return function is not None and "autocommit_block" in names_in(function.__code__)


def names_in(code: CodeType) -> set[str]:
    """The names a function's code uses, its nested functions' included."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, CodeType):
            names |= names_in(constant)
    return names


def identifiers(statement: str) -> list[str]:
    """The names in an SQL statement, as PostgreSQL folds them (for looking up its tables)."""
    names = re.findall(r'"((?:[^"]|"")+)"|([A-Za-z_][A-Za-z0-9_$]*)', statement)
    return sorted({quoted.replace('""', '"') if quoted else plain.lower() for quoted, plain in names})


def session(pid: int, application_name: str, seconds: float | None, age: str) -> str:
    """A session as a DBA finds it in pg_stat_activity (never its query: it may hold data)."""
    name = f"'{application_name}'" if application_name else "no application_name"
    # pg_stat_activity shows other roles' sessions without their times.
    duration = f"{age} {seconds:.1f} s" if seconds is not None else f"{age} for: grant pg_read_all_stats"
    return f"pid {pid} ({name}, {duration})"


def jittered(seconds: float) -> float:
    return seconds * random.uniform(0.75, 1.25)
