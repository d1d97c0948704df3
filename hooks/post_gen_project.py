"""Check the rendered project before the user sees it (standard library only).

Runs in the new project's directory, under cookiecutter's own interpreter, and
again on every `cruft update`: it only reads files. Any problem exits 1, and
cookiecutter then removes the half-made project.
"""

import configparser
import json
import re
import sys
from pathlib import Path

# The template's variable names, as data (Jinja renders this line, tojson quotes it).
# fmt: off
VARIABLES = json.loads(r'''{{ cookiecutter | list | tojson }}''')
# fmt: on
# Built by concatenation: Jinja would consume these markers in this very file. A
# variable reference counts; prose that names the .cookiecutter.json file does not.
OPENERS = ["{" + "{", "{" + "%"]
VARIABLE_REFERENCE = r"\bcookiecutter\.(?:" + "|".join(map(re.escape, VARIABLES)) + r")\b"
JINJA_MARKERS = re.compile("|".join([*map(re.escape, OPENERS), VARIABLE_REFERENCE]))
# GitHub Actions expressions (a dollar sign, then two braces) are meant to survive rendering.
GITHUB_EXPRESSION = re.compile(r"\$\{" + r"\{")
# scheme://user:password@host, the user possibly empty (redis://:password@host)
CREDENTIAL_URL = re.compile(
    r"\b[a-z][a-z0-9+.-]*://(?P<user>[^\s:/@'\"]*):(?P<password>[^\s@'\"]+)@[^\s/'\"]", re.IGNORECASE
)
# What documentation may show in place of a password: a placeholder word, stars, <...>,
# or a bare variable reference (${VAR}, not ${VAR:-default}, whose default is a value).
PLACEHOLDER_PASSWORD = re.compile(r"(?i)password|change_?me|\*+|<[^>]*>|\$\{\w+\}|\{\w+\}")
# Where the answers are recorded on purpose (for cruft and re-rendering).
ANSWER_FILES = {".cookiecutter.json", ".cruft.json"}


def project_files(root: Path) -> list[Path]:
    """Every file of the project (binary ones are skipped when read)."""
    return sorted(path for path in root.rglob("*") if path.is_file() and "__pycache__" not in path.parts)


def check_alembic_ini(path: Path) -> list[str]:
    """alembic.ini must not carry a URL: env.py builds it from the settings."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path, encoding="utf-8")
    url = parser.get("alembic", "sqlalchemy.url", fallback="").strip()
    if url:
        # ConfigParser ignores the key's case; so does the search for its line.
        lines = path.read_text(encoding="utf-8").lower().splitlines()
        line = next((n for n, text in enumerate(lines, 1) if text.strip().startswith("sqlalchemy.url")), "?")
        return [f"{path.name}:{line}: sqlalchemy.url is set; the URL must come from the settings"]
    return []


def check_credentials(path: Path, lines: list[str]) -> list[str]:
    problems = []
    for number, line in enumerate(lines, 1):
        for match in CREDENTIAL_URL.finditer(line):
            if not PLACEHOLDER_PASSWORD.fullmatch(match["password"]):
                problems.append(f"{path}:{number}: a URL with a password ({match['user']}:...@)")
    return problems


def check_jinja_leftovers(path: Path, lines: list[str]) -> list[str]:
    if path.name in ANSWER_FILES:
        return []
    problems = []
    for number, line in enumerate(lines, 1):
        text = GITHUB_EXPRESSION.sub("", line)
        for marker in JINJA_MARKERS.findall(text):
            problems.append(f"{path}:{number}: template marker {marker!r} left unrendered")
    return problems


def check_python_compiles(path: Path, source: str) -> list[str]:
    try:
        compile(source, str(path), "exec")
    except SyntaxError as exc:
        return [f"{path}:{exc.lineno}: does not compile: {exc.msg}"]
    return []


def check_project(root: Path) -> list[str]:
    problems = []
    if (root / "alembic.ini").is_file():
        problems += check_alembic_ini(root / "alembic.ini")
    for path in project_files(root):
        try:
            source = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        relative = path.relative_to(root)
        lines = source.splitlines()
        problems += check_credentials(relative, lines)
        problems += check_jinja_leftovers(relative, lines)
        if path.suffix == ".py":
            problems += check_python_compiles(relative, source)
    return problems


def main() -> None:
    problems = check_project(Path.cwd())
    for problem in problems:
        print(f"ERROR (hooks/post_gen_project.py): {problem}", file=sys.stderr)
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
