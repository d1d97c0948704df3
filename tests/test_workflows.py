"""The GitHub workflows: the template's own and each rendered one.

Both pass the linters a reviewer would run (check-jsonschema's GitHub schemas, zizmor
offline at its strictest persona), hold to the rules the issue sets (read-only token, actions
pinned by commit SHA, no persisted credentials, no secrets), and run the commands their
README documents, so that what CI proves is what a developer runs.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from rendering import TEMPLATE, readme_block, render, tool

PYTHON_VERSIONS = json.loads((TEMPLATE / "cookiecutter.json").read_text())["python_version"]
PINNED = re.compile(r"^[\w.-]+/[\w.-]+@[0-9a-f]{40}$")
VERSION_COMMENT = re.compile(r"@[0-9a-f]{40} # v\d+\.\d+\.\d+$", re.MULTILINE)


def lint_github_dir(github: Path) -> None:
    """check-jsonschema on each workflow and dependabot.yml, zizmor on all of it."""
    workflows = sorted((github / "workflows").glob("*.yml"))
    assert workflows, f"no workflow under {github}"
    checks = [["--builtin-schema", "vendor.github-workflows", *map(str, workflows)]]
    if (github / "dependabot.yml").is_file():
        checks.append(["--builtin-schema", "vendor.dependabot", str(github / "dependabot.yml")])
    for check in checks:
        result = subprocess.run([tool("check-jsonschema"), *check], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    # Pedantic: even code smells fail. A finding accepted on purpose carries a
    # `# zizmor: ignore[audit]` comment with its reason in the workflow itself.
    result = subprocess.run(
        [tool("zizmor"), "--offline", "--persona=pedantic", "--no-progress", "--color=never", str(github)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No findings to report" in result.stdout


def load(workflow: Path) -> dict[str, Any]:
    # PyYAML reads the key `on` as True (YAML 1.1); GitHub reads YAML 1.2.
    data = yaml.safe_load(workflow.read_text())
    data["on"] = data.pop(True, data.get("on"))
    return data


def steps(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def run_lines(workflow: dict[str, Any]) -> list[str]:
    """Every command line the workflow's `run:` steps execute, in order."""
    return [line.strip() for step in steps(workflow) if "run" in step for line in step["run"].splitlines() if line]


def assert_hardened(path: Path) -> None:
    """The rules the issue sets, checked directly: zizmor allows some of them to slip."""
    workflow = load(path)
    assert workflow["permissions"] == {"contents": "read"}
    for job in workflow["jobs"].values():
        assert "permissions" not in job, "a job widens the token"
    uses = [step["uses"] for step in steps(workflow) if "uses" in step]
    assert uses and all(PINNED.match(action) for action in uses), uses
    # Each pin says which release it is, for readers and for Dependabot.
    assert len(VERSION_COMMENT.findall(path.read_text())) == len(uses)
    checkouts = [step for step in steps(workflow) if step.get("uses", "").startswith("actions/checkout@")]
    assert checkouts and all(step["with"]["persist-credentials"] is False for step in checkouts)
    assert not re.search(r"\bsecrets\.\w", path.read_text()), "the workflow reads a secret"
    assert set(workflow["on"]) == {"push", "pull_request"}


# The template repository's workflow


def test_template_workflow_passes_the_linters() -> None:
    lint_github_dir(TEMPLATE / ".github")


def test_template_workflow_is_hardened() -> None:
    assert_hardened(TEMPLATE / ".github" / "workflows" / "tests.yml")


@pytest.mark.parametrize("marker", ["test-command", "lowest-versions-command"])
def test_template_workflow_runs_the_commands_that_ci_run_runs(marker: str) -> None:
    # The very extraction .ci/run uses, so the three cannot drift apart.
    result = subprocess.run(
        ["bash", ".ci/run", "--print", marker], cwd=TEMPLATE, capture_output=True, text=True, check=True
    )
    command = result.stdout.strip()
    assert command and command == " ".join(readme_block(TEMPLATE / "README.md", marker))
    workflow = load(TEMPLATE / ".github" / "workflows" / "tests.yml")
    assert command in run_lines(workflow)


def test_template_workflow_covers_every_supported_python() -> None:
    job = load(TEMPLATE / ".github" / "workflows" / "tests.yml")["jobs"]["tests"]
    assert job["strategy"]["matrix"]["python-version"] == PYTHON_VERSIONS


def test_template_workflow_hands_the_suite_its_service_containers() -> None:
    """TEST_DATABASE_URL / TEST_MYSQL_URL (tests/conftest.py) reach the services as admins."""
    job = load(TEMPLATE / ".github" / "workflows" / "tests.yml")["jobs"]["tests"]
    postgres, mariadb = job["services"]["postgres"], job["services"]["mariadb"]
    pg_url, mysql_url = make_url(job["env"]["TEST_DATABASE_URL"]), make_url(job["env"]["TEST_MYSQL_URL"])
    # The postgres image's superuser: it may CREATE ROLE and CREATE DATABASE.
    assert (pg_url.username, pg_url.password) == ("postgres", postgres["env"]["POSTGRES_PASSWORD"])
    assert f"{pg_url.port}:5432" in postgres["ports"]
    assert (mysql_url.username, mysql_url.password) == ("root", mariadb["env"]["MARIADB_ROOT_PASSWORD"])
    assert f"{mysql_url.port}:3306" in mariadb["ports"]
    assert all("--health-cmd" in service["options"] for service in (postgres, mariadb))


# Rendered projects' workflows

RENDERS = [
    pytest.param({"database": "postgresql"}, id="postgresql"),
    pytest.param({"database": "mysql", "env_prefix": "APP_"}, id="mysql"),
    pytest.param({"database": "sqlite", "python_version": "3.13"}, id="sqlite"),
    pytest.param({"database": "postgresql", "migration_lint": "n"}, id="postgresql-no-lint"),
]


@pytest.fixture(params=RENDERS)
def rendered(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    return render(tmp_path, **request.param), request.param


def test_rendered_workflow_passes_the_linters(rendered: tuple[Path, dict[str, str]]) -> None:
    project, _ = rendered
    lint_github_dir(project / ".github")


def test_rendered_workflow_is_hardened(rendered: tuple[Path, dict[str, str]]) -> None:
    project, _ = rendered
    assert_hardened(project / ".github" / "workflows" / "ci.yml")


def test_rendered_workflow_runs_what_the_readme_documents(rendered: tuple[Path, dict[str, str]]) -> None:
    project, answers = rendered
    workflow = load(project / ".github" / "workflows" / "ci.yml")
    assert run_lines(workflow) == readme_block(project / "README.md", "ci-command")
    setup = next(step for step in steps(workflow) if step.get("uses", "").startswith("actions/setup-python@"))
    assert setup["with"]["python-version"] == answers.get("python_version", PYTHON_VERSIONS[0])


def test_rendered_workflow_starts_the_database_the_project_uses(rendered: tuple[Path, dict[str, str]]) -> None:
    project, answers = rendered
    job = load(project / ".github" / "workflows" / "ci.yml")["jobs"]["migrations"]
    if answers["database"] == "sqlite":
        # The rendered tests use a temporary SQLite file: no server, no URL.
        assert "services" not in job and "TEST_DATABASE_URL" not in job.get("env", {})
        return
    # The URL reaches the database the container creates, as the user it creates.
    url = make_url(job["env"]["TEST_DATABASE_URL"])
    [(name, service)] = job["services"].items()
    if answers["database"] == "postgresql":
        assert (name, url.get_backend_name()) == ("postgres", "postgresql")
        expected = ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", 5432)
    else:
        assert (name, url.get_backend_name()) == ("mariadb", "mysql")
        expected = ("MARIADB_USER", "MARIADB_PASSWORD", "MARIADB_DATABASE", 3306)
    user, password, database, port = expected
    assert (url.username, url.password, url.database) == (
        service["env"][user],
        service["env"][password],
        service["env"][database],
    )
    assert f"{url.port}:{port}" in service["ports"]
    assert "--health-cmd" in service["options"], "the job would start before the database accepts connections"


def test_rendered_workflow_names_the_lint_only_where_it_runs(rendered: tuple[Path, dict[str, str]]) -> None:
    project, answers = rendered
    text = (project / ".github" / "workflows" / "ci.yml").read_text()
    linted = answers["database"] == "postgresql" and answers.get("migration_lint", "y") == "y"
    assert ("safety lint" in text) is linted
    assert (project / "tests" / "test_migration_lint.py").is_file() is linted


def test_github_actions_n_renders_no_workflow(tmp_path: Path) -> None:
    project = render(tmp_path, github_actions="n")
    # cookiecutter cannot skip a directory, only files: .github/workflows/ may remain, empty
    # (git does not track it). The README does not mention CI either.
    assert [path for path in project.rglob("*") if ".github" in path.parts and path.is_file()] == []
    readme = (project / "README.md").read_text()
    assert ".github/" not in readme and "## CI" not in readme


def test_rendered_workflow_expressions_survive_rendering(tmp_path: Path) -> None:
    """GitHub's ${{ }} expressions come out as GitHub reads them, not eaten by Jinja."""
    text = (render(tmp_path) / ".github" / "workflows" / "ci.yml").read_text()
    assert "group: ${{ github.workflow }}-${{ github.ref }}\n" in text
    assert "raw %}" not in text
