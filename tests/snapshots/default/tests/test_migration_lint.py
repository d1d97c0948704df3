"""Safety lint: squawk checks each revision's SQL for operations that lock or break production.

Alembic writes each revision's SQL as `alembic upgrade <down>:<rev> --sql` would, without a
database and in this process; squawk then checks all of it in one run. squawk's settings,
and why some of its rules are off, are in .squawk.toml.

Comment lines in a revision file, each with its reason:

    # squawk-ignore adding-required-field: the table is created empty two revisions back
    # squawk-skip: reads rows to move them, which --sql cannot do; no DDL

The first accepts one of squawk's rules (or several, comma-separated), the second leaves
the revision out of the lint. In pyproject.toml, `baseline = "<revision id>"` under
[tool.migration_lint] leaves that revision and its ancestors out: the history that ran in
production before the lint. README.md ("Migration safety lint") shows the safe way to
write what the lint rejects.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
import tomllib
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError

PROJECT_DIR = Path(__file__).resolve().parent.parent
PYPROJECT = PROJECT_DIR / "pyproject.toml"
SQUAWK_CONFIG = PROJECT_DIR / ".squawk.toml"
# --sql builds the URL from the settings but never connects: any PostgreSQL URL will do. The
# lint reads no other setting (a .env, the environment, secret files), so that the database
# configured for this machine, in whichever form, neither clashes with it nor changes the SQL.
OFFLINE_URL = "postgresql://lint@localhost/lint"
SETTINGS_PREFIX = "DATABASE_"
SECRETS_DIR = "SECRETS_DIR"
IGNORE = re.compile(r"^\s*#\s*squawk-ignore\s+(?P<rules>[^:]+?)\s*(?::\s*(?P<reason>.*?))?\s*$")
SKIP = re.compile(r"^\s*#\s*squawk-skip\b\s*:?\s*(?P<reason>.*?)\s*$")
# An --sql script, as Alembic writes it: each revision's step starts with a comment and ends
# with the line that records the revision in the version table (column version_num), which
# is created just before the first step.
STEP = re.compile(r"^-- Running upgrade .* -> (?P<revision>\S+)$", re.MULTILINE)
RECORDED = re.compile(r"^.*\bversion_num\b.*\n", re.MULTILINE)
VERSION_TABLE = re.compile(r"^CREATE TABLE [^;]*\bversion_num\b[^;]*;\s*\Z", re.MULTILINE)


# The history, and the part of it that the lint checks


class SettingsProblem(Exception):
    """[tool.migration_lint] in pyproject.toml is wrong; the message says how."""


@dataclass
class History:
    script: ScriptDirectory
    linted: list[Script]  # after the baseline (not it, nor any of its ancestors), oldest first
    problem: str | None  # what is wrong with [tool.migration_lint]; then nothing is linted


def load_history() -> History:
    script = ScriptDirectory.from_config(Config(str(PROJECT_DIR / "alembic.ini")))
    revisions = list(reversed(list(script.walk_revisions())))
    try:
        start = baseline(script)
    except SettingsProblem as exc:
        return History(script, [], str(exc))
    done = ancestry(script, start) if start else set()
    return History(script, [revision for revision in revisions if revision.revision not in done], None)


def baseline(script: ScriptDirectory) -> str | None:
    """The revision that [tool.migration_lint] `baseline` names in pyproject.toml."""
    try:
        pyproject = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsProblem(f"pyproject.toml: {exc}") from None
    settings = pyproject.get("tool", {}).get("migration_lint", {})
    unknown = sorted(set(settings) - {"baseline"})
    if unknown:
        raise SettingsProblem(f"pyproject.toml: [tool.migration_lint] has `baseline` only, not {unknown}")
    if "baseline" not in settings:
        return None
    value = str(settings["baseline"])
    try:
        found = script.get_revision(value)
    except CommandError:
        found = None
    # A revision id or its start; not `head` or a branch label, which move on.
    if not isinstance(found, Script) or not found.revision.startswith(value):
        raise SettingsProblem(
            f"pyproject.toml: [tool.migration_lint] baseline = {value!r} is not a revision of"
            f" {relative(Path(script.dir))}; `alembic history` lists them"
        )
    return found.revision


def ancestry(script: ScriptDirectory, revision: str) -> set[str]:
    """`revision` and every revision it comes after (down revisions and dependencies)."""
    seen, todo = set(), [revision]
    while todo:
        current = script.get_revision(todo.pop())
        if current.revision not in seen:
            seen.add(current.revision)
            todo += [*as_tuple(current.down_revision), *as_tuple(current.dependencies)]
    return seen


def as_tuple(value: str | Iterable[str] | None) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value or ())


def relative(path: Path) -> str:
    path = path.resolve()
    return path.relative_to(PROJECT_DIR).as_posix() if path.is_relative_to(PROJECT_DIR) else str(path)


HISTORY = load_history()


# Markers in the revision files


@dataclass
class Markers:
    accepted: set[str] = field(default_factory=set)  # squawk-ignore RULE, ...: reason
    skip: str | None = None  # squawk-skip: reason
    problems: list[str] = field(default_factory=list)  # markers without a reason


def markers(revision: Script) -> Markers:
    found = Markers()
    path = Path(revision.path)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if match := IGNORE.match(line):
            found.accepted.update(re.split(r"[,\s]+", match["rules"]))
            if not match["reason"]:
                found.problems.append(
                    f"{relative(path)}:{number}: say why the rule is safe here:"
                    f" `# squawk-ignore {match['rules']}: <reason>`"
                )
        elif match := SKIP.match(line):
            found.skip = match["reason"]
            if not match["reason"]:
                found.problems.append(
                    f"{relative(path)}:{number}: say why the lint leaves this revision out:"
                    " `# squawk-skip: <reason>`"
                )
    return found


# Each revision's SQL, written offline


@dataclass
class Written:
    sql: dict[str, str] = field(default_factory=dict)  # revision id -> its script, as --sql writes it alone
    failures: dict[str, str] = field(default_factory=dict)  # revision id -> why Alembic could not write it


def write(revisions: list[Script]) -> Written:
    """The SQL of each of `revisions` (oldest first), as `alembic upgrade <down>:<rev> --sql`
    writes it alone; one Alembic run writes a whole chain.

    A revision that cannot be written stops its run: the failure is recorded, and the
    rest of the chain is written from that revision on.
    """
    written, parts, end = Written(), {}, None
    for chain in chains(revisions):
        start = start_of(chain[0], parts)
        while chain:
            sql, error = offline_sql(start, chain[-1].revision)
            setup, steps, rest = split(sql)
            # The last step of a run that failed is that of the revision being written.
            complete = dict(steps[:-1] if error else steps)
            parts |= {r.revision: setup + complete[r.revision] for r in chain if r.revision in complete}
            if error is None:
                end = rest
                break
            failed = next(revision for revision in chain if revision.revision not in complete)
            written.failures[failed.revision] = cannot_write(failed, error, steps[-1][0] if steps else None)
            start, chain = failed.revision, chain[chain.index(failed) + 1 :]
    if end is None and parts:
        # Every run stopped early: a revision that was written, alone, shows how a script ends.
        revision = HISTORY.script.get_revision(next(iter(parts)))
        sql, error = offline_sql(start_of(revision, parts), revision.revision)
        end = "" if error else split(sql)[2]
    written.sql = {revision: part + (end or "") for revision, part in parts.items()}
    return written


def chains(revisions: list[Script]) -> list[list[Script]]:
    """`revisions` in chains: each revision in a chain has the one before it as its only parent."""
    found: list[list[Script]] = []
    ending_at: dict[str, list[Script]] = {}
    for revision in revisions:
        parent = revision.down_revision if isinstance(revision.down_revision, str) else None
        chain = ending_at.pop(parent, None) if parent and not revision.dependencies else None
        if chain is None:
            chain = []
            found.append(chain)
        chain.append(revision)
        ending_at[revision.revision] = chain
    return found


def start_of(revision: Script, written: Collection[str]) -> str | None:
    """Where the SQL of `revision` starts: its parent; for a merge, the parent whose range
    brings along the fewest other revisions that were not `written` (left out, or failed)."""
    parents = as_tuple(revision.down_revision)
    if len(parents) < 2:
        return parents[0] if parents else None
    own = ancestry(HISTORY.script, revision.revision) - {revision.revision}

    def cost(parent: str) -> tuple[int, int]:
        others = own - ancestry(HISTORY.script, parent)
        return len(others - set(written)), len(others)

    return min(parents, key=cost)


def offline_sql(start: str | None, end: str) -> tuple[str, Exception | None]:
    """What `alembic upgrade <start>:<end> --sql` writes, and the error that stopped it."""
    output = io.StringIO()
    config = Config(str(PROJECT_DIR / "alembic.ini"), output_buffer=output)
    config.attributes["configure_logger"] = False  # pytest's logging stays as it is
    try:
        command.upgrade(config, f"{start}:{end}" if start else end, sql=True)
    except Exception as exc:  # the code of a revision raised: that revision's failure, reported
        return output.getvalue(), exc
    return output.getvalue(), None


def split(sql: str) -> tuple[str, list[tuple[str, str]], str]:
    """One run's SQL as: what comes before the revisions, each revision's step, what comes after.

    Alembic starts a step with a `-- Running upgrade` comment and ends it with the line that
    records the revision in the version table (its column is version_num). Between two
    steps, env.py may end one revision's transaction and begin the next one's: what comes
    before and after the steps of a run frames each step the way --sql frames it alone.
    """
    starts = list(STEP.finditer(sql))
    if not starts:
        return sql, [], ""
    before = sql[: starts[0].start()]
    # The version table is created just before the first revision, as part of its step.
    created = VERSION_TABLE.search(before)
    if created:
        before = before[: created.start()]
    steps, after = [], ""
    for match, stop in zip(starts, [match.start() for match in starts[1:]] + [len(sql)], strict=True):
        step = sql[(created.start() if created and not steps else match.start()) : stop]
        recorded = [line.end() for line in RECORDED.finditer(step)]
        end = recorded[-1] if recorded else len(step)
        steps.append((match["revision"], step[:end]))
        after = step[end:]
    return before, steps, after


def cannot_write(revision: Script, error: Exception, culprit: str | None) -> str:
    """One line: the revision whose SQL Alembic could not write, and why."""
    message = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
    if culprit and culprit != revision.revision:
        # A merge's SQL starts from one parent: the other branch is written along with it.
        culprit_script = HISTORY.script.get_revision(culprit)
        reason += f", raised by {relative(Path(culprit_script.path))}, which --sql writes along with it"
        if markers(culprit_script).skip is not None:
            # Left out itself, it cannot be left out of a range that Alembic writes in one go.
            return (
                f"{relative(Path(revision.path))}: alembic cannot write its SQL without a database"
                f" ({reason}); that revision is left out of the lint, and so must this merge be:"
                " # squawk-skip: <reason>"
            )
    return (
        f"{relative(Path(revision.path))}: alembic cannot write its SQL without a database ({reason});"
        " if it must read rows or commit on its own, leave it out of the lint with a comment line"
        " that says why: # squawk-skip: <reason>"
    )


# squawk, and where its advice is wrong for PostgreSQL


def squawk(sql: dict[str, str]) -> dict[str, list[dict]]:
    """squawk's findings for each SQL text, by key: one squawk run for all of them."""
    # The squawk installed next to this interpreter (the test extra), even when the venv is not active.
    executable = shutil.which("squawk", path=sysconfig.get_path("scripts")) or shutil.which("squawk")
    if executable is None:
        pytest.fail("squawk is missing: pip install -e '.[test]' installs squawk-cli", pytrace=False)
    files = {f"{key}.sql": key for key in sql}
    with tempfile.TemporaryDirectory(prefix="migration-lint-") as directory:
        for name, key in files.items():
            Path(directory, name).write_text(sql[key], encoding="utf-8")
        result = subprocess.run(
            [executable, "--config", str(SQUAWK_CONFIG), "--reporter", "json", *files],
            cwd=directory,
            capture_output=True,
            text=True,
        )
    try:
        reported = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"squawk failed (exit {result.returncode}):\n{result.stderr}", pytrace=False)
    findings: dict[str, list[dict]] = {key: [] for key in sql}
    for finding in reported:
        findings[files[finding["file"]]].append(finding)
    return findings


NAME = r'(?:"[^"]+"|[\w$]+)(?:\.(?:"[^"]+"|[\w$]+))?'
NAMES = rf"{NAME}(?:\s*,\s*{NAME})*"
# PostgreSQL refuses NOT VALID on these; squawk's own rules for them ask for USING INDEX.
KEY_CONSTRAINT = re.compile(r'ADD\s+(?:CONSTRAINT\s+(?:"[^"]+"|\S+)\s+)?(?:PRIMARY\s+KEY|UNIQUE)\b', re.I)
# Stable, not volatile: PostgreSQL 11+ adds a column with such a default without a rewrite.
STABLE_DEFAULT = re.compile(
    r"(?:CURRENT_DATE|CURRENT_TIME|CURRENT_TIMESTAMP|LOCALTIME|LOCALTIMESTAMP)(?:\s*\(\s*\d+\s*\))?", re.I
)
CREATE_INDEX = re.compile(
    rf"CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:CONCURRENTLY\s+)?(?:IF\s+NOT\s+EXISTS\s+)?(?P<index>{NAME})"
    rf"\s+ON\s+(?:ONLY\s+)?(?P<table>{NAME})",
    re.I,
)
DROP_INDEX = re.compile(rf"DROP\s+INDEX\s+(?:CONCURRENTLY\s+)?(?:IF\s+EXISTS\s+)?(?P<names>{NAMES})", re.I)
DROP_TABLE = re.compile(rf"DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?P<names>{NAMES})", re.I)
# What squawk cannot see in the SQL, where its message may not apply (README.md).
NOTES = {
    "changing-column-type": (
        "PostgreSQL rewrites nothing, and holds the lock only for a moment, when the new type is"
        " binary-compatible with the old one: text or varchar(n) to text or to varchar without a"
        " length, varchar(n) to a longer varchar. The SQL does not show the old type: if so, accept the rule"
    ),
    "require-concurrent-index-deletion": (
        "dropping an index of a table that the same revision drops adds no lock to the DROP TABLE;"
        " the lint knows which table an index is on only when the linted revisions create it:"
        " if so, accept the rule"
    ),
}


def names(text: str) -> list[tuple[str, ...]]:
    """The (qualified) names listed in `text`, as PostgreSQL reads them."""
    parts = [re.findall(r'"[^"]+"|[\w$]+', name) for name in re.findall(NAME, text)]
    return [tuple(part[1:-1] if part.startswith('"') else part.lower() for part in name) for name in parts]


def index_tables(sql: Iterable[str]) -> dict[str, set[tuple[str, ...]]]:
    """Each index name that `sql` creates, and the tables that it creates one of that name on."""
    tables: dict[str, set[tuple[str, ...]]] = {}
    for text in sql:
        for match in CREATE_INDEX.finditer(text):
            tables.setdefault(names(match["index"])[0][-1], set()).update(names(match["table"]))
    return tables


def wrong_advice(finding: dict, target: str, sql: str, indexes: dict[str, set[tuple[str, ...]]]) -> bool:
    """Whether the SQL shows `finding` wrong for PostgreSQL: advice that it rejects, or a
    rewrite or lock that it does not take. `target` is the text that squawk points at."""
    rule = finding["rule_name"]
    if rule == "constraint-missing-not-valid":
        return KEY_CONSTRAINT.match(target) is not None
    if rule == "adding-field-with-default":
        return STABLE_DEFAULT.fullmatch(target) is not None
    if rule == "require-concurrent-index-deletion":
        # An index that the linted revisions create on a table that this one drops, and on
        # no other table: DROP TABLE takes the lock that DROP INDEX takes on it.
        dropped = {table for match in DROP_TABLE.finditer(sql) for table in names(match["names"])}
        match = DROP_INDEX.match(target)
        return match is not None and all(
            0 < len(indexes.get(index[-1], ())) and indexes[index[-1]] <= dropped
            for index in names(match["names"])
        )
    return False


def pointed_at(lines: list[str], finding: dict) -> str:
    """The text that `finding` points at (squawk counts columns in UTF-8 bytes)."""
    first, last = finding["line"], finding["line_end"]
    text = "\n".join(lines[first : last + 1]).encode()
    end = len(text) - len(lines[last].encode()) + finding["column_end"]
    return text[finding["column"] : end].decode(errors="replace")


# The tests


@dataclass
class Lint:
    markers: dict[str, Markers]
    written: Written
    findings: dict[str, list[dict]]
    indexes: dict[str, set[tuple[str, ...]]]


@pytest.fixture(scope="session")
def lint() -> Lint:
    """Every linted revision's markers, SQL and squawk's findings."""
    found = {revision.revision: markers(revision) for revision in HISTORY.linted}
    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as nothing:
        # No .env in the current directory, no secret files, no settings in the environment.
        patch.chdir(nothing)
        for name in list(os.environ):
            if name.upper().startswith(SETTINGS_PREFIX.upper()) or name.upper() == SECRETS_DIR.upper():
                patch.delenv(name)
        patch.setenv(SECRETS_DIR, nothing)
        patch.setenv(SETTINGS_PREFIX + "URL", OFFLINE_URL)
        written = write([revision for revision in HISTORY.linted if found[revision.revision].skip is None])
    findings = squawk(written.sql) if written.sql else {}
    return Lint(found, written, findings, index_tables(written.sql.values()))


def test_lint_settings() -> None:
    """[tool.migration_lint] in pyproject.toml, when there is one, makes sense."""
    if HISTORY.problem:
        pytest.fail(HISTORY.problem, pytrace=False)


@pytest.mark.parametrize("revision", HISTORY.linted, ids=lambda revision: Path(revision.path).name)
def test_revision_is_safe_for_postgresql(revision: Script, lint: Lint) -> None:
    path, marked = Path(revision.path), lint.markers[revision.revision]
    if marked.problems:
        pytest.fail("\n".join(marked.problems), pytrace=False)
    if marked.skip:
        pytest.skip(f"{relative(path)}: squawk-skip: {marked.skip}")
    if revision.revision in lint.written.failures:
        pytest.fail(lint.written.failures[revision.revision], pytrace=False)
    sql = lint.written.sql.get(revision.revision)
    if sql is None:
        pytest.fail(f"{relative(path)}: alembic upgrade --sql wrote nothing for it", pytrace=False)
    lines = sql.split("\n")
    findings = [
        finding
        for finding in lint.findings[revision.revision]
        if finding["rule_name"] not in marked.accepted
        and not wrong_advice(finding, pointed_at(lines, finding), sql, lint.indexes)
    ]
    if findings:
        report = [f"{relative(path)}: operations that can lock or break production:"]
        for finding in findings:
            rule = finding["rule_name"]
            statement = " ".join(line.strip() for line in lines[finding["line"] : finding["line_end"] + 1])
            report += [f"  {rule}: {finding['message']}", f"    in: {statement}"]
            if finding.get("help"):
                report.append(f"    help: {finding['help']}")
            if rule in NOTES:
                report.append(f"    note: {NOTES[rule]}")
            report.append(f"    docs: https://squawkhq.com/docs/{rule}")
        report.append(
            "Rewrite it the safe way (README.md, 'Migration safety lint'), or accept a rule in the"
            " revision with a comment that says why: # squawk-ignore RULE: reason"
        )
        pytest.fail("\n".join(report), pytrace=False)
