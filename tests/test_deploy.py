"""The deploy files (deploy_files=y): valid for the tools that read them, and wired to the settings.

For each database with a server, with and without an env prefix, offline: the compose file
passes check-jsonschema's compose-spec schema, the Kubernetes manifests
`kubernetes-validate --strict`, the Dockerfile BuildKit's own parser (the `dockerfile`
package) and hadolint. Then what a user relies on: the migration waits for a healthy
database and the app for a successful migration, the image runs `alembic upgrade head` as
a non-root user, the build context keeps local secrets out, and no file holds a password.

Without a container runtime, the image is also taken for a run: the project installed
from the build context as the Dockerfile installs it (not editable), the runtime stage's
files copied as it copies them, then the image's command with the environment that
compose.yaml or the Job gives it, the password written only where they mount it, on a
read-only root filesystem (a mount namespace), against the real server.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

import dockerfile
import pytest
import yaml
from docker.utils.build import exclude_paths
from sqlalchemy.engine import URL

from rendering import TEMPLATE, Project, files_under, make_project, render, subprocess_env, tool

SECRETS_DIR = PurePosixPath("/run/secrets")
DEFAULT_PYTHON = json.loads((TEMPLATE / "cookiecutter.json").read_text())["python_version"][0]
DEPLOY_FILES = {
    ".dockerignore",
    "Dockerfile",
    "compose.yaml",
    "deploy/kubernetes/configmap.yaml",
    "deploy/kubernetes/job.yaml",
}
# What a developer's checkout holds and no image may: local settings, a virtualenv,
# the local secret that compose.yaml mounts, bytecode.
LOCAL_ONLY = [".env", ".venv/bin/python", "secrets/database_password", "migrations/versions/__pycache__/x.pyc"]


@dataclass
class Stage:
    """One stage of a Dockerfile, as BuildKit's parser reads it."""

    base: str
    instructions: list[dockerfile.Command]

    def all(self, cmd: str) -> list[dockerfile.Command]:
        return [instruction for instruction in self.instructions if instruction.cmd == cmd]

    def last(self, cmd: str) -> dockerfile.Command | None:
        found = self.all(cmd)
        return found[-1] if found else None


@dataclass
class Deployed:
    """A render with deploy_files=y, and its deploy files as the tools read them."""

    path: Path
    answers: dict[str, str]

    @property
    def prefix(self) -> str:
        return self.answers.get("env_prefix", "")

    @property
    def database(self) -> str:
        return self.answers["database"]

    @cached_property
    def compose(self) -> dict[str, Any]:
        return yaml.safe_load((self.path / "compose.yaml").read_text())

    @cached_property
    def manifests(self) -> dict[str, dict[str, Any]]:
        """The Kubernetes objects under deploy/kubernetes/, by kind."""
        objects = [
            document
            for path in sorted((self.path / "deploy" / "kubernetes").glob("*.yaml"))
            for document in yaml.safe_load_all(path.read_text())
        ]
        return {document["kind"]: document for document in objects}

    @cached_property
    def stages(self) -> list[Stage]:
        stages: list[Stage] = []
        for instruction in dockerfile.parse_file(str(self.path / "Dockerfile")):
            if instruction.cmd == "FROM":
                stages.append(Stage(instruction.value[0], []))
            else:
                stages[-1].instructions.append(instruction)
        return stages

    @property
    def image_command(self) -> list[str]:
        """ENTRYPOINT + CMD of the image."""
        final = self.stages[-1]
        return [*final.last("ENTRYPOINT").value, *final.last("CMD").value]

    @property
    def job_pod(self) -> dict[str, Any]:
        return self.manifests["Job"]["spec"]["template"]["spec"]


SERVER_RENDERS = [
    pytest.param({"database": "postgresql"}, id="postgresql"),
    pytest.param({"database": "postgresql", "env_prefix": "APP_", "python_version": "3.13"}, id="postgresql-APP_"),
    pytest.param({"database": "mysql"}, id="mysql"),
    pytest.param({"database": "mysql", "env_prefix": "APP_", "project_name": "Billing API"}, id="mysql-APP_"),
]


@pytest.fixture(scope="module", params=SERVER_RENDERS)
def deployed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Deployed:
    # The post-gen checks (no credential URL, no Jinja leftovers) ran inside render().
    return Deployed(render(tmp_path_factory.mktemp("render"), **request.param), request.param)


# Offline validation


def test_deploy_files_are_rendered(deployed: Deployed) -> None:
    assert DEPLOY_FILES <= files_under(deployed.path).keys()


def test_compose_file_passes_the_compose_spec_schema(deployed: Deployed) -> None:
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(deployed.path / "compose.yaml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_manifests_pass_strict_validation(deployed: Deployed) -> None:
    manifests = sorted(map(str, (deployed.path / "deploy" / "kubernetes").glob("*.yaml")))
    result = subprocess.run([tool("kubernetes-validate"), "--strict", *manifests], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(deployed.manifests) == {"ConfigMap", "Job"}


def test_dockerfile_passes_hadolint(deployed: Deployed) -> None:
    # BuildKit's parser reads it (a syntax error raises), then hadolint, failing on any rule down to style.
    assert deployed.stages
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", str(deployed.path / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# What the files do


def test_the_image_runs_the_migrations_as_a_non_root_user(deployed: Deployed) -> None:
    final = deployed.stages[-1]
    assert deployed.image_command == ["alembic", "upgrade", "head"]
    # A numeric uid, not 0: Kubernetes can only check runAsNonRoot against a number.
    user = final.last("USER").value[0]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user
    # ... of a user the image has (a name in /etc/passwd, for tools that look it up).
    assert any(f"--uid {uid} " in run.value[0] for run in final.all("RUN")), "no user with that uid"
    pod = deployed.job_pod
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(uid)
    # The Job runs the image's command (no `command:` replaces its entrypoint).
    [container] = pod["containers"]
    assert "command" not in container and container.get("args", deployed.image_command[1:]) == ["upgrade", "head"]


def test_the_image_is_built_on_the_answered_python(deployed: Deployed) -> None:
    version = deployed.answers.get("python_version", DEFAULT_PYTHON)
    assert [stage.base for stage in deployed.stages] == [f"python:{version}-slim"] * len(deployed.stages)


def test_the_image_installs_the_project_and_bakes_in_no_settings(deployed: Deployed) -> None:
    build, final = deployed.stages
    installs = [run.value[0] for run in build.all("RUN") if "pip install" in run.value[0]]
    assert installs and all(re.search(r"\binstall\b.*\s\.$", line) for line in installs), installs
    assert not any(re.search(r"\s(-e|--editable)\b", line) for line in installs), "an editable install"
    # No setting and no secret in the image: they arrive when the container starts.
    for stage in deployed.stages:
        for instruction in stage.all("ENV") + stage.all("ARG"):
            assert "DATABASE_" not in instruction.original and "SECRET" not in instruction.original.upper()
    # The runtime stage takes the installed virtualenv, not the source.
    assert not any(package_dir(deployed) in copy.original for copy in final.all("COPY"))


def test_the_build_context_keeps_local_secrets_out(deployed: Deployed, tmp_path: Path) -> None:
    """.dockerignore, read as docker-py reads it: what a checkout holds locally stays out,
    and everything that a COPY names is in."""
    checkout = tmp_path / "checkout"
    shutil.copytree(deployed.path, checkout)
    for name in LOCAL_ONLY:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text("local only\n")
    context = build_context(checkout)
    assert not context & set(LOCAL_ONLY), context & set(LOCAL_ONLY)
    assert not any(name.startswith((".venv", "secrets")) for name in context)
    for stage in deployed.stages:
        for copy in stage.all("COPY"):
            if not copy.flags:
                for source in copy.value[:-1]:
                    assert source.rstrip("/") in context, f"{copy.original}: {source} is not in the build context"


def test_migrate_waits_for_a_healthy_database_and_the_app_for_the_migration(deployed: Deployed) -> None:
    services = deployed.compose["services"]
    assert set(services) == {"db", "migrate", "app"}
    assert services["db"]["healthcheck"]["test"][0] == "CMD"
    assert services["migrate"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert services["app"]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    # migrate is the image of the Dockerfile, with its own command: alembic upgrade head.
    assert services["migrate"]["build"] == "." and "command" not in services["migrate"]
    assert "restart" not in services["migrate"], "a one-shot service must not restart"


def test_the_password_is_a_compose_secret_for_the_database_and_the_settings(deployed: Deployed) -> None:
    compose = deployed.compose
    [(name, secret)] = compose["secrets"].items()
    # A local file that git ignores (and .dockerignore keeps out of images).
    assert PurePosixPath(secret["file"]).parent == PurePosixPath("secrets")
    assert "/secrets/" in (deployed.path / ".gitignore").read_text().splitlines()
    # The database container reads it through its *_PASSWORD_FILE variable ...
    db = compose["services"]["db"]
    assert db["secrets"] == [name]
    [(variable, path)] = [(key, value) for key, value in db["environment"].items() if "PASSWORD_FILE" in key]
    assert variable.endswith("_PASSWORD_FILE") and path == str(SECRETS_DIR / name)
    # ... migrate and app as the file the settings read (env_prefix included).
    for service in ("migrate", "app"):
        [mount] = compose["services"][service]["secrets"]
        assert mount["source"] == name and compose_secret_path(mount) == password_file(deployed)


def test_the_job_reads_the_password_from_a_secret_and_the_rest_from_the_config_map(deployed: Deployed) -> None:
    pod, config_map = deployed.job_pod, deployed.manifests["ConfigMap"]
    [container] = pod["containers"]
    assert container["envFrom"] == [{"configMapRef": {"name": config_map["metadata"]["name"]}}]
    assert job_secret_path(deployed) == password_file(deployed)
    assert {f"{deployed.prefix}DATABASE_{name}" for name in ("HOST", "USER", "NAME")} <= config_map["data"].keys()
    assert not any("PASSWORD" in key or "URL" in key for key in config_map["data"]), "a secret in a ConfigMap"
    assert all(isinstance(value, str) for value in config_map["data"].values())


def test_the_job_is_bounded_and_unprivileged(deployed: Deployed) -> None:
    spec = deployed.manifests["Job"]["spec"]
    # PostgreSQL rolls a failed migration back, so a retry is safe; MySQL keeps what ran.
    assert spec["backoffLimit"] == (2 if deployed.database == "postgresql" else 0)
    assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
    pod = deployed.job_pod
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    [container] = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert set(container["resources"]) == {"requests", "limits"}
    assert set(container["resources"]["limits"]) == {"cpu", "memory"}


# A switch that names a password without holding one: MariaDB makes up root's password.
PASSWORD_SWITCHES = {"MARIADB_RANDOM_ROOT_PASSWORD"}


def test_no_file_holds_a_credential(deployed: Deployed) -> None:
    # Passwords appear only as references to the secret file, never as values.
    for service in deployed.compose["services"].values():
        for key, value in service.get("environment", {}).items():
            if "PASSWORD" in key and key not in PASSWORD_SWITCHES:
                assert key.endswith("_FILE") and str(value).startswith(f"{SECRETS_DIR}/"), (key, value)
            assert "URL" not in key, key
    for name in DEPLOY_FILES:
        text = (deployed.path / name).read_text()
        # A key that names a password, with a value on its line: only a secret file's path.
        for key, value in re.findall(r"(?im)^[^#]*?(\w*password\w*)[ \t]*[:=][ \t]*([^\s#].*)$", text):
            assert key in PASSWORD_SWITCHES or value.startswith(f"{SECRETS_DIR}/"), f"{name}: {key}: {value}"
        assert "://" not in text, f"{name} holds a URL"


def test_the_readme_documents_the_files_as_they_are(deployed: Deployed) -> None:
    readme = (deployed.path / "README.md").read_text()
    deploy = readme[readme.index("\n## Deploy\n") :]
    job, secret_volume = deployed.manifests["Job"], deployed.job_pod["volumes"][0]["secret"]
    [item] = secret_volume["items"]
    # The commands create and wait for the objects the manifests name.
    assert f"kubectl create secret generic {secret_volume['secretName']} --from-file={item['key']}=" in deploy
    assert f"job/{job['metadata']['name']}" in deploy and f"delete job {job['metadata']['name']}" in deploy
    [(_, secret)] = deployed.compose["secrets"].items()
    assert f"> {PurePosixPath(secret['file'])}" in deploy
    assert str(password_file(deployed)) in deploy
    # Whether several replicas may migrate at once: the lock decides.
    if deployed.database == "postgresql":
        assert "Several replicas migrating at once are safe" in deploy
    else:
        assert "no migration lock" in deploy and "exactly once, as the Job" in " ".join(deploy.split())


# The image, run


def build_context(checkout: Path) -> set[str]:
    """The files `docker build` sends, by .dockerignore (docker-py's reading of it)."""
    lines = (checkout / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return set(exclude_paths(str(checkout), patterns))


def compose_secret_path(mount: dict[str, str]) -> PurePosixPath:
    """Where compose mounts a service's secret: /run/secrets/<target> (or an absolute target)."""
    return SECRETS_DIR / mount.get("target", mount["source"])


def job_secret_path(deployed: Deployed) -> PurePosixPath:
    pod = deployed.job_pod
    [container], [volume] = pod["containers"], pod["volumes"]
    [mount] = [mount for mount in container["volumeMounts"] if mount["name"] == volume["name"]]
    [item] = volume["secret"]["items"]
    return PurePosixPath(mount["mountPath"]) / item["path"]


def password_file(deployed: Deployed) -> PurePosixPath:
    """The file the rendered settings read the password from (their README: "Configure the database")."""
    return SECRETS_DIR / f"{deployed.prefix}DATABASE_PASSWORD"


@dataclass
class Image:
    """The image's file system, as far as it is ours: the installed package and /app."""

    site: Path
    app: Path
    environment: dict[str, str]


def copy_instructions(stage: Stage, context: Path, workdir: Path) -> None:
    """The stage's COPY instructions from the build context, relative to its WORKDIR."""
    for copy in stage.all("COPY"):
        if copy.flags:  # --from another stage: the installed virtualenv
            continue
        *sources, destination = copy.value
        for source in sources:
            origin = context / source
            if origin.is_dir():  # its contents, into the destination
                shutil.copytree(origin, workdir / destination, dirs_exist_ok=True)
            else:  # into a destination directory (a trailing /), or as the destination
                target = workdir / destination / origin.name if destination.endswith("/") else workdir / destination
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)


def build_image(deployed: Deployed, root: Path) -> Image:
    """What `docker build` makes of the Dockerfile, for the project with one revision added."""
    checkout = root / "checkout"
    shutil.copytree(deployed.path, checkout)
    Project(checkout, package_dir(deployed)).add_thing()
    context = root / "context"
    for name in build_context(checkout):
        if (checkout / name).is_file():
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(checkout / name, context / name)
    build, final = deployed.stages
    # The build stage: its files, then `pip install .`, here into a directory of its own
    # (the dependencies and the build backend are this interpreter's; the image's Python
    # is the answered one, this one may be older).
    copy_instructions(build, context, root / "src")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--ignore-requires-python", "--target", str(root / "site"), "."],
        cwd=root / "src",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The runtime stage: alembic.ini and migrations/, without the package's source.
    copy_instructions(final, context, root / "app")
    assert not (root / "app" / package_dir(deployed)).exists()
    environment = {}
    for env in final.all("ENV"):
        pairs = dict(zip(env.value[::2], env.value[1::2], strict=True))
        environment.update({key: value.strip('"') for key, value in pairs.items() if key != "PATH"})
    return Image(root / "site", root / "app", environment)


def package_dir(deployed: Deployed) -> str:
    return deployed.answers.get("package_name") or deployed.path.name.replace("-", "_")


def run_container(
    image: Image, command: list[str], settings: dict[str, str], secret: PurePosixPath, password: str
) -> subprocess.CompletedProcess:
    """`command` (the image's ENTRYPOINT and CMD, or what replaces them) in a mount namespace:
    the password only in `secret` (under a fresh /run), then the root file system read-only."""
    assert secret.is_relative_to(SECRETS_DIR), secret
    script = (
        'set -e; mount -t tmpfs -o mode=0755 tmpfs /run; mkdir -p "$(dirname "$1")"; cat > "$1";'
        ' mount -o remount,bind,ro /; shift; exec "$@"'
    )
    program, *args = command
    assert program == "alembic", command
    # No secrets directory but the default: the image sets none, nor do compose and the Job.
    inherited = {k: v for k, v in subprocess_env().items() if not k.endswith("SECRETS_DIR")}
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(secret)]
        + [sys.executable, "-m", "alembic", *args],
        input=password + "\n",
        cwd=image.app,
        env={**inherited, **image.environment, "PYTHONPATH": str(image.site), **settings},
        capture_output=True,
        text=True,
        timeout=120,
    )


def on_server(settings: dict[str, str], prefix: str, url: URL) -> dict[str, str]:
    """The deploy file's settings, pointed at the test server's database (its port too,
    which compose.yaml leaves at the default)."""
    server = {"HOST": url.host, "PORT": str(url.port), "USER": url.username, "NAME": url.database}
    return {**settings, **{f"{prefix}DATABASE_{name}": value for name, value in server.items()}}


def compose_runs(deployed: Deployed) -> list[tuple[list[str], dict[str, str], PurePosixPath]]:
    """migrate, then app: each one's command, environment and password file."""
    services = deployed.compose["services"]
    entrypoint, *default = deployed.image_command
    return [
        (
            [entrypoint, *services[name].get("command", default)],
            services[name]["environment"],
            compose_secret_path(services[name]["secrets"][0]),
        )
        for name in ("migrate", "app")
    ]


def job_runs(deployed: Deployed) -> list[tuple[list[str], dict[str, str], PurePosixPath]]:
    """The Job's container: its command, the ConfigMap, the mounted Secret."""
    [container] = deployed.job_pod["containers"]
    entrypoint, *default = deployed.image_command
    return [
        (
            [entrypoint, *container.get("args", default)],
            deployed.manifests["ConfigMap"]["data"],
            job_secret_path(deployed),
        )
    ]


# Each database and each prefix runs both ways; each run builds its image (the runs are the slow part).
IMAGE_RUNS = [
    pytest.param({"database": "postgresql"}, "compose", id="postgresql-compose"),
    pytest.param(
        {"database": "postgresql", "env_prefix": "APP_", "python_version": "3.13"}, "job", id="postgresql-APP_-job"
    ),
    pytest.param({"database": "mysql"}, "job", id="mysql-job"),
    pytest.param(
        {"database": "mysql", "env_prefix": "APP_", "project_name": "Billing API"}, "compose", id="mysql-APP_-compose"
    ),
]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="a mount namespace (unshare) needs root")
@pytest.mark.parametrize(("answers", "runner"), IMAGE_RUNS)
def test_the_image_migrates_with_the_settings_it_is_given(
    request: pytest.FixtureRequest, answers: dict[str, str], runner: str, tmp_path: Path
) -> None:
    deployed = Deployed(render(tmp_path / "render", **answers), answers)
    image = build_image(deployed, tmp_path / "image")
    server = request.getfixturevalue("postgres" if deployed.database == "postgresql" else "mysql")
    # Taken as it is: no escaping, whatever the characters.
    password = "pa ss%@:/#?" + secrets.token_urlsafe(8)
    url = server.create_database(password=password)
    outputs = []
    for command, settings, secret in compose_runs(deployed) if runner == "compose" else job_runs(deployed):
        result = run_container(image, command, on_server(settings, deployed.prefix, url), secret, password)
        assert result.returncode == 0, result.stdout + result.stderr
        outputs.append(result.stdout + result.stderr)
    assert {"alembic_version", "thing"} <= server.tables(url)
    if runner == "compose":
        # The app stand-in, after migrate, sees the schema at head.
        assert "0001 (head)" in outputs[-1], outputs[-1]


# Without deploy files


@pytest.mark.parametrize("database", ["postgresql", "mysql"])
def test_deploy_files_n_renders_none_of_them(database: str, tmp_path: Path) -> None:
    project = render(tmp_path, database=database, deploy_files="n")
    files = files_under(project)
    assert not DEPLOY_FILES & files.keys()
    # cookiecutter cannot skip a directory, only files: deploy/kubernetes/ may remain, empty
    # (git does not track it).
    assert not [name for name in files if name.startswith("deploy/")]
    readme = (project / "README.md").read_text()
    for word in ("## Deploy", "Dockerfile", "compose", "kubectl", "Kubernetes", "secrets/database_password"):
        assert word not in readme, word
    assert "secrets/" not in (project / ".gitignore").read_text()


def test_sqlite_gets_no_deploy_files_and_the_readme_says_why(tmp_path: Path) -> None:
    project = make_project(tmp_path, database="sqlite", deploy_files="y")
    files = files_under(project.path)
    assert not DEPLOY_FILES & files.keys()
    readme = (project.path / "README.md").read_text()
    deploy = " ".join(readme[readme.index("\n## Deploy\n") :].split())
    # Why: the app opens the file itself; what to do instead: migrate right before it starts.
    assert "no migration image, compose file or manifests" in deploy
    assert "alembic upgrade head && exec" in deploy and "no migration lock" in deploy
