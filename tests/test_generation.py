"""Every combination of answers that changes the output: rendered, linted, and run.

Modelled on cookiecutter-django's test_cookiecutter_generation.py, but the matrix
is derived from cookiecutter.json: a new choice or y/n option joins it without
an edit here. For each supported combination the render passes the post-gen
checks, `ruff check` and `ruff format --check` are clean on it, and the rendered
project's own test suite passes against a real database. An option that the
other answers make meaningless must change nothing.
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

YES = {"y", "yes", "true", "on", "1"}
NO = {"n", "no", "false", "off", "0"}

# Free-text answers that change what renders (not just a word in it), and values covering them.
FREE_TEXT = {"env_prefix": ["", "APP_"]}
# Free text that only changes words: names and descriptions. Their validation is
# test_hooks.py's business; the matrix uses the defaults.
TEXT_ONLY = {"project_name", "project_slug", "package_name", "description"}
# Choices whose values change only lines that name the value. Each would multiply the
# matrix for nothing: test_python_version_changes_only_the_lines_naming_it proves the
# claim, and every matrix render is linted under each of its values instead.
NAMED_ONLY = {"python_version"}
# Short names for the ids of y/n options (the option name is used otherwise).
LABELS = {"migration_lint": "lint", "github_actions": "gha"}


def is_yes(value: Any) -> bool:
    return value is True or str(value).lower() in YES


def is_toggle(default: Any) -> bool:
    """A y/n option: a JSON boolean, or a string (templated or not) that renders to y/n."""
    return isinstance(default, bool) or str(default).lower() in YES | NO


def matrix_values(name: str) -> list[Any] | None:
    """The values of `name` the matrix covers; None when it is not a matrix option."""
    if name.startswith("_") or name in TEXT_ONLY or name in NAMED_ONLY:
        return None
    if name in FREE_TEXT:
        return FREE_TEXT[name]
    if isinstance(CONTEXT[name], list):
        return list(CONTEXT[name])
    if isinstance(CONTEXT[name], bool):
        return [True, False]
    if is_toggle(DEFAULTS.get(name)):
        return ["y", "n"]
    return None


MATRIX = {name: values for name in CONTEXT if (values := matrix_values(name)) is not None}


# Rules about combinations of answers. No combination is refused today: an option that
# other answers make meaningless is ignored instead (refusing migration_lint=y with SQLite
# would refuse `cookiecutter --no-input database=sqlite`, whose lint default is y).
#
# Ignored: an option that the other answers make meaningless. The combination must
# render exactly like its twin with the option off, so only the twin runs in full.
IGNORED_WHEN: list[tuple[Callable[[Answers], bool], str]] = [
    # squawk lints PostgreSQL's SQL; the prompt says it has no effect on other databases.
    (lambda answers: answers["database"] != "postgresql", "migration_lint"),
]


def ignored_option(answers: Answers) -> str | None:
    """The option switched on in `answers` that has no effect there, if any."""
    return next(
        (option for rule, option in IGNORED_WHEN if option in answers and is_yes(answers[option]) and rule(answers)),
        None,
    )


def switched_off(answers: Answers, option: str) -> Answers:
    return {**answers, option: False if isinstance(CONTEXT[option], bool) else "n"}


def combination_id(answers: Answers) -> str:
    """Readable ids: postgresql-APP_-gha-lint; an empty prefix and a 'n' leave no part."""
    parts = []
    for name, value in answers.items():
        if name in FREE_TEXT or not is_toggle(value):
            parts.append(str(value))
        elif is_yes(value):
            parts.append(LABELS.get(name, name.replace("_", "-")))
    return "-".join(part for part in parts if part)


COMBINATIONS = [dict(zip(MATRIX, values, strict=True)) for values in itertools.product(*MATRIX.values())]
IGNORING = [answers for answers in COMBINATIONS if ignored_option(answers)]
SUPPORTED = [answers for answers in COMBINATIONS if not ignored_option(answers)]


def params(combinations: list[Answers]) -> list:
    return [pytest.param(answers, id=combination_id(answers)) for answers in combinations]


def with_backend(combinations: list[Answers]) -> list:
    # `backend` (conftest.py) is parametrised indirectly: it starts the database the
    # combination needs (one server per test session) and each test makes a fresh database.
    return [pytest.param(answers["database"], answers, id=combination_id(answers)) for answers in combinations]


def test_every_option_is_in_the_matrix_or_explained() -> None:
    """A new option must join the matrix (choices and y/n do by themselves) or say why not."""
    unexplained = [
        name
        for name in CONTEXT
        if not name.startswith("_") and name not in MATRIX and name not in TEXT_ONLY | NAMED_ONLY
    ]
    assert not unexplained, f"add {unexplained} to FREE_TEXT, TEXT_ONLY or NAMED_ONLY in {__file__}"
    assert len(set(map(combination_id, COMBINATIONS))) == len(COMBINATIONS), "two combinations share an id"


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
    targets = [[], *(["--target-version", f"py{v.replace('.', '')}"] for v in CONTEXT.get("python_version", []))]
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
    # ... and ran on the database it was given (it ends migrated down to base).
    tables = backend.tables(url)
    assert "alembic_version" in tables and "thing" not in tables, tables


@pytest.mark.parametrize("answers", params(IGNORING))
def test_ignored_option_changes_nothing(answers: Answers, tmp_path: Path) -> None:
    option = ignored_option(answers)
    rendered = files_under(render(tmp_path / "on", **answers))
    twin = files_under(render(tmp_path / "off", **switched_off(answers, option)))
    # The answers file records the answer as given; nothing else may differ.
    assert rendered.pop(".cookiecutter.json") != twin.pop(".cookiecutter.json")
    assert rendered.keys() == twin.keys()
    differing = [name for name in rendered if rendered[name] != twin[name]]
    assert not differing, f"{option}={answers[option]} changes {differing} although it has no effect here"


# The render with the most options switched on: whatever python_version touches is in it.
FULLEST = max(SUPPORTED, key=lambda answers: sum(is_yes(value) for value in answers.values()))


@pytest.mark.parametrize("python_version", CONTEXT.get("python_version", [])[1:])
def test_python_version_changes_only_the_lines_naming_it(python_version: str, tmp_path: Path) -> None:
    """Why python_version is not a matrix axis: it only changes lines that name the version.

    If this fails, the version changes more than that: move python_version out of
    NAMED_ONLY so that every combination renders with every version.
    """
    default = files_under(render(tmp_path / "default", **FULLEST))
    other = files_under(render(tmp_path / "other", **FULLEST, python_version=python_version))
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
