"""Running the Alembic migrations: a Python API for applications, and what env.py needs.

From a script or other synchronous code: ``upgrade()``. From async code (an app's
startup, an async test): ``await upgrade_async()``, or ``await upgrade_async(connection=conn)``
on a connection you hold. Alembic's `context` is process-global, so commands run one at
a time: concurrent calls wait for each other.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext, MigrationInfo, MigrationStep
from alembic.util import CommandError
from sqlalchemy import Connection, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .database import AFTER_A_FAILED_REVISION, CannotConnect, connect, driver_message, engine_for
from .settings import ASYNC_DRIVER, DatabaseSettings
from .settings_base import NoDatabaseSet, SettingsError

PROJECT_DIR = Path(__file__).resolve().parent.parent
ALEMBIC_INI = PROJECT_DIR / "alembic.ini"

# Alembic's `context` and `op` are module-level proxies: one command at a time.
_one_command = threading.Lock()
_command_thread: int | None = None


def alembic_config(path: str | Path = ALEMBIC_INI) -> Config:
    """The project's Alembic configuration, for use inside an application.

    env.py leaves the application's logging as it is: alembic.ini's logging
    sections are for the `alembic` command.
    """
    config = Config(str(path))
    config.attributes["configure_logger"] = False
    return config


def upgrade(revision: str = "head", *, config: Config | None = None) -> None:
    """`alembic upgrade` from synchronous code, also from inside a running event loop."""
    if _command_thread == threading.get_ident():
        raise CommandError(
            "a migration already runs on this thread's event loop: await upgrade_async() instead of upgrade()"
        )
    with _one_command:
        command.upgrade(config or alembic_config(), revision)


async def upgrade_async(
    revision: str = "head",
    *,
    connection: AsyncConnection | None = None,
    config: Config | None = None,
) -> None:
    """`alembic upgrade` from async code, on this event loop.

    Cancelling the call cancels the migration: the revision that runs rolls back.
    On `connection`, the migration joins its transaction if one is open (commit it
    yourself), and commits revision by revision otherwise.
    """
    config = config or alembic_config()
    async with _command_slot():
        if connection is not None:
            await connection.run_sync(_upgrade_on, config, revision)
            return
        settings = _settings()
        engine = engine_for(settings)
        try:
            async with _connected(engine, settings) as own:
                await own.run_sync(_upgrade_on, config, revision)
        finally:
            await engine.dispose()


@asynccontextmanager
async def _command_slot() -> AsyncIterator[None]:
    """Wait for the other commands of this process without blocking the event loop."""
    global _command_thread
    while not _one_command.acquire(blocking=False):
        await asyncio.sleep(0.05)
    _command_thread = threading.get_ident()
    try:
        yield
    finally:
        _command_thread = None
        _one_command.release()


def _upgrade_on(connection: Connection, config: Config, revision: str) -> None:
    config.attributes["connection"] = connection
    try:
        command.upgrade(config, revision)
    finally:
        del config.attributes["connection"]


# --- what env.py needs -------------------------------------------------------------


def settings_for(config: Config, *, offline: bool = False) -> DatabaseSettings:
    """The settings for this run; a connection handed in decides the URL.

    Offline (`--sql`) only the kind of database matters: with no database set, a URL of
    that kind stands in.
    """
    connectable = config.attributes.get("connection")
    overrides = {}
    if isinstance(connectable, AsyncConnection):
        raise CommandError(
            'config.attributes["connection"] is an AsyncConnection, which belongs to a running event'
            " loop: `await upgrade_async(connection=...)`, or hand in `connection.sync_connection`"
            " from inside `await connection.run_sync(...)`"
        )
    if isinstance(connectable, AsyncEngine) and _loop_running():
        raise CommandError(
            'config.attributes["connection"] is an AsyncEngine, whose connections belong to the event'
            " loop that runs here, and env.py would need a loop of its own: `await upgrade_async()`"
        )
    if connectable is not None:
        if not isinstance(connectable, Connection | AsyncEngine):
            raise CommandError(
                'config.attributes["connection"] must be a Connection or an AsyncEngine,'
                f" not {type(connectable).__name__}"
            )
        # Only the database it names matters: its driver options are the caller's business.
        url = connectable.engine.url.set(query={})
        overrides["url"] = url.render_as_string(hide_password=False)
    try:
        return _settings(**overrides)
    except CommandError as exc:
        if offline and isinstance(exc.__cause__, NoDatabaseSet):
            return _settings(url=f"{ASYNC_DRIVER}:///offline")
        raise


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _settings(**overrides: Any) -> DatabaseSettings:
    try:
        return DatabaseSettings.load(**overrides)
    except SettingsError as exc:
        raise CommandError(str(exc)) from exc


def ini_escape(value: str) -> str:
    """Escape `value` for Config.set_main_option, which interpolates `%`."""
    return value.replace("%", "%%")


@asynccontextmanager
async def _connected(engine: AsyncEngine, settings: DatabaseSettings) -> AsyncIterator[AsyncConnection]:
    try:
        async with connect(engine, settings) as connection:
            yield connection
    except CannotConnect as exc:
        raise CommandError(str(exc)) from exc.__cause__


async def run_on_engine(
    engine: AsyncEngine, settings: DatabaseSettings, run: Callable[[Connection], None]
) -> None:
    """`run` on a connection of `engine`; dispose of its connections afterwards, on this loop."""
    try:
        async with _connected(engine, settings) as connection:
            await connection.run_sync(run)
    finally:
        await engine.dispose()


def run_coroutine(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run `coroutine` to completion from synchronous code (env.py).

    With asyncio.run(), on a worker thread when this thread's event loop is running
    (loops do not nest). On the main thread, SIGTERM (what container platforms send to
    stop a process) cancels it as Ctrl-C does: the statement that runs is cancelled and
    the revision's transaction rolls back before the process exits.
    """
    if not _loop_running():
        if threading.current_thread() is not threading.main_thread():
            asyncio.run(coroutine)
            return
        try:
            asyncio.run(_stopped_by_sigterm(coroutine))
        except KeyboardInterrupt:
            raise CommandError(f"stopped by Ctrl-C: {STOPPED}") from None
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, coroutine).result()


STOPPED = (
    "nothing more runs: a statement that was running is cancelled, and the open transaction of a"
    " revision, if one had begun, rolled back (`alembic current` shows where the database is)"
)


async def _stopped_by_sigterm(coroutine: Coroutine[Any, Any, None]) -> None:
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    stopped = []
    # An application's own handler (a graceful shutdown) comes back afterwards.
    previous = signal.getsignal(signal.SIGTERM)
    loop.add_signal_handler(signal.SIGTERM, lambda: stopped.append(task.cancel()))
    try:
        await coroutine
    except asyncio.CancelledError:
        if not stopped:
            raise
        raise CommandError(f"stopped by SIGTERM: {STOPPED}") from None
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# --- running the revisions ------------------------------------------------------------

# A target relative to where the database is: +2, -1, ae10+1, head-2, mybranch@-1.
RELATIVE = re.compile(r"[+-]\d+$")
# What may come before a statement's first word: whitespace and comments.
LEADING = r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*"
# Not ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] x, which keeps the transaction.
NOT_TO_A_SAVEPOINT = r"\b(?!\s+(?:(?:WORK|TRANSACTION)\s+)?TO\b)"
# A statement that ends the transaction throwing its work away.
ROLLBACK_IN_SQL = re.compile(LEADING + r"(?:ROLLBACK|ABORT)" + NOT_TO_A_SAVEPOINT, re.IGNORECASE | re.DOTALL)
# A statement that commits the transaction (PostgreSQL's END too).
COMMIT_IN_SQL = re.compile(LEADING + r"(?:COMMIT|END)\b", re.IGNORECASE | re.DOTALL)
# A failed revision that had made part of its work permanent: that part stays.
MADE_PERMANENT = (
    "it had made part of its work permanent (a commit() of its own or a COMMIT in its SQL), which stays"
)


class RefusedStatement(Exception):
    """A statement in a revision that would leave it recorded as applied without its work."""


# How a revision can end the one transaction of a run (PgBouncer mode, a caller's
# transaction), and what that leaves behind.
ENDED_BY_COMMIT = "a commit() of its own"
ENDED_BY_ROLLBACK = "a rollback() of its own"
ENDED_BY_SQL = "a COMMIT or ROLLBACK in its SQL"
ENDED_SOMEHOW = "a transaction of its own"
TRANSACTION_ENDED = {
    ENDED_BY_COMMIT: "what this run did before it is committed, and nothing after it",
    ENDED_BY_ROLLBACK: "everything this run did before it is rolled back, and nothing after it applied",
    ENDED_BY_SQL: (
        "what this run did before it is committed or rolled back, and each statement after it"
        " committed on its own"
    ),
    ENDED_SOMEHOW: "what this run did before it may be committed",
}


def cancelling() -> bool:
    """Whether the task this runs in is being cancelled (SIGTERM, or the caller's cancel)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return False
    return task is not None and task.cancelling() > 0


@contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


class Revisions:
    """The revisions an Alembic command runs, each in its own transaction, and which one runs.

    Alembic hands env.py the command's plan as the `fn` option; this wraps it so that a
    failure names the revision file that raised it, a revision that commits or rolls back
    on its own cannot leave a run that looks done but is not, and a run started again after
    a failure continues the same plan (a relative target such as `+2` or `-1` is not taken
    again from the new position).
    """

    def __init__(self, context: EnvironmentContext, connection: Connection, **options: Any) -> None:
        self.context, self.connection = context, connection
        # The transaction Alembic runs in when the caller (or PgBouncer mode) holds one.
        self.outer = connection.get_transaction()
        options = {"connection": connection, "transaction_per_migration": True, **options}
        with _quiet(logging.getLogger("alembic.runtime.migration")):
            # Configured once to read the plan (Alembic logs every configure), then for real.
            context.configure(**options)
            self._plan: Callable[[tuple[str, ...], MigrationContext], Iterable[MigrationStep]]
            self._plan = context.get_context().opts["fn"]
        context.configure(fn=self._steps, on_version_apply=self._applied, **options)
        self.steps: list[MigrationStep] | None = None
        self.done = 0
        # Where the database is, as far as this run knows: its heads after the last commit.
        self.heads: tuple[str, ...] = ()
        self.start_heads: tuple[str, ...] = ()
        # The heads of the first plan, when the plan was made again after waiting for the lock.
        self.planned_from: tuple[str, ...] | None = None
        self._applied_heads: tuple[str, ...] = ()
        self.running: MigrationInfo | None = None
        # Whether the step that runs made work permanent before it finished: statements
        # in autocommit_block(), or a commit() of its own after some statements.
        self.committed_work = False
        # Whether the step that runs rolled back a transaction of its own.
        self.rolled_back = False
        # Whether a COMMIT in the step's SQL ended its transaction: each statement after it
        # commits on its own.
        self.autocommitting = False
        # Whether Alembic recorded the step's version: the commit after that is Alembic's.
        self._recorded = False
        self._statements = 0
        # In one transaction (`outer`): the revision that ended it while it ran, and how.
        self.ended: tuple[MigrationInfo, str] | None = None
        self.before_step: Callable[[MigrationInfo], None] = lambda info: None
        # Whether the server still sees the transaction SQLAlchemy thinks is open, where the
        # driver can tell: a COMMIT in a revision's own SQL ends it behind SQLAlchemy's back.
        self.server_in_transaction: Callable[[Connection], bool] = lambda connection: True

    def run(self) -> None:
        """context.run_migrations(): the rest of the plan, one transaction per revision."""
        with self._watching_commits():
            try:
                self.context.run_migrations()
            except CommandError as exc:
                if self.ended is None:
                    raise
                # Alembic's own complaint (a version row it cannot find) is a consequence.
                raise self._transaction_ended() from exc
            except Exception as exc:
                if cancelling():
                    # What failed is the cleanup after a cancelled statement: the cancel it is.
                    raise asyncio.CancelledError() from exc
                raise

    def applies_any(self) -> bool:
        """Whether the command, run on a database without revisions, would apply any."""
        try:
            return any(step.is_upgrade for step in self._plan((), self.context.get_context()))
        except CommandError:
            return False  # such as `downgrade -1`: there is no revision to go down from

    def replan(self) -> None:
        """Compute the plan again from the heads in the database, on the next run() (the
        migration lock was just taken: another run may have moved them meanwhile)."""
        if self.steps is not None:
            self.planned_from = self.start_heads
        self.steps, self.done, self.running = None, 0, None

    def restart(self) -> None:
        """Run the plan from its first step again: everything this run did was rolled back."""
        self.done, self.heads = 0, self.start_heads

    def _steps(self, heads: tuple[str, ...], migration_context: MigrationContext) -> Iterator[MigrationStep]:
        if self.steps is None:
            self._refuse_a_moved_relative_target(tuple(heads))
            self.steps = list(self._plan(heads, migration_context))
            self.start_heads = self.heads = tuple(heads)
        while self.done < len(self.steps):
            step = self.steps[self.done]
            self.running = step.info
            self.before_step(step.info)
            self.committed_work, self.rolled_back, self._statements = False, False, 0
            self.autocommitting, self._recorded = False, False
            yield step
            # Alembic committed the step (or, in a transaction of the caller, let it be).
            self._settle(step.info)
            self.heads, self.done, self.running = self._applied_heads, self.done + 1, None

    def _refuse_a_moved_relative_target(self, heads: tuple[str, ...]) -> None:
        """`downgrade -1` meant one revision back from where the database was when the command
        began: after another run moved it, the same words would mean another revision."""
        if self.planned_from in (None, heads):
            return
        target = str(self.context.get_revision_argument())
        if RELATIVE.search(target):
            raise CommandError(
                f"another migration moved the database from {', '.join(self.planned_from) or 'base'} to"
                f" {', '.join(heads) or 'base'} while this one waited for the migration lock; {target} from"
                " there would be another revision, so nothing was done (run it again if it is still meant)"
            )

    def _applied(self, *, heads: set[str], **_: Any) -> None:
        self._applied_heads = tuple(sorted(heads))
        self._recorded = True

    def _settle(self, info: MigrationInfo) -> None:
        if self.outer is not None:
            if self.ended is None and self.connection.get_transaction() is not self.outer:
                self.ended = (info, ENDED_SOMEHOW)
            if self.ended is not None:
                raise self._transaction_ended()
        elif self.rolled_back:
            # The revision threw away what it had done: recording it as applied would be a lie.
            if self.connection.in_transaction():
                self.connection.rollback()
            raise CommandError(
                f"{self.name(info)} rolled back its own transaction (a rollback() of its own): what it"
                f" did is not applied, nor recorded; {self.position()}"
            )
        elif self.connection.in_transaction():
            # The revision committed on its own, and went on in a new transaction that
            # Alembic does not know: commit it, with the version.
            self.connection.commit()

    @contextmanager
    def _watching_commits(self) -> Iterator[None]:
        listeners: dict[str, Callable[..., None]] = {
            "before_cursor_execute": self._refuse_a_rollback_in_sql,
            "after_cursor_execute": self._executed,
            "commit": self._committed,
            "rollback": self._rolled_back,
        }
        for name, listener in listeners.items():
            event.listen(self.connection, name, listener)
        try:
            yield
        finally:
            for name, listener in listeners.items():
                event.remove(self.connection, name, listener)

    def _refuse_a_rollback_in_sql(self, connection: Connection, cursor: Any, statement: str, *_: Any) -> None:
        """A ROLLBACK in a revision's SQL would throw its work away behind Alembic's back, which
        would then record the revision as applied: refuse it before it runs."""
        if self.running is None:
            return
        if ROLLBACK_IN_SQL.match(statement):
            raise RefusedStatement(
                "a ROLLBACK in its SQL would throw away what it did while Alembic records it as applied;"
                " raise an exception to make the revision fail instead"
            )
        if COMMIT_IN_SQL.match(statement):
            # What ran before it stays, on every database (PostgreSQL also tells by its state).
            self.committed_work = True

    def _executed(self, connection: Connection, *_: Any) -> None:
        if connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            self.committed_work = self.committed_work or self.running is not None
            return
        self._statements += 1
        if self.running is not None and not self.server_in_transaction(connection):
            # A COMMIT in the revision's SQL: every statement after it commits on its own,
            # the version row included.
            self.committed_work = self.autocommitting = True
            self._ending(ENDED_BY_SQL)

    def _committed(self, connection: Connection) -> None:
        if self._statements and self.running is not None and not self._recorded:
            self.committed_work = True
        self._statements = 0
        self._ending(ENDED_BY_COMMIT)

    def _rolled_back(self, connection: Connection) -> None:
        self._statements = 0
        self.rolled_back = self.rolled_back or self.running is not None
        self._ending(ENDED_BY_ROLLBACK)

    def _ending(self, how: str) -> None:
        if self.outer is not None and self.running is not None and self.ended is None:
            self.ended = (self.running, how)

    def _transaction_ended(self) -> CommandError:
        """The FAILED line for a revision that ended the one transaction of the run."""
        info, how = self.ended or (self.running, ENDED_SOMEHOW)
        heads = {ENDED_BY_COMMIT: self.heads, ENDED_BY_ROLLBACK: self.start_heads}.get(how)
        where = self.position(heads) if heads is not None else "`alembic current` shows where the database is"
        return CommandError(
            f"{self.name(info)} ended the one transaction that the whole run shares ({how}):"
            f" {TRANSACTION_ENDED[how]}; {where}; run such a revision through a direct connection,"
            " without PgBouncer mode and outside a transaction of the caller's"
        )

    def name(self, info: MigrationInfo | None = None) -> str:
        """The file of the revision that runs (or of `info`), relative to the project when inside it."""
        info = info or self.running
        script = info.up_revision if info is not None else None
        if script is None:
            return "the migration"
        path = Path(script.path)
        return path.relative_to(PROJECT_DIR).as_posix() if path.is_relative_to(PROJECT_DIR) else str(path)

    def position(self, heads: tuple[str, ...] | None = None) -> str:
        """Where the database is now (or at `heads`), as far as this run knows."""
        heads = self.heads if heads is None else heads
        if not heads:
            return "the database has no revision applied"
        return f"the database is at {', '.join(heads)}"

    def explains(self, exc: BaseException) -> bool:
        """Whether `exc` is a migration's failure, for one FAILED line: raised while a revision
        ran, or by the database. Anything else (an autogenerate hook's own exception, say)
        goes on as it is."""
        return not isinstance(exc, CommandError) and (self.running is not None or isinstance(exc, DBAPIError))

    def failure(self, exc: BaseException, outcome: str | None = None) -> CommandError:
        """The CommandError (one FAILED: line) for `exc`, raised while a revision ran; `outcome`
        says what it leaves behind (by default: the revision rolled back, but what it committed)."""
        if outcome is None:
            outcome = AFTER_A_FAILED_REVISION
            if self.committed_work:
                outcome = f"{MADE_PERMANENT}; {outcome}"
        if self.ended is not None:
            # What failed then is a consequence: the revision went on outside the run's transaction.
            return self._transaction_ended()
        if isinstance(exc, DBAPIError):
            message = driver_message(exc)
        else:
            lines = str(exc).strip().splitlines()
            message = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        return CommandError(
            f"{self.name()} failed: {message}; {outcome}; {self.position()}"
            " (alembic --raiseerr shows the traceback)"
        )
