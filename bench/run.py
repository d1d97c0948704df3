"""Benchmarks: the rendered environment against the stock `alembic init -t async` one.

    python bench/run.py                  # the table; exit 1 when a target is missed
    python bench/run.py --repeat 3 --no-suite

Both environments run as users run them (the `alembic` CLI, one process per command)
against the same database on a throwaway PostgreSQL cluster with password (scram)
authentication, over the same generated revisions, interleaved run by run so that
machine load falls on both alike. Each figure is the median of --repeat runs, after
one warm-up run (bytecode compiled, files cached). The stock environment takes its
URL from alembic.ini, as its README says (% escaped as %%); ours from DATABASE_URL.
More environments take their turns too, to compare like with like: the stock one with
the same gc.freeze() call as ours; the stock one with that call and a transaction per
revision (transaction_per_migration=True), as ours runs them; and ours without the call.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from rendering import subprocess_env  # noqa: E402  (the test suite's helper)
from servers import postgres_cluster  # noqa: E402  (the test suite's throwaway cluster)

REVISION = '''"""bench {number}"""

import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = {down_revision!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bench_{number}",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("bench_{number}")
'''


@dataclass
class Row:
    name: str
    ours: float
    baseline: float | None
    target: str
    met: bool | None
    # CPU time (user + system) of the measured processes, not of the database server:
    # a second view that the other users of the machine disturb less than wall time.
    cpu_ratio: float | None = None

    @property
    def ratio(self) -> float | None:
        return self.ours / self.baseline if self.baseline else None


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(args: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> tuple[float, float]:
    """Wall time and CPU time of one run of `args`."""
    cpu, start = cpu_of_children(), time.perf_counter()
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if check and result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed in {cwd}:\n{result.stdout}{result.stderr}")
    return elapsed, cpu_of_children() - cpu


def write_revisions(versions: Path, count: int) -> None:
    versions.mkdir(parents=True, exist_ok=True)
    down = None
    for number in range(1, count + 1):
        revision = f"b{number:04d}"
        source = REVISION.format(number=f"{number:04d}", revision=revision, down_revision=down)
        (versions / f"{revision}_bench.py").write_text(source)
        down = revision


def render_ours(template: Path, output: Path) -> Path:
    """The default render (PostgreSQL), as `cookiecutter --no-input` makes it."""
    subprocess.run(
        [sys.executable, "-m", "cookiecutter", "--no-input", "-o", output, template], check=True, capture_output=True
    )
    (project,) = output.iterdir()
    return project


Figures = dict[str, tuple[float, float]]  # what one run measured: name -> (wall, cpu)


def interleaved(runs: dict[str, Callable[[], Figures]], repeat: int) -> dict[str, Figures]:
    """Median wall and CPU time of each figure of each run.

    The runs take turns (and turns at going first), so that load from elsewhere
    falls on both alike; one warm-up round first (bytecode compiled, files cached).
    """
    times: dict[str, dict[str, list[tuple[float, float]]]] = {name: {} for name in runs}
    for index in range(repeat + 1):
        order = list(runs) if index % 2 else list(runs)[::-1]
        for name in order:
            figures = runs[name]()
            if index > 0:
                for key, value in figures.items():
                    times[name].setdefault(key, []).append(value)
    return {
        name: {key: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for key, v in figs.items()}
        for name, figs in times.items()
    }


def ratio_row(
    name: str,
    medians: dict[str, Figures],
    key: str,
    limit: float | None,
    subject: str = "ours",
    baseline: str = "stock",
) -> Row:
    (ours, ours_cpu), (stock, stock_cpu) = medians[subject][key], medians[baseline][key]
    met = None if limit is None else ours / stock <= limit
    return Row(name, ours, stock, f"<= {limit:.2f}x" if limit else "-", met, ours_cpu / stock_cpu)


def migration_rows(template: Path, work: Path, revisions: int, repeat: int) -> list[Row]:
    """Ours and the stock async environment, on one database, as the CLI runs them."""
    alembic = [sys.executable, "-m", "alembic"]
    with postgres_cluster() as server:
        # A password that needs both URL encoding and, in alembic.ini, %% escaping.
        password = "bench%" + secrets.token_urlsafe(8) + "@:/"
        url = server.create_database(password=password)
        where = f"{url.username}:{quote(password, safe='')}@{url.host}:{url.port}/{url.database}"

        ours = render_ours(template, work / "ours")
        stock = work / "stock"
        stock.mkdir()
        subprocess.run([*alembic, "init", "-t", "async", "migrations"], cwd=stock, check=True, capture_output=True)
        ini = stock / "alembic.ini"
        ini.write_text(
            "".join(
                f"sqlalchemy.url = postgresql+asyncpg://{where.replace('%', '%%')}\n"
                if line.startswith("sqlalchemy.url")
                else line
                for line in ini.read_text().splitlines(keepends=True)
            )
        )
        # Like for like (issue 11): the stock env.py with the same gc.freeze() call as ours,
        # and ours without it, so that the table shows what the call earns.
        stock_frozen, ours_unfrozen = work / "stock-frozen", work / "ours-unfrozen"
        shutil.copytree(stock, stock_frozen)
        env_py = stock_frozen / "migrations" / "env.py"
        env_py.write_text(env_py.read_text().replace("config = context.config\n", FREEZE, 1))
        # And the stock env.py doing what issue 9 made ours do: a transaction per revision.
        stock_per_revision = work / "stock-per-revision"
        shutil.copytree(stock_frozen, stock_per_revision)
        env_py = stock_per_revision / "migrations" / "env.py"
        source = env_py.read_text()
        online = "connection=connection, target_metadata=target_metadata)"
        if source.count(online) != 1:
            raise SystemExit(f"{env_py} configures the online context differently: update bench/run.py")
        env_py.write_text(source.replace(online, online[:-1] + ", transaction_per_migration=True)"))
        shutil.copytree(ours, ours_unfrozen)
        env_py = ours_unfrozen / "migrations" / "env.py"
        source = env_py.read_text()
        if "    gc.freeze()\n" not in source:
            raise SystemExit(f"{env_py} no longer calls gc.freeze(): update bench/run.py")
        env_py.write_text(source.replace("    gc.freeze()\n", "    pass\n", 1))
        for project in (ours, stock, stock_frozen, stock_per_revision, ours_unfrozen):
            write_revisions(project / "migrations" / "versions", revisions)

        def one_pass(cwd: Path, env: dict[str, str]) -> Callable[[], Figures]:
            # Up from base, current at head, down to base, offline SQL: the database
            # ends as it began, for the other environment's turn.
            return lambda: {
                "upgrade": timed([*alembic, "upgrade", "head"], cwd, env),
                "current": timed([*alembic, "current"], cwd, env),
                "downgrade": timed([*alembic, "downgrade", "base"], cwd, env),
                "sql": timed([*alembic, "upgrade", "head", "--sql"], cwd, env),
            }

        ours_env = subprocess_env(DATABASE_URL=f"postgresql://{where}")
        medians = interleaved(
            {
                "ours": one_pass(ours, ours_env),
                "stock": one_pass(stock, subprocess_env()),
                "stock+freeze": one_pass(stock_frozen, subprocess_env()),
                "stock-per-revision": one_pass(stock_per_revision, subprocess_env()),
                "ours-unfrozen": one_pass(ours_unfrozen, ours_env),
            },
            repeat,
        )
    return [
        ratio_row("alembic current (at head)", medians, "current", 1.15),
        ratio_row(f"alembic upgrade head ({revisions} revisions)", medians, "upgrade", 1.05),
        ratio_row(f"alembic downgrade base ({revisions} revisions)", medians, "downgrade", 1.05),
        ratio_row(f"alembic upgrade head --sql ({revisions} revisions)", medians, "sql", None),
        *(
            ratio_row(f"  {key}: {label}", medians, key, None, subject, baseline)
            for label, subject, baseline in LIKE_FOR_LIKE
            for key in ("current", "upgrade", "downgrade")
        ),
    ]


# Like for like (issue 11): what the gc.freeze() call earns, and what the rest costs.
LIKE_FOR_LIKE = [
    ("ours / stock + gc.freeze()", "ours", "stock+freeze"),
    ("ours / stock + gc.freeze() + transaction per revision", "ours", "stock-per-revision"),
    ("ours without gc.freeze() / stock", "ours-unfrozen", "stock"),
]
# What ours does, at the same place: after the imports, before the logging set-up.
FREEZE = "config = context.config\n\nimport gc  # noqa: E402\n\ngc.freeze()\n"


def render_rows(template: Path, work: Path, repeat: int) -> list[Row]:
    """`cookiecutter --no-input` of this template against `alembic init -t async`."""
    counter = iter(range(10**6))

    def cookiecutter() -> Figures:
        output = work / f"render-{next(counter)}"
        return {"render": timed([sys.executable, "-m", "cookiecutter", "--no-input", "-o", str(output), str(template)],
                                work, subprocess_env())}  # fmt: skip

    def alembic_init() -> Figures:
        directory = work / f"init-{next(counter)}"
        directory.mkdir()
        return {"render": timed([sys.executable, "-m", "alembic", "init", "-t", "async", "migrations"],
                                directory, subprocess_env())}  # fmt: skip

    medians = interleaved({"ours": cookiecutter, "stock": alembic_init}, repeat)
    return [ratio_row("render: cookiecutter --no-input / alembic init -t async", medians, "render", 1.5)]


def suite_row() -> Row:
    """The template's whole test suite as the README runs it, database start included."""
    args = [sys.executable, "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider"]
    start = time.perf_counter()
    result = subprocess.run(args, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    summary = result.stdout.strip().splitlines()[-1].strip("= ") if result.stdout.strip() else "no output"
    # A failing test does not stop the benchmark, but the row says so.
    name = "template test suite (pytest -n 2), wall time" + ("" if result.returncode == 0 else f" [{summary}]")
    return Row(name, elapsed, None, "< 120 s", elapsed < 120)


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor() or "?",
    )  # fmt: skip
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    versions = ", ".join(f"{name} {version(name)}" for name in ("alembic", "sqlalchemy", "asyncpg", "cookiecutter"))
    return f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, {versions}; load {load}"


def print_table(rows: list[Row]) -> None:
    header = f"{'measurement':<68} {'ours':>9} {'stock':>9} {'ratio':>7} {'cpu':>7}  {'target':<9} result"
    print(header)
    print("-" * len(header))
    for row in rows:
        stock = f"{row.baseline:8.3f}s" if row.baseline else f"{'-':>9}"
        ratio = f"{row.ratio:6.2f}x" if row.ratio else f"{'-':>7}"
        cpu = f"{row.cpu_ratio:6.2f}x" if row.cpu_ratio else f"{'-':>7}"
        result = {True: "met", False: "MISSED", None: ""}[row.met]
        print(f"{row.name:<68} {row.ours:8.3f}s {stock} {ratio} {cpu}  {row.target:<9} {result}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per figure (median; default 7)")
    parser.add_argument("--revisions", type=int, default=200, help="generated revisions (default 200)")
    parser.add_argument("--no-suite", action="store_true", help="skip timing the template's test suite")
    parser.add_argument(
        "--template", type=Path, default=ROOT, help="render this copy of the template instead (to try a change)"
    )
    args = parser.parse_args()

    print(f"machine: {machine()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        rows = migration_rows(args.template, work, args.revisions, args.repeat)
        rows += render_rows(args.template, work, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.no_suite:
        rows.append(suite_row())
    print()
    print_table(rows)
    print(
        f"\nwall times: median of {args.repeat} runs each, after one warm-up; ratio = ours / stock,"
        " measured in this run; cpu = the same ratio of the CLI processes' CPU time"
    )
    print(f"load after: {', '.join(f'{value:.2f}' for value in os.getloadavg())}")
    if any(row.met is False for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
