"""Check the answers before anything is rendered (standard library only).

Runs under cookiecutter's own interpreter, and again on every `cruft update`:
it only reads its answers and exits non-zero with a message naming the problem.
"""

import json
import keyword
import re
import sys

# Values arrive as JSON data, never spliced into code. Single quotes: a JSON
# string starts with a double quote, and tojson escapes ' as \u0027.
# fmt: off
PROJECT_SLUG = json.loads(r'''{{ cookiecutter.project_slug | tojson }}''')
PACKAGE_NAME = json.loads(r'''{{ cookiecutter.package_name | tojson }}''')
ENV_PREFIX = json.loads(r'''{{ cookiecutter.env_prefix | tojson }}''')
# fmt: on

SLUG = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
PACKAGE = re.compile(r"[a-z_][a-z0-9_]*")
PREFIX = re.compile(r"([A-Za-z][A-Za-z0-9_]*_)?")
# Names the rendered project imports or has a directory of: a package named
# like one of them would shadow it.
TAKEN = {
    "alembic", "sqlalchemy", "pydantic", "pydantic_settings", "asyncpg", "asyncmy", "aiosqlite",
    "greenlet", "mako", "pytest", "migrations", "tests",
}  # fmt: skip


def check_project_slug(slug: str) -> str | None:
    if not SLUG.fullmatch(slug):
        return (
            f"project_slug {slug!r}: use lower-case letters, digits and single hyphens,"
            " starting with a letter (e.g. my-service)"
        )
    return None


def check_package_name(name: str) -> str | None:
    if not PACKAGE.fullmatch(name):
        return f"package_name {name!r}: use lower-case letters, digits and underscores (e.g. my_service)"
    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        return f"package_name {name!r} is a Python keyword"
    if name in TAKEN or name in sys.stdlib_module_names:
        return f"package_name {name!r} would shadow the module of that name: choose another"
    return None


def check_env_prefix(prefix: str) -> str | None:
    if not PREFIX.fullmatch(prefix):
        return (
            f"env_prefix {prefix!r}: use letters, digits and underscores, starting with a"
            " letter and ending with '_' (e.g. APP_ for APP_DATABASE_URL), or leave it empty"
        )
    return None


def main() -> None:
    problems = [
        problem
        for problem in (
            check_project_slug(PROJECT_SLUG),
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
