"""The supported combinations of answers: rendered, linted, and run.

Modelled on cookiecutter-django's test_cookiecutter_generation.py: the combinations are a
literal table, readable at a glance, rather than a cartesian product (which doubles with
every y/n option, and each full run renders, lints and runs the rendered project's own
test suite against a real database). The table is chosen so that every value of every
option appears, and every pair of options that interact (INTERACTING) meets in each pair
of values that can be combined; test_the_table_covers_every_option_and_interaction fails
when cookiecutter.json gains an option or a value that the table does not cover.

For each supported combination the render passes the post-gen checks, `ruff check` and
`ruff format --check` are clean on it under every python_version, and the rendered
project's own test suite passes against a fresh database on the real server. An option
that the other answers make meaningless must change nothing: each combination in IGNORING
renders exactly like its twin with that option off.
"""

from __future__ import annotations

import difflib
import itertools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cookiecutter.prompt import prompt_for_config

from rendering import TEMPLATE, Project, files_under, make_project, render, subprocess_env
from servers import url_string

Answers = dict[str, Any]

CONTEXT: dict[str, Any] = json.loads((TEMPLATE / "cookiecutter.json").read_text())
# What `cookiecutter --no-input` answers: templated defaults rendered, choices at their first value.
DEFAULTS: dict[str, Any] = dict(prompt_for_config({"cookiecutter": CONTEXT}, no_input=True))

# Free text that only changes words (names, descriptions): test_hooks.py validates it,
# the table keeps the defaults (one row renders another name, so no name is hard-wired).
TEXT_ONLY = {"project_name", "project_slug", "package_name", "description"}
# Free text that changes what renders, and the values that must each appear.
FREE_TEXT = {"env_prefix": ["", "APP_"]}
# The columns of the table: every other option of cookiecutter.json.
COLUMNS = ("database", "env_prefix", "python_version", "github_actions", "migration_lint", "deploy_files")

# Supported combinations. deploy_files changes no file that the rendered suite runs
# (test_deploy.py validates and runs those files), so it takes its turns in rows that run anyway.
# fmt: off
SUPPORTED_ROWS = {
    # id                            database      env_prefix  python  gha  lint  deploy
    "postgresql-gha-lint-deploy":  ("postgresql", "",         "3.11", "y", "y", "y"),  # the defaults
    "postgresql-APP_-py3.12-lint": ("postgresql", "APP_",     "3.12", "n", "y", "n"),
    "postgresql-APP_-gha-deploy":  ("postgresql", "APP_",     "3.11", "y", "n", "y"),
    "mysql-gha-deploy":            ("mysql",      "",         "3.11", "y", "n", "y"),
    "mysql-APP_-py3.13":           ("mysql",      "APP_",     "3.13", "n", "n", "n"),
    "sqlite-gha":                  ("sqlite",     "",         "3.11", "y", "n", "n"),
    "sqlite-APP_-py3.12":          ("sqlite",     "APP_",     "3.12", "n", "n", "n"),
}
# Combinations with an option that has no effect there: each renders like its twin with it off.
IGNORING_ROWS = {
    # cookiecutter --no-input database=sqlite: both defaults, lint and deploy files, have no effect.
    "sqlite-gha-lint-deploy":      ("sqlite",     "",         "3.11", "y", "y", "y"),
    "mysql-APP_-lint":             ("mysql",      "APP_",     "3.11", "n", "y", "n"),
}
# fmt: on
# One row renders under another name than the default.
NAMES = {"mysql-APP_-py3.13": {"project_name": "Billing API"}}

# Options whose effect depends on another's value: each pair of their values that some
# supported combination can take must meet in a row (the rendered files differ for each).
INTERACTING = [
    ("database", "env_prefix"),  # settings, README, CI, deploy files name the prefixed variables
    ("database", "github_actions"),  # the CI service container is the database's
    ("database", "deploy_files"),  # compose's database service, the Job's retries
    ("env_prefix", "migration_lint"),  # the lint runs `alembic ... --sql` with the settings
    ("env_prefix", "deploy_files"),  # the secret's file name, the ConfigMap's keys
    ("github_actions", "migration_lint"),  # the workflow names the lint
]

# Options that other answers make meaningless are ignored, not refused: refusing
# migration_lint=y with SQLite would refuse `cookiecutter --no-input database=sqlite`,
# whose lint default is y (and cookiecutter checks a default computed from another answer
# against the choices, so it cannot be made n there).
IGNORED_WHEN: list[tuple[Callable[[Answers], bool], str]] = [
    # squawk lints PostgreSQL's SQL; the prompt says it has no effect on other databases.
    (lambda answers: answers["database"] != "postgresql", "migration_lint"),
    # SQLite has no server to migrate before the app starts; the prompt says so.
    (lambda answers: answers["database"] == "sqlite", "deploy_files"),
]


def is_yes(value: Any) -> bool:
    return str(value).lower() == "y"


def ignored_options(answers: Answers) -> list[str]:
    """The options switched on in `answers` that have no effect there."""
    return [option for rule, option in IGNORED_WHEN if is_yes(answers[option]) and rule(answers)]


def switched_off(answers: Answers, options: list[str]) -> Answers:
    return {**answers, **dict.fromkeys(options, "n")}


def row_answers(rows: dict[str, tuple[str, ...]]) -> dict[str, Answers]:
    """Each row's answers: its columns, and its names if it has its own."""
    return {row_id: {**dict(zip(COLUMNS, row, strict=True)), **NAMES.get(row_id, {})} for row_id, row in rows.items()}


SUPPORTED = row_answers(SUPPORTED_ROWS)
IGNORING = row_answers(IGNORING_ROWS)


def column_values(name: str) -> list[Any]:
    """Every value of a table column: the choices of cookiecutter.json, or FREE_TEXT's."""
    return list(CONTEXT[name]) if isinstance(CONTEXT[name], list) else FREE_TEXT[name]


# Short names of the y/n options in ids.
LABELS = {"github_actions": "gha", "migration_lint": "lint", "deploy_files": "deploy"}


def expected_id(answers: Answers) -> str:
    """database, the prefix if any, the Python if not the default, then each option that is on."""
    parts = [answers["database"], answers["env_prefix"]]
    if answers["python_version"] != DEFAULTS["python_version"]:
        parts.append("py" + answers["python_version"])
    parts += [label for option, label in LABELS.items() if is_yes(answers[option])]
    return "-".join(part for part in parts if part)


def test_the_table_covers_every_option_and_interaction() -> None:
    """A new option or value in cookiecutter.json must be given a column or a row here."""
    options = {name for name in CONTEXT if not name.startswith("_")}
    untabled = options - TEXT_ONLY - set(COLUMNS)
    assert not untabled, f"add {sorted(untabled)} to COLUMNS (and the rows), or to TEXT_ONLY, in {__file__}"
    for name in COLUMNS:
        assert isinstance(CONTEXT[name], list) or name in FREE_TEXT, f"{name}: list its values in FREE_TEXT"
        used = {answers[name] for answers in SUPPORTED.values()}
        assert used <= set(column_values(name)), f"{name}: {used - set(column_values(name))} is not an answer"
        missing = set(column_values(name)) - used
        assert not missing, f"{name}={sorted(missing)} is in no supported row"
    # Every row is what its id and its section say: supported rows ignore nothing, the others something.
    for row_id, answers in (SUPPORTED | IGNORING).items():
        assert row_id == expected_id(answers), f"{row_id}: call it {expected_id(answers)}"
    assert not {row_id: ignored_options(a) for row_id, a in SUPPORTED.items() if ignored_options(a)}
    assert all(ignored_options(answers) for answers in IGNORING.values())
    # Each interacting pair meets in every pair of values that a supported combination can have.
    possible = [
        answers
        for values in itertools.product(*map(column_values, COLUMNS))
        if not ignored_options(answers := dict(zip(COLUMNS, values, strict=True)))
    ]
    for first, second in INTERACTING:
        needed = {(answers[first], answers[second]) for answers in possible}
        covered = {(answers[first], answers[second]) for answers in SUPPORTED.values()}
        assert needed <= covered, f"no supported row has ({first}, {second}) = {sorted(needed - covered)}"


def params(rows: dict[str, Answers]) -> list:
    return [pytest.param(answers, id=row_id) for row_id, answers in rows.items()]


def with_backend(rows: dict[str, Answers]) -> list:
    # `backend` (conftest.py) is parametrised indirectly: it starts the database the
    # combination needs (one server per test session) and each test makes a fresh database.
    return [pytest.param(answers["database"], answers, id=row_id) for row_id, answers in rows.items()]


# The ruff binary itself: `python -m ruff` would start an interpreter for each of the
# eight runs per combination.
RUFF = (
    [found]
    if (found := shutil.which("ruff", path=str(Path(sys.executable).parent)))
    else [sys.executable, "-m", "ruff"]
)


def ruff_problems(path: Path) -> list[str]:
    """`ruff check` and `ruff format --check` as the project configures them, then under
    every python_version it can be rendered with (the target version changes the rules)."""
    targets = [[], *(["--target-version", f"py{v.replace('.', '')}"] for v in CONTEXT["python_version"])]
    commands = (["check", "--output-format", "concise"], ["format", "--check"])
    found: dict[str, list[str]] = {}  # each distinct complaint, and the runs that made it
    for command, target in itertools.product(commands, targets):
        result = subprocess.run(
            [*RUFF, *command, "--no-cache", *target, "."],
            cwd=path,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            found.setdefault(result.stdout + result.stderr, []).append(" ".join(["ruff", *command, *target]))
    return [f"{' | '.join(runs)}:\n{output}" for output, runs in found.items()]


def run_rendered_suite(project: Project, database_url: str) -> subprocess.CompletedProcess:
    """`python -m pytest` inside the rendered project, as its developers run it."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs"],
        cwd=project.path,
        env=subprocess_env(TEST_DATABASE_URL=database_url),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(("backend", "answers"), with_backend(SUPPORTED), indirect=["backend"])
def test_supported_combination(backend, answers: Answers, tmp_path: Path) -> None:
    # The post-gen checks ran inside render(): a problem would have raised here.
    project = make_project(tmp_path / "render", **answers)

    problems = ruff_problems(project.path)
    assert not problems, "\n".join(problems)

    # A model and the revision creating it, so that the rendered checks have a history
    # to walk up and down and a schema to compare with the models.
    project.add_thing()
    url = backend.create_database()
    result = run_rendered_suite(project, url_string(url))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    summary = output.strip().splitlines()[-1]
    # Every check ran: a skipped one would hide a backend that does not work.
    assert re.search(r"\b\d+ passed\b", summary) and not re.search(r"skipped|xfail|error", summary), output
    # ... and ran on the database it was given (the last check leaves it at head).
    tables = backend.tables(url)
    assert {"alembic_version", "thing"} <= tables, tables


@pytest.mark.parametrize("answers", params(IGNORING))
def test_ignored_option_changes_nothing(answers: Answers, tmp_path: Path) -> None:
    options = ignored_options(answers)
    rendered = files_under(render(tmp_path / "on", **answers))
    twin = files_under(render(tmp_path / "off", **switched_off(answers, options)))
    # The answers file records the answers as given; nothing else may differ.
    assert rendered.pop(".cookiecutter.json") != twin.pop(".cookiecutter.json")
    assert rendered.keys() == twin.keys()
    differing = [name for name in rendered if rendered[name] != twin[name]]
    assert not differing, f"{options} switched on change {differing} although they have no effect here"


# The render with the most options switched on: whatever python_version touches is in it.
FULLEST = {
    **max(SUPPORTED.values(), key=lambda answers: sum(is_yes(value) for value in answers.values())),
    "python_version": DEFAULTS["python_version"],
}


@pytest.mark.parametrize("python_version", CONTEXT["python_version"][1:])
def test_python_version_changes_only_the_lines_naming_it(python_version: str, tmp_path: Path) -> None:
    """Why python_version needs no more rows than one per value: it only changes lines that
    name the version (and every row is linted under each version).

    If this fails, the version changes more than that: give the table rows that combine
    each version with what it changes.
    """
    default = files_under(render(tmp_path / "default", **FULLEST))
    other = files_under(render(tmp_path / "other", **{**FULLEST, "python_version": python_version}))
    assert default.keys() == other.keys()
    # A removed line must name the default version, an added one the other version.
    names = {sign: (version, "py" + version.replace(".", "")) for sign, version in
             (("-", DEFAULTS["python_version"]), ("+", python_version))}  # fmt: skip
    unexplained = []
    for name in default:
        old, new = (files[name].decode().splitlines() for files in (default, other))
        # [2:]: past the ---/+++ header lines.
        for line in list(difflib.unified_diff(old, new, lineterm="", n=0))[2:]:
            sign = line[:1]
            if sign in names and not any(version in line for version in names[sign]):
                unexplained.append(f"{name}: {line}")
    assert not unexplained, "\n".join(unexplained)
