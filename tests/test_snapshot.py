"""The default render, file by file, against its golden copy in tests/snapshots/default/.

Any change to what `cookiecutter --no-input` renders fails this test; refreshing the
copy turns the change into a diff under tests/snapshots/default/ that a reviewer reads
next to the template change that caused it. After an intended change:

    UPDATE_SNAPSHOTS=1 python -m pytest tests/test_snapshot.py

then review `git diff tests/snapshots` and commit it with the change.
"""

from __future__ import annotations

import difflib
import os
import shutil
from pathlib import Path

from rendering import files_under, render

SNAPSHOT = Path(__file__).resolve().parent / "snapshots" / "default"
REFRESH = "UPDATE_SNAPSHOTS=1 python -m pytest tests/test_snapshot.py"


def write_snapshot(files: dict[str, bytes]) -> None:
    shutil.rmtree(SNAPSHOT, ignore_errors=True)
    for name, content in files.items():
        path = SNAPSHOT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def differences(expected: dict[str, bytes], rendered: dict[str, bytes]) -> list[str]:
    problems = [f"new file: {name}" for name in sorted(rendered.keys() - expected.keys())]
    problems += [f"no longer rendered: {name}" for name in sorted(expected.keys() - rendered.keys())]
    for name in sorted(expected.keys() & rendered.keys()):
        if expected[name] != rendered[name]:
            diff = difflib.unified_diff(
                expected[name].decode(errors="replace").splitlines(),
                rendered[name].decode(errors="replace").splitlines(),
                f"snapshot/{name}",
                f"rendered/{name}",
                lineterm="",
            )
            problems.append("\n".join(diff) or f"{name}: differs in line endings or trailing newline")
    return problems


def test_default_render_matches_the_snapshot(tmp_path: Path) -> None:
    rendered = files_under(render(tmp_path))
    if os.environ.get("UPDATE_SNAPSHOTS"):
        write_snapshot(rendered)
    expected = files_under(SNAPSHOT) if SNAPSHOT.is_dir() else {}
    problems = differences(expected, rendered)
    assert not problems, "\n".join([*problems, f"if the change is intended, refresh with: {REFRESH}"])
