"""Check the answers before anything is rendered (standard library only).

Runs under cookiecutter's own interpreter, and again on every `cruft update`:
it only reads its answers and exits non-zero with a message naming the problem.
"""

import json
import keyword
import re
import sys
import unicodedata

# Values arrive as JSON data, never spliced into code. Single quotes: a JSON
# string starts with a double quote, and tojson escapes ' as \u0027.
# fmt: off
PROJECT_NAME = json.loads(r'''{{ cookiecutter.project_name | tojson }}''')
DESCRIPTION = json.loads(r'''{{ cookiecutter.description | tojson }}''')
PROJECT_SLUG = json.loads(r'''{{ cookiecutter.project_slug | tojson }}''')
PACKAGE_NAME = json.loads(r'''{{ cookiecutter.package_name | tojson }}''')
ENV_PREFIX = json.loads(r'''{{ cookiecutter.env_prefix | tojson }}''')
# fmt: on

SLUG = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
PACKAGE = re.compile(r"[a-z_][a-z0-9_]*")
PREFIX = re.compile(r"([A-Za-z][A-Za-z0-9_]*_)?")
# Import names and commands of what the rendered project installs (its dependencies, its
# test extra for every database choice, its build backend), by distribution;
# tests/test_answers.py keeps this in step with their metadata. A package of the same name,
# next to alembic.ini and first on sys.path, would be imported in their place.
INSTALLED = {
    "alembic": "alembic", "mako": "Mako", "markupsafe": "MarkupSafe",
    "sqlalchemy": "SQLAlchemy", "greenlet": "greenlet",
    "asyncpg": "asyncpg", "asyncmy": "asyncmy", "aiosqlite": "aiosqlite",
    "pydantic": "pydantic", "pydantic_core": "pydantic-core", "pydantic_settings": "pydantic-settings",
    "dotenv": "python-dotenv", "annotated_types": "annotated-types",
    "typing_extensions": "typing-extensions", "typing_inspection": "typing-inspection",
    "pytest": "pytest", "_pytest": "pytest", "py": "pytest", "pluggy": "pluggy",
    "iniconfig": "iniconfig", "packaging": "packaging", "pygments": "Pygments", "pygmentize": "Pygments",
    "pytest_alembic": "pytest-alembic", "ruff": "ruff", "squawk": "squawk-cli",
    "setuptools": "setuptools", "pkg_resources": "setuptools", "_distutils_hack": "setuptools",
}  # fmt: skip
# Names the project itself uses, and what they are.
OWN = {
    "migrations": "the migrations directory",
    "tests": "the tests directory",
    "conftest": "the module pytest makes of tests/conftest.py",
    "pip": "pip, which the README and CI run as `python -m pip` in the project directory",
    "cookiecutter": "the name of the template's variables, which the post-gen check looks for in every file",
}
# Environment variables the rendered tests read (tests/conftest.py): an app variable of the same
# name would point the tests, which migrate down to base, at the app's database.
TEST_VARIABLES = ["TEST_DATABASE_URL"]


def check_free_text(answer: str, value: str) -> str | None:
    """Free text lands in TOML, Python, Markdown and ini files: any character but a control one.

    Line breaks and tabs are fine: each answer is rendered as one line, whitespace collapsed.
    """
    for character in value:
        if unicodedata.category(character) == "Cc" and not character.isspace():
            return f"{answer} contains the control character U+{ord(character):04X}: type plain text"
    return None


def example_name(value: str, separator: str) -> str:
    """A name like `value` that starts with a letter, for the messages: my-2fa-service."""
    words = [word for word in re.split(r"[^a-z0-9]+", value.lower()) if word]
    return separator.join(["my", *words] if words else ["my", "service"])


def check_project_slug(slug: str, project_name: str) -> str | None:
    if not SLUG.fullmatch(slug):
        return (
            f"project_slug {slug!r} (made from project_name {project_name!r} unless you answer it):"
            " use lower-case letters, digits and single hyphens, starting with a letter;"
            f" answer it yourself, e.g. project_slug={example_name(slug, '-')}"
        )
    return None


def check_package_name(name: str) -> str | None:
    if not PACKAGE.fullmatch(name):
        return (
            f"package_name {name!r} (made from project_slug unless you answer it): use lower-case"
            " letters, digits and underscores, not starting with a digit;"
            f" answer it yourself, e.g. package_name={example_name(name, '_')}"
        )
    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        return f"package_name {name!r} is a Python keyword: choose another, e.g. package_name=my_{name}"
    shadowed = shadowed_module(name)
    if shadowed:
        return f"package_name {name!r} would shadow {shadowed}: choose another name"
    return None


def shadowed_module(name: str) -> str | None:
    """What a package called `name` would hide from the project, if anything."""
    if name in INSTALLED:
        return f"{name} from {INSTALLED[name]}, which the rendered project installs"
    if name in OWN:
        return OWN[name]
    if name in sys.stdlib_module_names:
        return f"{name} from the standard library"
    if name.startswith("__") and name.endswith("__"):
        return "a name of Python's own (__main__, __init__, ...)"
    return None


def is_settings_variable(variable: str, prefix: str) -> bool:
    """Whether the settings read `variable`: {prefix}DATABASE_<FIELD> or {prefix}SECRETS_DIR.

    pydantic-settings matches names case-insensitively: with test_, TEST_DATABASE_URL is one.
    """
    variable, prefix = variable.upper(), prefix.upper()
    return variable.startswith(f"{prefix}DATABASE_") or variable == f"{prefix}SECRETS_DIR"


def check_env_prefix(prefix: str) -> str | None:
    if not PREFIX.fullmatch(prefix):
        return (
            f"env_prefix {prefix!r}: use letters, digits and underscores, starting with a"
            " letter and ending with '_' (e.g. APP_ for APP_DATABASE_URL), or leave it empty"
        )
    for variable in TEST_VARIABLES:
        if is_settings_variable(variable, prefix):
            return (
                f"env_prefix {prefix!r} would make the app read {variable}, the variable the"
                " rendered tests take as a throwaway database (they migrate it down to base and"
                " up again; names are matched case-insensitively): choose another, e.g. APP_"
            )
    return None


def main() -> None:
    problems = [
        problem
        for problem in (
            check_free_text("project_name", PROJECT_NAME),
            check_free_text("description", DESCRIPTION),
            check_project_slug(PROJECT_SLUG, PROJECT_NAME),
            check_package_name(PACKAGE_NAME),
            check_env_prefix(ENV_PREFIX),
        )
        if problem
    ]
    for problem in problems:
        print(f"ERROR (hooks/pre_gen_project.py): {problem}", file=sys.stderr)
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
