"""``./bootstrap.sh run`` on a fresh machine: step lines and one line per package instead of a silent minute of
pip, the install skipped once done, pip's failure shown and fatal, and the full path of the ``appliance``
command printed before the demo starts. The real script runs; only python/pip/appliance are stand-ins
(a stub interpreter that makes a stub virtual environment), since the test machine has no package index."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from testsupport.common import ROOT

pytestmark = pytest.mark.integration

STUB_PYTHON = """#!/usr/bin/env bash
# stand-in for python3: `--version`, and `-m venv DIR` making DIR/bin/{python,pip,appliance}
if [ "$1" = --version ]; then echo "Python 3.11.2"; exit 0; fi
[ "$1 $2" = "-m venv" ] || { echo "unexpected: $*" >&2; exit 9; }
mkdir -p "$3/bin"
cat > "$3/bin/python" <<'EOF'
#!/usr/bin/env bash
exit 0
EOF
cat > "$3/bin/pip" <<'EOF'
#!/usr/bin/env bash
echo "pip $*" >> "$(dirname "$0")/../pip-calls"
if [ -n "$PIP_FAIL" ]; then
  echo "Collecting broken-dep"; echo "ERROR: No matching distribution found for broken-dep"; exit 1
fi
echo "WARNING: Running pip as the 'root' user can result in broken permissions"
echo "Collecting numpy>=1.24"
echo "  Downloading numpy-2.1.0-cp311-cp311-manylinux_2_17_x86_64.whl (16.3 MB)"
echo "Collecting pydicom>=3"
echo "Collecting highdicom"
echo "Installing collected packages: numpy, pydicom, highdicom"
echo "Successfully installed highdicom-0.23.0 numpy-2.1.0 pydicom-3.0.1"
EOF
cat > "$3/bin/appliance" <<'EOF'
#!/usr/bin/env bash
echo "appliance called with: $*"
EOF
chmod +x "$3/bin/python" "$3/bin/pip" "$3/bin/appliance"
"""


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of what ``bootstrap.sh`` needs (itself and pyproject.toml) with a stub python3 beside it."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("bootstrap.sh", "pyproject.toml", "constraints.txt"):
        shutil.copy2(ROOT / name, root / name)
    stub = tmp_path / "python3"
    stub.write_text(STUB_PYTHON)
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    return root


def _run(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "VENV", "PIP_"))}
    full.update(PYTHON=str(root.parent / "python3"), **env)
    return subprocess.run(
        ["bash", str(root / "bootstrap.sh"), "run", *args],
        cwd=root.parent,
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_run_shows_steps_and_packages_then_the_full_command_and_starts_the_demo(checkout: Path) -> None:
    r = _run(checkout, "--keep")
    assert r.returncode == 0, r.stderr
    err = r.stderr.splitlines()
    assert err[0] == "== [1/3] creating the Python environment .venv (Python 3.11.2)"
    assert err[1].startswith("== [2/3] installing the appliance and its dependencies into .venv")
    assert "     1  numpy>=1.24" in err and "     3  highdicom" in err  # one line per package fetched
    assert err.count("   installed 3 package(s)") == 2  # pip itself, then the appliance
    assert "WARNING" not in r.stderr and "Downloading" not in r.stderr  # pip's noise stays in its log
    venv = checkout / ".venv"
    assert (venv / "pip-install.log").read_text().count("WARNING: Running pip as the 'root' user") == 1
    assert f"the command is {venv}/bin/appliance" in r.stderr  # a full path: .venv/bin is not on PATH
    assert r.stdout.strip() == "appliance called with: demo --keep"
    calls = (venv / "pip-calls").read_text().splitlines()
    assert calls == ["pip install --upgrade pip", "pip install -c constraints.txt -e .[dev]"]

    again = _run(checkout)
    assert again.returncode == 0, again.stderr
    assert "== [1/3] Python environment: .venv (exists)" in again.stderr
    assert "== [2/3] dependencies up to date" in again.stderr
    assert (venv / "pip-calls").read_text().splitlines() == calls  # not installed again

    (checkout / "pyproject.toml").write_text((checkout / "pyproject.toml").read_text() + "\n# changed\n")
    third = _run(checkout)
    assert "[2/3] installing" in third.stderr and len((venv / "pip-calls").read_text().splitlines()) == 4


def test_a_failing_pip_stops_the_run_and_shows_why(checkout: Path) -> None:
    r = _run(checkout, PIP_FAIL="1")
    assert r.returncode != 0
    assert "pip install --upgrade pip failed; its last lines" in r.stderr
    assert "ERROR: No matching distribution found for broken-dep" in r.stderr
    assert "appliance called with" not in r.stdout  # the demo never started
    assert not list((checkout / ".venv").glob(".installed-*"))  # the next run installs again
