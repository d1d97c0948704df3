"""Benchmark: the rendered migration safety lint over a long history.

    python bench/lint.py                 # 200 revisions; exit 1 when the target is missed
    python bench/lint.py --revisions 50 --repeat 5

Renders the default project (PostgreSQL, lint on), writes --revisions generated revisions
(one CREATE TABLE each, as bench/run.py writes them) and times the rendered lint as its
users run it: `python -m pytest tests/test_migration_lint.py -q` in the project, no database.
The baseline, in the same render and the same run: the lint as it was before it ran in one
process (bench/per_process_lint.py: one `alembic upgrade <down>:<rev> --sql` process and one
squawk process per revision). Figures are the median of --repeat runs after one warm-up
(bytecode compiled, files cached); the baseline, which takes minutes, runs once.
Target: 200 revisions (or fewer) linted in at most 5 s; exit 1 when missed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

# bench/run.py, next to this file; it puts tests/ on the path for the suite's helpers.
from run import ROOT, render_ours, timed, write_revisions

from rendering import subprocess_env

TARGET_SECONDS = 5.0
TARGET_REVISIONS = 200
BASELINE_LINT = Path(__file__).resolve().parent / "per_process_lint.py"


def lint_seconds(project: Path, test_file: str) -> float:
    """Wall time of one run of the lint in `test_file`, which must pass every revision."""
    args = [sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider"]
    elapsed, _ = timed(args, project, subprocess_env(), check=True)
    return elapsed


def machine() -> str:
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    versions = ", ".join(f"{name} {version(name)}" for name in ("alembic", "sqlalchemy", "pytest", "squawk-cli"))
    return f"{os.cpu_count()} cores, Python {platform.python_version()}, {versions}; load {load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--revisions", type=int, default=TARGET_REVISIONS, help="generated revisions (default 200)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of the lint (median; default 3)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the per-process baseline (minutes)")
    parser.add_argument(
        "--template", type=Path, default=ROOT, help="render this copy of the template instead (to try a change)"
    )
    args = parser.parse_args()

    print(f"machine: {machine()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-lint-"))
    try:
        project = render_ours(args.template, work)
        write_revisions(project / "migrations" / "versions", args.revisions)
        shutil.copy(BASELINE_LINT, project / "tests" / "test_migration_lint_per_process.py")
        lint_seconds(project, "tests/test_migration_lint.py")  # warm-up
        ours = statistics.median(lint_seconds(project, "tests/test_migration_lint.py") for _ in range(args.repeat))
        baseline = None if args.no_baseline else lint_seconds(project, "tests/test_migration_lint_per_process.py")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nlint of {args.revisions} revisions, `pytest tests/test_migration_lint.py`, wall time:")
    print(f"  one process (rendered):       {ours:7.2f} s   (median of {args.repeat})")
    if baseline is not None:
        print(f"  a process per revision (old): {baseline:7.2f} s   (one run)")
        print(f"  ratio one / per revision:     {ours / baseline:7.3f}x ({baseline / ours:.0f} times faster)")
    # The target is for 200 revisions; a shorter history is held to it too.
    met = ours <= TARGET_SECONDS if args.revisions <= TARGET_REVISIONS else None
    result = {True: "met", False: "MISSED", None: f"not checked above {TARGET_REVISIONS} revisions"}[met]
    print(f"  target: <= {TARGET_SECONDS:.0f} s for {TARGET_REVISIONS} revisions: {result}")
    print(f"load after: {', '.join(f'{value:.2f}' for value in os.getloadavg())}")
    if met is False:
        sys.exit(1)


if __name__ == "__main__":
    main()
