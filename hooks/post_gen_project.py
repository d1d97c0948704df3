"""Check the rendered project before the user sees it (standard library only).

Runs in the new project's directory, under cookiecutter's own interpreter, and
again on every `cruft update`: it only reads files. Any problem exits 1, and
cookiecutter then removes the half-made project.
"""

import configparser
import json
import re
import sys
from pathlib import Path, PurePosixPath

try:
    import tomllib
except ModuleNotFoundError:  # cookiecutter running on Python 3.10: no TOML check
    tomllib = None

# The template's variables and answers, as data (Jinja renders this line, tojson quotes it).
# fmt: off
CONTEXT = json.loads(r'''{{ cookiecutter | tojson }}''')
# fmt: on
# Built by concatenation: Jinja would consume these markers in this very file. A
# variable reference counts; prose that names the .cookiecutter.json file does not.
OPENERS = ["{" + "{", "{" + "%"]
VARIABLE_REFERENCE = r"\bcookiecutter\.(?:" + "|".join(map(re.escape, CONTEXT)) + r")\b"
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
# In a template file's name: a variable, and the tags of an `if` that decides whether the
# file is rendered at all ([%] keeps Jinja from reading the pattern as a tag of this file).
NAME_VARIABLE = re.compile(r"\{\{\s*cookiecutter\.(\w+)\s*\}\}")
NAME_CONDITION = re.compile(r"\{[%]-?\s*(?:if\s.*?|endif)\s*-?%\}")


def template_directory() -> Path | None:
    """The template's project directory, when cookiecutter says where the template is.

    `_repo_dir` is the local template, a clone (gh:, git URLs, at the --checkout asked for) or
    an unzipped archive; absent under cruft and older cookiecutters, relative when the
    template was given as a relative path (the hook runs elsewhere): None then.
    """
    repo = Path(CONTEXT.get("_repo_dir") or "")
    if not repo.is_absolute() or not (repo / "cookiecutter.json").is_file():
        return None
    # As cookiecutter finds it: the directory whose name holds a variable.
    for entry in sorted(repo.iterdir()):
        if entry.is_dir() and "cookiecutter" in entry.name and OPENERS[0] in entry.name:
            return entry
    return None


def rendered_name(name: str) -> str | None:
    """A template file or directory name as rendered with these answers, or None when it holds
    Jinja this function does not follow. An `if` counts as true: a file that these answers
    leave out is checked too, if it exists."""
    name = NAME_VARIABLE.sub(lambda match: str(CONTEXT.get(match[1], match[0])), name)
    name = NAME_CONDITION.sub("", name)
    return None if any(opener in name for opener in OPENERS) else name


def template_outputs(template: Path) -> set[PurePosixPath] | None:
    """The project paths the template renders to, or None when a name cannot be followed."""
    outputs = set()
    for path in template.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            parts = [rendered_name(part) for part in path.relative_to(template).parts]
            if None in parts:
                return None
            if "" not in parts:  # a name that renders empty is not rendered
                outputs.add(PurePosixPath(*parts))
    return outputs


def project_files(root: Path) -> tuple[list[Path], bool]:
    """The files to check, and whether they are exactly those at the template's paths.

    Rendering over an existing project (`cookiecutter -f -s`) leaves the user's files
    (.env, .venv, their own modules) next to the rendered ones: only the template's are
    checked. Without knowing the template (cruft renders into a fresh directory) every
    file is checked (binary ones are skipped when read).
    """
    template = template_directory()
    outputs = template_outputs(template) if template else None
    if outputs is None:
        return sorted(path for path in root.rglob("*") if path.is_file() and "__pycache__" not in path.parts), False
    return sorted(root / output for output in outputs if (root / output).is_file()), True


def answer_text(words: list[str]) -> re.Pattern[str] | None:
    """The words of the answers that hold a marker (a description about double braces, say),
    as typed or with characters backslash-escaped (in string literals, in Markdown): the
    user's text, not template leftovers."""
    patterns = [
        "".join(r"\\?" + re.escape(character) for character in word) for word in words if JINJA_MARKERS.search(word)
    ]
    return re.compile("|".join(sorted(patterns, key=len, reverse=True))) if patterns else None


# The answers (not cookiecutter's own _ and __ entries), word by word.
ANSWER_TEXT = answer_text(
    [
        word
        for key, value in CONTEXT.items()
        if not key.startswith("_") and isinstance(value, str)
        for word in value.split()
    ]
)


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
        if ANSWER_TEXT:
            text = ANSWER_TEXT.sub(" ", text)
        for marker in JINJA_MARKERS.findall(text):
            problems.append(f"{path}:{number}: template marker {marker!r} left unrendered")
    return problems


def check_python_compiles(path: Path, source: str) -> list[str]:
    try:
        compile(source, str(path), "exec")
    except SyntaxError as exc:
        return [f"{path}:{exc.lineno}: does not compile: {exc.msg}"]
    return []


def check_toml(path: Path, source: str) -> list[str]:
    """pyproject.toml and the tools' TOML files must parse (pip and alembic read them).

    YAML gets no such check: the standard library has no parser for it, and no answer
    lands in a YAML file (tests/test_answers.py parses every one with hostile answers)."""
    if tomllib is None:
        return []
    try:
        tomllib.loads(source)
    except tomllib.TOMLDecodeError as exc:
        return [f"{path}: not valid TOML: {exc}"]
    return []


def check_project(root: Path) -> tuple[list[str], bool]:
    """The problems of the rendered files, and whether only the template's were checked."""
    problems = []
    files, only_rendered = project_files(root)
    for path in files:
        relative = path.relative_to(root)
        if relative == Path("alembic.ini"):
            problems += check_alembic_ini(path)
        try:
            source = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        lines = source.splitlines()
        problems += check_credentials(relative, lines)
        problems += check_jinja_leftovers(relative, lines)
        if path.suffix == ".py":
            problems += check_python_compiles(relative, source)
        if path.suffix == ".toml":
            problems += check_toml(relative, source)
    return problems, only_rendered


def main() -> None:
    problems, only_rendered = check_project(Path.cwd())
    for problem in problems:
        print(f"ERROR (hooks/post_gen_project.py): {problem}", file=sys.stderr)
    if problems and not only_rendered:
        print(
            "NOTE (hooks/post_gen_project.py): cookiecutter did not say where the template is"
            " (an absolute _repo_dir), so every file in the directory was checked, your own too;"
            " to render over an existing project, give the template as an absolute path or a URL",
            file=sys.stderr,
        )
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
