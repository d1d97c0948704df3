"""The README's quick start, run as written in a fresh virtual environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rendering import TEMPLATE, readme_block, subprocess_env


def test_quick_start_renders_sqlite_and_migrates(tmp_path: Path) -> None:
    (command,) = readme_block(TEMPLATE / "README.md", "quick-start")
    command = command.replace("gh:<org>/<this-repo>", str(TEMPLATE))
    # Only a Python on the PATH: the command makes its own virtual environment.
    python_only = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env=subprocess_env(inherit=False, PATH=python_only, HOME=str(Path.home())),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / ".venv" / "bin" / "alembic").is_file()
    assert (tmp_path / "my-service" / "my_service.sqlite3").is_file()
    assert "Context impl SQLiteImpl" in result.stderr
