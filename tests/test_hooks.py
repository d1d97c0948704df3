"""The hooks: bad answers are refused before rendering, bad output is never handed over."""

from __future__ import annotations

from pathlib import Path

import pytest
from cookiecutter.exceptions import FailedHookException
from cookiecutter.generate import generate_context, generate_files
from cookiecutter.main import cookiecutter
from cookiecutter.prompt import prompt_for_config

from rendering import TEMPLATE, copy_template, render

SLUG_DIR = "{{cookiecutter.project_slug}}"


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        pytest.param({"project_slug": "My Service"}, "project_slug 'My Service'", id="slug-with-space"),
        pytest.param({"project_slug": "-svc"}, "project_slug '-svc'", id="slug-leading-hyphen"),
        pytest.param({"package_name": "my-service"}, "package_name 'my-service'", id="package-with-hyphen"),
        pytest.param({"package_name": "1service"}, "package_name '1service'", id="package-leading-digit"),
        pytest.param({"package_name": "class"}, "is a Python keyword", id="package-keyword"),
        pytest.param({"package_name": "alembic"}, "would shadow", id="package-shadows-alembic"),
        pytest.param({"package_name": "json"}, "would shadow", id="package-shadows-stdlib"),
        pytest.param({"package_name": "pytest"}, "would shadow", id="package-shadows-a-test-dependency"),
        pytest.param({"env_prefix": "APP"}, "ending with '_'", id="prefix-without-underscore"),
        pytest.param({"env_prefix": "APP-"}, "env_prefix 'APP-'", id="prefix-with-hyphen"),
        pytest.param({"env_prefix": "1_"}, "env_prefix '1_'", id="prefix-leading-digit"),
        # slugify drops quotes from a project_name now: they reach the hook as the slug itself.
        pytest.param({"project_slug": "x'''\"\"\"\\"}, "project_slug", id="quotes-in-answers-stay-data"),
    ],
)
def test_pre_gen_rejects_bad_answers(tmp_path: Path, capfd, answers: dict[str, str], message: str) -> None:
    with pytest.raises(FailedHookException):
        render(tmp_path, **answers)
    assert message in capfd.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "answers",
    [
        pytest.param({}, id="defaults"),
        pytest.param({"env_prefix": "APP_", "project_name": "Billing API"}, id="prefix"),
        pytest.param({"project_name": "Ledger", "package_name": "ledger_core"}, id="own-package-name"),
        # migration_lint is y by default and PostgreSQL-only: other databases ignore it, not refuse it.
        pytest.param({"database": "sqlite"}, id="sqlite-with-the-default-lint-answer"),
        pytest.param({"database": "mysql", "migration_lint": "y"}, id="lint-y-without-postgresql"),
        pytest.param({"github_actions": "n", "migration_lint": "n"}, id="no-ci-no-lint"),
    ],
)
def test_good_answers_render(tmp_path: Path, answers: dict[str, str]) -> None:
    project = render(tmp_path, **answers)
    assert (project / "alembic.ini").is_file()
    assert (project / answers.get("package_name", project.name.replace("-", "_")) / "settings.py").is_file()


def template_copy_with(tmp_path: Path, name: str, content: str) -> Path:
    """A copy of the template whose rendered project gains one extra file."""
    copy = tmp_path / "template"
    copy_template(copy)
    (copy / SLUG_DIR / name).write_text(content)
    return copy


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        pytest.param(
            "deploy.py",
            'URL = "postgresql://svc:hunter2@db.internal/app"\n',
            "deploy.py:1: a URL with a password",
            id="credentials-in-code",
        ),
        pytest.param(
            "notes.md",
            "{% raw %}Hello {{ cookiecutter.project_nam }}{% endraw %}\n",
            "notes.md:1: template marker",
            id="jinja-leftover",
        ),
        pytest.param(
            "settings.cfg",
            "{% raw %}name = cookiecutter.project_slug{% endraw %}\n",
            "settings.cfg:1: template marker",
            id="bare-variable-reference",
        ),
        pytest.param(
            "cache.sh",
            "export REDIS_URL=redis://:hunter2@cache:6379/0\n",
            "cache.sh:1: a URL with a password",
            id="credentials-empty-user-any-file",
        ),
        pytest.param(
            "compose.yml",
            "DB: postgresql://app:${DB_PASSWORD:-hunter2}@db/app\n",
            "compose.yml:1: a URL",
            id="credentials-as-variable-default",
        ),
        pytest.param("broken.py", "def f(:\n", "broken.py:1: does not compile", id="python-syntax-error"),
    ],
)
def test_post_gen_rejects_bad_output(tmp_path: Path, capfd, name: str, content: str, message: str) -> None:
    template = template_copy_with(tmp_path, name, content)
    output = tmp_path / "out"
    with pytest.raises(FailedHookException):
        render(output, template=template)
    assert message in capfd.readouterr().err
    # cookiecutter removed the half-made project: nothing is left behind.
    assert not output.exists() or list(output.iterdir()) == []


def test_post_gen_rejects_a_url_in_alembic_ini(tmp_path: Path, capfd) -> None:
    template = template_copy_with(tmp_path, "placeholder.txt", "")
    ini = template / SLUG_DIR / "alembic.ini"
    ini.write_text(ini.read_text().replace("# sqlalchemy.url =", "sqlalchemy.url = sqlite:///app.db"))
    with pytest.raises(FailedHookException):
        render(tmp_path / "out", template=template)
    error = capfd.readouterr().err
    assert "alembic.ini:" in error and "sqlalchemy.url is set" in error
    assert "sqlite:///app.db" not in error


def test_post_gen_allows_documentation_placeholders(tmp_path: Path) -> None:
    template = template_copy_with(
        tmp_path,
        "docs.md",
        "postgresql://USER:PASSWORD@HOST/db and mysql://app:<password>@db/app\n"
        "The answers are in .cookiecutter.json.\n",
    )
    render(tmp_path / "out", template=template)


def user_files(project: Path) -> dict[str, str]:
    """What a team adds to a rendered project: a real credential in .env (git ignores it), and
    a virtualenv whose files the post-gen checks would refuse."""
    files = {".env": "DATABASE_URL=postgresql://app:hunter2@db/app\n", ".venv/lib/x.py": "{" + "{\n"}
    for name, content in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(content)
    return files


def render_again(output: Path, template: Path = TEMPLATE) -> Path:
    """`cookiecutter -f --skip-if-file-exists`: pick up the template's new files, keep the rest."""
    return Path(
        cookiecutter(
            str(template), no_input=True, output_dir=str(output), overwrite_if_exists=True, skip_if_file_exists=True
        )
    )


def test_rendering_again_checks_the_templates_files_not_the_users(tmp_path: Path) -> None:
    project = render(tmp_path)
    added = user_files(project)
    (project / "alembic.ini").unlink()  # a file the template brings again

    assert render_again(tmp_path) == project
    assert (project / "alembic.ini").is_file()
    assert {name: (project / name).read_text() for name in added} == added


def test_rendering_again_still_refuses_a_credential_the_template_brings(tmp_path: Path, capfd) -> None:
    project = render(tmp_path / "out")
    user_files(project)
    template = template_copy_with(tmp_path, "deploy.py", 'URL = "postgresql://svc:hunter2@db.internal/app"\n')
    with pytest.raises(FailedHookException):
        render_again(tmp_path / "out", template)
    error = capfd.readouterr().err
    assert "deploy.py:1: a URL with a password" in error
    assert ".env" not in error and ".venv" not in error
    # cookiecutter leaves a directory it did not create in place.
    assert (project / ".env").is_file()


def test_without_knowing_the_template_every_file_is_checked(tmp_path: Path, capfd) -> None:
    """cruft renders with a context that does not say where the template is (no _repo_dir), into a
    fresh directory: the hook then checks every file, and over an existing project says why it
    refused the user's files."""
    project = render(tmp_path)
    user_files(project)
    context = generate_context(context_file=str(TEMPLATE / "cookiecutter.json"))
    context["cookiecutter"] = prompt_for_config(context, no_input=True)
    with pytest.raises(FailedHookException):
        generate_files(
            repo_dir=str(TEMPLATE),
            context=context,
            output_dir=str(tmp_path),
            overwrite_if_exists=True,
            skip_if_file_exists=True,
        )
    error = capfd.readouterr().err
    assert ".env:1: a URL with a password" in error
    assert "every file in the directory was checked" in error
