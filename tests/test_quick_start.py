"""The README's quick start, run as written in a fresh virtual environment."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from rendering import TEMPLATE


def readme_block(marker: str) -> str:
    """The ```bash block after `<!-- marker` in README.md (what .ci/run extracts too)."""
    readme = (TEMPLATE / "README.md").read_text()
    match = re.search(rf"<!-- {marker}.*?-->\s*```bash\n(.*?)```", readme, re.S)
    assert match, f"README.md has no {marker} block"
    return match.group(1).strip()


def test_quick_start_renders_sqlite_and_migrates(tmp_path: Path) -> None:
    command = readme_block("quick-start").replace("gh:<org>/<this-repo>", str(TEMPLATE))
    subprocess.run([sys.executable, "-m", "venv", tmp_path / "venv"], check=True)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", f". {tmp_path}/venv/bin/activate && {command}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "my-service" / "my_service.sqlite3").is_file()
    assert "Context impl SQLiteImpl" in result.stderr
