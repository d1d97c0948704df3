# The default render's tests/test_migration_lint.py before the lint ran in one process (template
# commit 4fed1d9): one alembic and one squawk process per revision. bench/lint.py copies it into
# a render and times it as the baseline; it is kept as it was, not maintained.
"""Safety lint: squawk checks each revision's SQL for operations that lock or break production.

Each revision's SQL comes from `alembic upgrade <down>:<rev> --sql`, which needs no
database. squawk's settings, and why some of its rules are off, are in .squawk.toml.

A revision may accept one of squawk's rules, with a comment line that says why:

    # squawk-ignore adding-required-field: the table is created empty two revisions back

README.md ("Migration safety lint") shows the safe way to write what the lint rejects.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import Script, ScriptDirectory

PROJECT_DIR = Path(__file__).resolve().parent.parent
SQUAWK_CONFIG = PROJECT_DIR / ".squawk.toml"
# --sql builds the URL from the settings but never connects: any PostgreSQL URL will do.
OFFLINE_ENV = {"DATABASE_URL": "postgresql://lint@localhost/lint"}
OPT_OUT = re.compile(r"^\s*#\s*squawk-ignore\s+(?P<rules>[^:]+?)\s*(?::\s*(?P<reason>.*?))?\s*$")


def revisions() -> list[Script]:
    """Every revision, from the first to the head."""
    script = ScriptDirectory.from_config(Config(str(PROJECT_DIR / "alembic.ini")))
    return list(reversed(list(script.walk_revisions())))


def revision_sql(revision: Script) -> str:
    """The SQL that upgrading to `revision` runs, from the revision before it."""
    down = revision.down_revision
    # A merge revision has several: start from one, keep only this revision's part below.
    start = down[0] if isinstance(down, tuple) else down
    target = f"{start}:{revision.revision}" if start else revision.revision
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", target, "--sql"],
        cwd=PROJECT_DIR,
        env={**os.environ, **OFFLINE_ENV},
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.fail(f"alembic upgrade {target} --sql failed:\n{result.stderr}", pytrace=False)
    return own_part(result.stdout, revision.revision)


def own_part(sql: str, revision: str) -> str:
    """`sql` without the steps of other revisions, which a merge's range includes.

    Alembic starts each step with a `-- Running upgrade A -> B` comment; the
    revision's own step is the last one, and the transaction opens before the first.
    """
    first, *steps = re.split(r"(?m)^(?=-- Running upgrade )", sql)
    if len(steps) > 1 and re.match(rf"-- Running upgrade .*-> {revision}$", steps[-1], re.MULTILINE):
        return first + steps[-1]
    return sql


def relative(path: Path) -> str:
    return path.relative_to(PROJECT_DIR).as_posix()


def opt_outs(path: Path) -> set[str]:
    """The rules that the revision file accepts, each with a reason."""
    accepted = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = OPT_OUT.match(line)
        if match is None:
            continue
        if not match["reason"]:
            pytest.fail(
                f"{relative(path)}:{number}: say why the rule is safe here:"
                f" `# squawk-ignore {match['rules']}: <reason>`",
                pytrace=False,
            )
        accepted.update(re.split(r"[,\s]+", match["rules"]))
    return accepted


def squawk(sql: str, path: Path) -> list[dict]:
    """squawk's findings for `sql`, reported against the revision file."""
    # The squawk installed next to this interpreter (the test extra), even when the venv is not active.
    search_path = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    executable = shutil.which("squawk", path=search_path)
    if executable is None:
        pytest.fail("squawk is missing: pip install -e '.[test]' installs squawk-cli", pytrace=False)
    result = subprocess.run(
        [executable, "--config", str(SQUAWK_CONFIG), "--reporter", "json", "--stdin-filepath", path.name],
        input=sql,
        capture_output=True,
        text=True,
    )
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"squawk failed (exit {result.returncode}):\n{result.stderr}", pytrace=False)


@pytest.mark.parametrize("revision", revisions(), ids=lambda revision: Path(revision.path).name)
def test_revision_is_safe_for_postgresql(revision: Script) -> None:
    path = Path(revision.path)
    sql = revision_sql(revision)
    accepted = opt_outs(path)
    findings = [finding for finding in squawk(sql, path) if finding["rule_name"] not in accepted]
    if findings:
        lines = sql.splitlines()
        report = [f"{relative(path)}: operations that can lock or break production:"]
        for finding in findings:
            statement = " ".join(line.strip() for line in lines[finding["line"] : finding["line_end"] + 1])
            report += [f"  {finding['rule_name']}: {finding['message']}", f"    in: {statement}"]
            if finding.get("help"):
                report.append(f"    help: {finding['help']}")
            report.append(f"    docs: https://squawkhq.com/docs/{finding['rule_name']}")
        report.append(
            "Rewrite it the safe way (README.md, 'Migration safety lint'), or accept a rule in the"
            " revision with a comment that says why: # squawk-ignore RULE: reason"
        )
        pytest.fail("\n".join(report), pytrace=False)
