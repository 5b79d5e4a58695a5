"""A Python 3.10 virtual environment for the simulator's side (tests/deploy/test_python310.py): find a 3.10
interpreter, make `build/py310` with tests/py310/requirements.txt. The test calls it when the
environment is missing or stale (the first run of the suite downloads the four requirements from
the package index); run it by hand to make the environment ahead of the tests.

    python tests/py310/provision.py        # prints the environment's python

Where a 3.10 interpreter is looked for, first found wins: $DPRGB_PYTHON310; `python3.10` on PATH;
pyenv's versions 3.10.* under $PYENV_ROOT, ~/.pyenv, /root/.pyenv (newest patch first);
`uv python find 3.10` when uv is installed.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements.txt"
VENV = Path(os.environ.get("DPRGB_PY310_VENV") or HERE.parents[1] / "build" / "py310")


def _is_310(python: str) -> bool:
    try:
        out = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2] == (3, 10))"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.stdout.strip() == "True"


def candidates() -> list[str]:
    found = [os.environ.get("DPRGB_PYTHON310"), shutil.which("python3.10")]
    for root in (os.environ.get("PYENV_ROOT"), os.path.expanduser("~/.pyenv"), "/root/.pyenv"):
        if root:
            versions = sorted(glob.glob(f"{root}/versions/3.10.*/bin/python"),
                              key=lambda p: int(p.split("3.10.")[1].split("/")[0] or 0), reverse=True)
            found += versions
    if shutil.which("uv"):
        out = subprocess.run(["uv", "python", "find", "3.10"], capture_output=True, text=True)
        found.append(out.stdout.strip() if out.returncode == 0 else None)
    return [p for p in dict.fromkeys(found) if p]


def find_python310() -> str:
    for python in candidates():
        if _is_310(python):
            return python
    raise SystemExit("no Python 3.10 interpreter found (set DPRGB_PYTHON310, or install one: pyenv install "
                     "3.10, or uv python install 3.10)")


def venv_python() -> Path:
    return VENV / "bin" / "python"


def is_ready() -> bool:
    """The environment exists, is 3.10, and was made from the requirements as they are now."""
    stamp = VENV / "requirements.txt"
    return (venv_python().is_file() and stamp.is_file() and stamp.read_text() == REQUIREMENTS.read_text()
            and _is_310(str(venv_python())))


def provision() -> Path:
    """The environment's python, made (or remade) when not ready."""
    if is_ready():
        return venv_python()
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([find_python310(), "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(venv_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "-r", str(REQUIREMENTS)], check=True)
    shutil.copyfile(REQUIREMENTS, VENV / "requirements.txt")  # the stamp: made from these
    return venv_python()


if __name__ == "__main__":
    print(provision())
    sys.exit(0)
