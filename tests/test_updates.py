"""Generated projects take template updates with cruft.

A copy of the template becomes a git repository (commit A). A project is generated
from it, committed, and changed the way its team would (a model, a revision, a README
section). The template then changes one rendered file (commit B): `cruft check` says
the project is out of date, `cruft update --skip-apply-ask` brings the change in and nothing else,
and `cruft check` says it is up to date. cruft re-runs both hooks on every update:
this only works because they have no side effects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rendering import Project, copy_template, render, subprocess_env

SLUG_DIR = "{{cookiecutter.project_slug}}"
# Non-default answers, so that a project re-rendered with the wrong ones shows it.
ANSWERS = {"project_name": "Billing API", "env_prefix": "APP_", "database": "sqlite"}
# Template commit B: a line added to one rendered file, naming an answer.
CHANGE = "# Template change B: the URL comes from {{ cookiecutter.env_prefix }}DATABASE_URL.\n"
CHANGE_RENDERED = "# Template change B: the URL comes from APP_DATABASE_URL."
# Neither a user's nor a machine's git configuration takes part.
GIT_ENV = {
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Template Tests",
    "GIT_AUTHOR_EMAIL": "tests@example.invalid",
    "GIT_COMMITTER_NAME": "Template Tests",
    "GIT_COMMITTER_EMAIL": "tests@example.invalid",
}


def run(*args: str | Path, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        env=subprocess_env(**GIT_ENV),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert result.returncode == 0, f"{' '.join(map(str, args))}:\n{result.stdout}{result.stderr}"
    return result


def cruft(*args: str | Path, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "cruft", *args, cwd=cwd, check=check)


def commit_all(repo: Path, message: str) -> str:
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-q", "-m", message, cwd=repo)
    return run("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()


def template_repo(path: Path) -> tuple[Path, str]:
    """A git repository holding a copy of the template (as it is on disk); its commit."""
    copy_template(path)
    run("git", "init", "-q", "-b", "main", cwd=path)
    return path, commit_all(path, "A")


def generate_with_cruft(template: Path, output: Path) -> Path:
    cruft("create", "--no-input", "--default-config", "--extra-context", json.dumps(ANSWERS),
          "--output-dir", output, template, cwd=output)  # fmt: skip
    return output / "billing-api"


def generate_with_cookiecutter_then_link(template: Path, output: Path, commit: str) -> Path:
    """The README's plain path: `cookiecutter`, then `cruft link` with the recorded answers."""
    project = render(output, template=template, **ANSWERS)
    answers = (project / ".cookiecutter.json").read_text()
    cruft("link", "--no-input", "--checkout", commit, "--extra-context", answers, template, cwd=project)
    return project


@pytest.mark.parametrize("generated_by", ["cruft-create", "cookiecutter-then-cruft-link"])
def test_template_update_reaches_a_generated_project(tmp_path: Path, generated_by: str) -> None:
    template, commit_a = template_repo(tmp_path / "template")
    output = tmp_path / "projects"
    output.mkdir()
    if generated_by == "cruft-create":
        path = generate_with_cruft(template, output)
    else:
        path = generate_with_cookiecutter_then_link(template, output, commit_a)

    # What `cruft update` re-renders with: the template, its commit, and the answers.
    state = json.loads((path / ".cruft.json").read_text())
    assert state["commit"] == commit_a
    recorded = json.loads((path / ".cookiecutter.json").read_text())
    assert {name: recorded[name] for name in ANSWERS} == ANSWERS
    assert {name: state["context"]["cookiecutter"].get(name) for name in recorded} == recorded

    # The team's repository, and their work in it.
    run("git", "init", "-q", "-b", "main", cwd=path)
    commit_all(path, "generated")
    project = Project(path, "billing_api")
    project.add_thing()
    with (path / "README.md").open("a") as readme:
        readme.write("\n## Our runbook\n\nSomething the team wrote.\n")
    commit_all(path, "our work")
    ours = {name: (path / name).read_text() for name in ("billing_api/models.py", "README.md")}

    ini = template / SLUG_DIR / "alembic.ini"
    ini.write_text(ini.read_text() + CHANGE)
    commit_all(template, "B")

    stale = cruft("check", cwd=path, check=False)
    assert stale.returncode == 1 and "out of date" in stale.stdout, stale.stdout + stale.stderr

    update = cruft("update", "--skip-apply-ask", cwd=path)

    assert CHANGE_RENDERED in (path / "alembic.ini").read_text(), update.stdout + update.stderr
    # The change and the new cruft state, nothing else: no conflict, no stray file, the
    # team's work as it was.
    run("git", "add", "-A", cwd=path)
    changed = run("git", "diff", "--cached", "--name-status", cwd=path).stdout.splitlines()
    assert changed == ["M\t.cruft.json", "M\talembic.ini"], update.stdout + update.stderr
    assert {name: (path / name).read_text() for name in ours} == ours
    assert json.loads((path / ".cruft.json").read_text())["commit"] != commit_a

    fresh = cruft("check", cwd=path, check=False)
    assert fresh.returncode == 0 and "up to date" in fresh.stdout, fresh.stdout + fresh.stderr
