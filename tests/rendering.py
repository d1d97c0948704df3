"""Rendering the template and running Alembic in the rendered project."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from alembic.config import Config
from cookiecutter.main import cookiecutter
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

TEMPLATE = Path(__file__).resolve().parent.parent

THING_MODEL = """
from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column


class Thing(Base):
    __tablename__ = "thing"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
"""

# The revision that creates the Thing model's table (Project.add_thing).
THING_UPGRADE = """
op.create_table(
    "thing",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("name", sa.String(length=100), nullable=False),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_thing")),
)
"""


def render(output_dir: Path, template: Path = TEMPLATE, **answers: str) -> Path:
    """Render the template with `answers` (defaults for the rest); the project's path."""
    return Path(cookiecutter(str(template), no_input=True, extra_context=answers, output_dir=str(output_dir)))


def subprocess_env(*, inherit: bool = True, **extra: str) -> dict[str, str]:
    """The environment for a subprocess, plus `extra`: this one's without the machine's
    database settings and pytest's variables (a nested pytest must not think it is this
    one); with inherit=False, only the system's PATH, as a fresh shell with nothing set up
    (no virtual environment, no PYTHONPATH) has it."""
    if not inherit:
        return {"PATH": "/usr/bin:/bin", **extra}
    inherited = {k: v for k, v in os.environ.items() if "DATABASE_" not in k and not k.startswith("PYTEST_")}
    return {**inherited, **extra}


def tool(name: str) -> str:
    """A command-line checker from the test dependency group, next to this interpreter."""
    path = shutil.which(name, path=sysconfig.get_path("scripts")) or shutil.which(name)
    assert path, f"{name} is missing: python -m pip install --group test"
    return path


def copy_template(destination: Path) -> Path:
    """A copy of the template alone (no tests, benchmarks, caches or git), to change freely."""
    ignore = shutil.ignore_patterns(".git", ".venv*", "tests", "bench", "__pycache__", ".*_cache")
    shutil.copytree(TEMPLATE, destination, ignore=ignore)
    return destination


def files_under(root: Path) -> dict[str, bytes]:
    """Every file under `root`, by its relative path."""
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def readme_block(readme: Path, marker: str) -> list[str]:
    """The lines of the ```bash block that follows `<!-- marker` in `readme`."""
    text = readme.read_text()
    match = re.search(rf"<!-- {marker}[^\n]*-->\n```bash\n(.*?)\n```", text, re.DOTALL)
    assert match, f"{readme.name} has no `<!-- {marker} ... -->` bash block"
    return [line.strip() for line in match[1].splitlines() if line.strip()]


def revision_source(
    revision: str, down: str | tuple[str, ...] | None, upgrade: str, downgrade: str = "pass", *, comment: str = ""
) -> str:
    """A revision file as `alembic revision` writes one, with `upgrade` and `downgrade` as the
    bodies of its functions (`os`, `sa` and `op` imported), and `comment` lines above upgrade()."""
    comment = f"\n{comment}\n" if comment else ""
    return (
        f'"""{revision}"""\n\nimport os\n\nimport sqlalchemy as sa\nfrom alembic import op\n\n'
        f"revision = {revision!r}\ndown_revision = {down!r}\nbranch_labels = None\ndepends_on = None\n{comment}\n\n"
        f"def upgrade() -> None:\n{textwrap.indent(textwrap.dedent(upgrade).strip(), '    ')}\n\n\n"
        f"def downgrade() -> None:\n{textwrap.indent(textwrap.dedent(downgrade).strip(), '    ')}\n"
    )


def failed_line(result: subprocess.CompletedProcess) -> str:
    """The one FAILED: line Alembic prints for a CommandError (and no traceback)."""
    lines = [line for line in result.stdout.splitlines() if line.startswith("FAILED:")]
    assert result.returncode != 0, result.stdout + result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stdout + result.stderr
    return lines[0]


@dataclass
class Verdict:
    outcome: str  # "passed", "failed" or "skipped"
    message: str


def rendered_pytest(project: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Verdict]:
    """`python -m pytest ARGS` in a rendered project, as its developers run it (with `env`
    added); the verdict on each test, by its name (`test_x`, or `test_x[parameter]`)."""
    report = project / "pytest-report.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider", f"--junitxml={report}", "-q"],
        cwd=project,
        env=subprocess_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report.is_file(), result.stdout + result.stderr
    verdicts = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if problem is not None:
            verdict = Verdict("failed", problem.text or "")
        elif skipped is not None:
            verdict = Verdict("skipped", skipped.get("message", ""))
        else:
            verdict = Verdict("passed", "")
        verdicts[case.get("name", "")] = verdict
    return verdicts


def make_project(tmp_path: Path, **answers: str) -> Project:
    """A render with `answers` (defaults for the rest)."""
    path = render(tmp_path, **answers)
    return Project(path, answers.get("package_name") or path.name.replace("-", "_"))


@dataclass
class Project:
    """A rendered project, and Alembic run in it: in-process, or as the real CLI."""

    path: Path
    package: str

    def config(self) -> Config:
        config = Config(str(self.path / "alembic.ini"))
        # pytest owns logging in-process; the CLI runs below exercise fileConfig.
        config.attributes["configure_logger"] = False
        return config

    @contextlib.contextmanager
    def activated(self) -> Iterator[None]:
        """Run in the project directory; forget its modules afterwards.

        env.py imports the rendered package; several renders share module
        names, so each use starts from a clean sys.modules and sys.path.
        """
        saved_path, saved_cwd = list(sys.path), os.getcwd()
        os.chdir(self.path)
        sys.path.insert(0, str(self.path))
        try:
            yield
        finally:
            os.chdir(saved_cwd)
            sys.path[:] = saved_path
            for name in [n for n in sys.modules if n == self.package or n.startswith(self.package + ".")]:
                del sys.modules[name]

    def module(self, name: str) -> ModuleType:
        """A module of the rendered package (inside activated())."""
        return importlib.import_module(f"{self.package}.{name}")

    def engine(self, url: URL) -> AsyncEngine:
        """The AsyncEngine the rendered package builds for `url` (inside activated())."""
        settings = self.module("settings").DatabaseSettings.load(url=url.render_as_string(hide_password=False))
        return self.module("database").engine_for(settings)

    def cli(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 120,
        cwd: Path | None = None,
        inherit: bool = True,
        network: bool = True,
    ) -> subprocess.CompletedProcess:
        """`alembic ARGS` in a subprocess, in the project directory (or `cwd`), with `env`
        added to the environment (see subprocess_env for `inherit`).

        network=False runs it with no network at all (a namespace of its own, loopback
        down): a host name that a bug would send to a DNS resolver goes nowhere.
        """
        isolated = [] if network else ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
        return subprocess.run(
            [*isolated, sys.executable, "-m", "alembic", *args],
            cwd=cwd or self.path,
            env=subprocess_env(inherit=inherit, **(env or {})),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def add_model(self, source: str) -> None:
        """Append model code (with its own imports) to the rendered models.py."""
        models = self.path / self.package / "models.py"
        models.write_text(models.read_text() + "\n\n" + source.strip() + "\n")

    def add_revision(
        self,
        revision: str,
        down: str | tuple[str, ...] | None,
        upgrade: str,
        downgrade: str = "pass",
        *,
        file_name: str | None = None,
    ) -> Path:
        """migrations/versions/<file_name>, by default <revision>.py (see revision_source)."""
        path = self.path / "migrations" / "versions" / (file_name or f"{revision}.py")
        path.write_text(revision_source(revision, down, upgrade, downgrade))
        return path

    def add_thing(self, *, revision: bool = True) -> None:
        """The Thing model, and (unless revision=False) the revision that creates it."""
        self.add_model(THING_MODEL)
        if revision:
            self.add_revision("0001", None, THING_UPGRADE, 'op.drop_table("thing")', file_name="0001_add_thing.py")
