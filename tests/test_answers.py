"""Answers as users type them: free text renders into valid files, names are derived or refused.

Free text (the project name, the description) lands in TOML, Python, Markdown and ini files.
Whatever it holds, each file must still parse and keep its structure: the text stays data.
Names that cannot work (a package that shadows what the project installs, an env prefix
that turns the app's settings into the tests' throwaway database) are refused before
anything is rendered, with a message that says what to type instead.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import inspect
import json
import re
import shutil
import subprocess
import sysconfig
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from cookiecutter.exceptions import FailedHookException
from markdown_it import MarkdownIt
from markdown_it.token import Token
from packaging.requirements import Requirement

from rendering import TEMPLATE, render

RUFF = shutil.which("ruff", path=sysconfig.get_path("scripts")) or "ruff"
DATABASES: list[str] = json.loads((TEMPLATE / "cookiecutter.json").read_text())["database"]

# Jinja renders answers given on the command line (or as extra_context): {% raw %} keeps
# these markers as typed, as they are when typed at the prompt.
JINJA_LIKE = "{% raw %}Renders {{ name }}, {% if x %} and {# y #} for cookiecutter.project_name{% endraw %}"

HOSTILE = [
    pytest.param(
        {"project_name": 'Bob\'s "Billing"', "description": "Uses the \"orders\" DB, it's 'ours'"}, id="quotes"
    ),
    pytest.param({"description": r"C:\new\table, \N{DASH}, \u00e9, \x00 and a trailing \ "}, id="backslashes"),
    pytest.param({"description": 'a "quote" at the end"'}, id="quote-at-the-end"),
    pytest.param({"description": '"""Docstring""" and \'\'\'more\'\'\' "'}, id="triple-quotes"),
    pytest.param(
        {"project_name": "Billing\nAPI", "description": "line one\nline two\r\n\tindented\x0bvertical\u2028separator"},
        id="line-breaks",
    ),
    # A title ending in # has it escaped in the README: the marker before it is still text.
    pytest.param(
        {"project_name": "{% raw %}Billing {{ x }} {%- if %} {{#{% endraw %}", "description": JINJA_LIKE},
        id="jinja-like",
    ),
    pytest.param({"project_name": "C# ##", "description": "# Not a heading"}, id="hashes"),
    pytest.param({"description": "```python"}, id="code-fence"),
    pytest.param({"description": "- not a list"}, id="bullet"),
    pytest.param({"description": "1. not a list either"}, id="ordered-list"),
    pytest.param({"description": "2024) neither"}, id="ordered-list-paren"),
    pytest.param({"description": "> not a quote"}, id="blockquote"),
    pytest.param({"description": "---"}, id="thematic-break"),
    pytest.param({"description": "<!-- swallows the rest"}, id="html-comment"),
    pytest.param({"description": "[x]: https://example.com"}, id="link-definition"),
    pytest.param({"description": "key: value # comment, [a, b], {c: d}, &anchor !!python/object"}, id="yaml-syntax"),
    pytest.param({"description": '"]\n[tool.evil]\nx = "'}, id="toml-injection"),
    pytest.param({"project_name": "%(here)s service", "description": "100% %(here)s"}, id="ini-interpolation"),
    pytest.param({"project_name": "Café ☕", "description": "Ünïcode 🚀, ＂fullwidth＂ and ‘curly’"}, id="non-ascii"),
    pytest.param({"description": "a long description, " * 20}, id="longer-than-a-line"),
]


def one_line(text: str) -> str:
    """An answer as the template renders it: whitespace (line breaks included) collapsed."""
    return " ".join(text.split())


def block_structure(tokens: list[Token]) -> list[tuple[str, str]]:
    return [(token.type, token.tag) for token in tokens if token.block and token.type != "inline"]


def plain_text(inline: Token) -> str:
    """What a reader sees of an inline token: escapes resolved, markup left out."""
    return "".join(child.content for child in inline.children or [] if child.type in ("text", "code_inline"))


def parse_markdown(path: Path) -> list[Token]:
    # CommonMark with GitHub's block extension (tables), as GitHub renders a README.
    return MarkdownIt("commonmark").enable("table").parse(path.read_text())


def ini_values(path: Path) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path, encoding="utf-8")
    return {section: dict(parser[section]) for section in parser.sections()}


def load_yaml_files(project: Path, slug: str = "my-service") -> dict[str, Any]:
    """Every YAML file, parsed; the project slug (validated, used in resource names) as the default one."""
    return {
        path.relative_to(project).as_posix(): yaml.safe_load(
            re.sub(rf"(?<![A-Za-z0-9]){re.escape(slug)}(?![A-Za-z0-9_])", "my-service", path.read_text())
        )
        for path in sorted([*project.rglob("*.yml"), *project.rglob("*.yaml")])
    }


@pytest.fixture(scope="module")
def default_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default render, to compare each render's structure with."""
    return render(tmp_path_factory.mktemp("default"))


@pytest.mark.parametrize("answers", HOSTILE)
def test_free_text_stays_text_in_every_file(tmp_path: Path, default_project: Path, answers: dict[str, str]) -> None:
    project = render(tmp_path, **answers)
    # What cookiecutter recorded is the answer after Jinja ({% raw %} gone), exactly as given.
    recorded = json.loads((project / ".cookiecutter.json").read_text())
    title, summary = one_line(recorded["project_name"]), one_line(recorded["description"])
    package = recorded["package_name"]

    # pyproject.toml parses to the default render's, but for the answers' own values.
    expected = tomllib.loads((default_project / "pyproject.toml").read_text())
    expected["project"] |= {"name": project.name, "description": summary}
    expected["tool"]["setuptools"]["packages"] = [package]
    assert tomllib.loads((project / "pyproject.toml").read_text()) == expected

    for path in project.rglob("*.py"):
        compile(path.read_text(), str(path), "exec")
    docstring = ast.get_docstring(ast.parse((project / package / "__init__.py").read_text()))
    assert docstring is not None and one_line(docstring) == summary

    # No free text reaches a YAML file (only the slug, in resource names): each parses,
    # and to what the default render's does.
    assert load_yaml_files(project, slug=project.name) == load_yaml_files(default_project)

    ini = (project / "alembic.ini").read_text()
    assert ini.splitlines()[0] == f"# Alembic configuration for {title}."
    assert ini_values(project / "alembic.ini") == ini_values(default_project / "alembic.ini")

    readme = parse_markdown(project / "README.md")
    assert block_structure(readme) == block_structure(parse_markdown(default_project / "README.md"))
    heading, paragraph = readme[1], readme[4]
    assert (readme[0].tag, readme[0].map, plain_text(heading)) == ("h1", [0, 1], title)
    assert (readme[3].type, readme[3].map, plain_text(paragraph)) == ("paragraph_open", [2, 3], summary)

    # The project's own linters accept it (a long description wraps in the docstring).
    for command in (["check", "--no-cache"], ["format", "--check", "--no-cache"]):
        result = subprocess.run([RUFF, *command, "."], cwd=project, capture_output=True)
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


@pytest.mark.parametrize(
    ("answer", "character"),
    [
        pytest.param({"description": "a\x00b"}, "U+0000", id="nul"),
        pytest.param({"project_name": "Bell\x07"}, "U+0007", id="bell"),
        pytest.param({"description": "delete\x7f"}, "U+007F", id="delete"),
    ],
)
def test_control_characters_are_refused(tmp_path: Path, capfd, answer: dict[str, str], character: str) -> None:
    with pytest.raises(FailedHookException):
        render(tmp_path, project_slug="svc", **answer)
    assert f"{next(iter(answer))} contains the control character {character}" in capfd.readouterr().err


@pytest.mark.parametrize(
    ("project_name", "slug"),
    [
        pytest.param("Billing API (v2)", "billing-api-v2", id="parentheses"),
        pytest.param("Café Ünïcode", "cafe-unicode", id="accents"),
        pytest.param("  Many   spaces ", "many-spaces", id="spaces"),
        pytest.param("snake_case_name", "snake-case-name", id="underscores"),
        pytest.param("It's O'Brien's", "it-s-o-brien-s", id="apostrophes"),
    ],
)
def test_any_project_name_gives_a_slug_and_a_package(tmp_path: Path, project_name: str, slug: str) -> None:
    project = render(tmp_path, project_name=project_name)
    assert project.name == slug
    assert (project / slug.replace("-", "_") / "__init__.py").is_file()


def test_a_name_that_cannot_be_a_package_says_what_to_type(tmp_path: Path, capfd) -> None:
    with pytest.raises(FailedHookException):
        render(tmp_path / "refused", project_name="2FA Service")
    error = capfd.readouterr().err
    assert "project_slug '2fa-service' (made from project_name '2FA Service'" in error
    assert "e.g. project_slug=my-2fa-service" in error and "e.g. package_name=my_2fa_service" in error
    # Doing what it says works.
    project = render(tmp_path / "done", project_name="2FA Service", project_slug="my-2fa-service")
    assert (project / "my_2fa_service" / "__init__.py").is_file()


def installed_requirements(project: Path) -> list[str]:
    """What the rendered project installs: its dependencies, its test extra, its build backend."""
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    return [
        *pyproject["project"]["dependencies"],
        *pyproject["project"]["optional-dependencies"]["test"],
        *pyproject["build-system"]["requires"],
    ]


def distributions(requirements: list[str]) -> dict[str, importlib.metadata.Distribution]:
    """The distributions `requirements` bring, recursively, as installed in this environment
    (extras followed, environment markers evaluated here): name -> distribution."""
    found: dict[str, importlib.metadata.Distribution] = {}
    pending = [Requirement(text) for text in requirements]
    followed: set[tuple[str, frozenset[str]]] = set()
    while pending:
        requirement = pending.pop()
        key = (requirement.name.lower(), frozenset(requirement.extras))
        if key in followed:
            continue
        followed.add(key)
        distribution = importlib.metadata.distribution(requirement.name)
        found[distribution.metadata["Name"]] = distribution
        extras = [{"extra": extra} for extra in requirement.extras] or [{"extra": ""}]
        for text in distribution.requires or []:
            dependency = Requirement(text)
            if dependency.marker is None or any(dependency.marker.evaluate(extra) for extra in extras):
                pending.append(dependency)
    return found


def provided_names(distribution: importlib.metadata.Distribution) -> set[str]:
    """The top-level import names a distribution installs, and its commands: pytest's
    _pytest and py, ruff's and squawk-cli's binaries."""
    scripts = Path(sysconfig.get_path("scripts")).resolve()
    names = set()
    for file in distribution.files or []:
        if len(file.parts) > 1 and file.parts[0] not in ("..", "__pycache__"):
            names.add(file.parts[0])  # a package (dist-info directories are no identifiers)
        elif len(file.parts) == 1:
            names.add(inspect.getmodulename(file.name) or "")
        elif Path(distribution.locate_file(file)).resolve().parent == scripts:
            names.add(file.name)
    return {name for name in names if name.isidentifier()}


@pytest.fixture(scope="module")
def shadowed_names(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every name the rendered project installs, for every database: name -> distribution."""
    names: dict[str, str] = {}
    for database in DATABASES:
        project = render(tmp_path_factory.mktemp(database), database=database, migration_lint="y")
        for name, distribution in distributions(installed_requirements(project)).items():
            names.update(dict.fromkeys(provided_names(distribution), name))
    return names


def test_the_shadowed_names_include_what_the_issue_names(shadowed_names: dict[str, str]) -> None:
    """The computation finds the names that broke renders (a guard against a scan that finds nothing)."""
    expected = {"dotenv", "pydantic_core", "typing_extensions", "annotated_types", "ruff", "_pytest", "greenlet"}
    assert expected | {"mako", "squawk", "alembic", "sqlalchemy", "asyncpg"} <= shadowed_names.keys()


def test_package_names_that_shadow_what_the_project_installs_are_refused(
    tmp_path: Path, capfd, shadowed_names: dict[str, str]
) -> None:
    # Not installed, as fatal: the project's own layout, the pip its README runs, Python's own,
    # and the name of the template's variables (the post-gen check would take imports of it for leftovers).
    own = {
        **{"conftest": "pytest", "tests": "layout", "migrations": "layout", "pip": "README", "__main__": "Python"},
        "cookiecutter": "the post-gen check",
    }
    names = {**shadowed_names, **own}
    accepted = {}
    for name, owner in sorted(names.items()):
        try:
            render(tmp_path / name, project_slug="svc", package_name=name)
        except FailedHookException:
            error = capfd.readouterr().err
            if f"package_name {name!r}" not in error:
                accepted[name] = f"{owner}: refused for another reason: {error}"
        else:
            accepted[name] = owner
    assert not accepted, f"rendered a package that shadows what the project installs: {accepted}"


def environment_reads(project: Path) -> set[str]:
    """The environment variables the rendered tests read."""
    reads = re.compile(r"""os\.(?:environ\.get\(|environ\[|getenv\()\s*["'](\w+)["']""")
    return {name for path in (project / "tests").rglob("*.py") for name in reads.findall(path.read_text())}


def colliding_prefix(variable: str) -> str | None:
    """The env_prefix that would make an app variable ({prefix}DATABASE_*, {prefix}SECRETS_DIR)
    the same as `variable`, if any."""
    if "DATABASE_" in variable:
        return variable[: variable.index("DATABASE_")]
    if variable.endswith("SECRETS_DIR"):
        return variable.removesuffix("SECRETS_DIR")
    return None


def test_no_env_prefix_makes_an_app_variable_one_the_tests_read(tmp_path: Path, capfd) -> None:
    variables = set()
    for database in DATABASES:
        variables |= environment_reads(render(tmp_path / database, database=database, migration_lint="y"))
    assert "TEST_DATABASE_URL" in variables
    for variable in sorted(variables):
        prefix = colliding_prefix(variable)
        if prefix is None:
            continue
        # pydantic-settings matches variable names case-insensitively.
        for spelling in (prefix, prefix.lower(), prefix.capitalize()):
            with pytest.raises(FailedHookException):
                render(tmp_path / "refused", env_prefix=spelling)
            assert f"env_prefix {spelling!r} would make the app read {variable}" in capfd.readouterr().err


@pytest.mark.parametrize("prefix", ["TESTS_", "APP_TEST_"])
def test_prefixes_near_the_tests_variable_are_fine(tmp_path: Path, prefix: str) -> None:
    project = render(tmp_path, env_prefix=prefix)
    assert json.loads((project / ".cookiecutter.json").read_text())["env_prefix"] == prefix
