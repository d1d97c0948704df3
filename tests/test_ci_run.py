""".ci/run, CI's script: what it does to the machine, tested in a temporary directory.

While it installs the database servers it writes Debian's policy-rc.d, so that the
packages do not start their services; afterwards the machine's own policy (or none)
must be back as it was.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from rendering import TEMPLATE, subprocess_env

KEEP_STOPPED = "#!/bin/sh\nexit 101\n"


def kept_stopped(policy: Path, *command: str) -> subprocess.CompletedProcess:
    """.ci/run's with_services_kept_stopped POLICY COMMAND..., from the sourced script."""
    return subprocess.run(
        ["bash", "-c", 'source .ci/run && with_services_kept_stopped "$@"', "bash", str(policy), *command],
        cwd=TEMPLATE,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def machine_policy(policy: Path, kind: str) -> None:
    if kind == "own-file":
        policy.write_text("#!/bin/sh\n# the machine's own policy\nexit 0\n")
        policy.chmod(0o750)
    elif kind == "own-symlink":
        target = policy.with_name("site-policy")
        target.write_text("#!/bin/sh\nexit 0\n")
        policy.symlink_to(target)


def state(policy: Path) -> tuple | None:
    """What is at `policy`, as a later apt-get run would find it."""
    if policy.is_symlink():
        return ("symlink", str(policy.readlink()))
    if policy.exists():
        return ("file", policy.read_text(), policy.stat().st_mode)
    return None


@pytest.mark.parametrize("before", ["none", "own-file", "own-symlink"])
def test_the_machines_policy_rc_d_is_back_after_the_install(tmp_path: Path, before: str) -> None:
    policy = tmp_path / "policy-rc.d"
    machine_policy(policy, before)
    original = state(policy)
    during = tmp_path / "during"
    result = kept_stopped(policy, "cp", "-p", str(policy), str(during))
    assert result.returncode == 0, result.stderr
    # While the packages install, no service may start.
    assert during.read_text() == KEEP_STOPPED and during.stat().st_mode & 0o111
    assert state(policy) == original


def test_the_machines_policy_rc_d_is_back_when_the_install_fails(tmp_path: Path) -> None:
    policy = tmp_path / "policy-rc.d"
    machine_policy(policy, "own-file")
    original = state(policy)
    result = kept_stopped(policy, "sh", "-c", "exit 100")
    assert result.returncode == 100
    assert state(policy) == original
