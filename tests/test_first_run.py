"""A clean first run: ``make run`` on a fresh copy of the project, setup included (a new
.venv from the pins, the preflight plugin installed editable, then the whole pipeline),
prints no Python warning. A file of its own: the longest test of the suite (about 4
minutes, most of it installing) runs beside the others instead of after its neighbours."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from helpers.processes import VENV_BIN, copy_project, subprocess_env

pytestmark = pytest.mark.slow


# pip's notice that this machine's pip.conf names an index folder that does not exist: the
# machine's, not the project's (a Python warning reads "<file>:<line>: SomeWarning: ...").
PIP_CONFIG_NOTICE = re.compile(
    r"^WARNING: Location '[^']+' is ignored: it is neither a file nor a directory\.$")


def test_the_first_make_run_on_a_clean_clone_prints_no_python_warning(tmp_path):
    """Setup included: a fresh .venv from the pinned requirements, the preflight plugin
    installed editable, then the whole pipeline, in a folder whose path has spaces."""
    # A folder as users name theirs: spaces and a letter outside ASCII.
    clone = copy_project(tmp_path / "My Projects" / "mnist pipeline ü")
    env = subprocess_env()
    env.pop("MLFLOW_TRACKING_URI", None)  # the Makefile's own store, mlflow.db in the clone
    # Only the system's tools: the Makefile must build and use its own environment.
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != VENV_BIN)
    env.pop("PYTHONPATH")
    try:
        result = subprocess.run(["make", "run", "ARGS=-P dataset=digits -P epochs=1"],
                                cwd=clone, env=env, capture_output=True, text=True,
                                timeout=1200)
        assert (clone / ".venv" / ".installed").is_file()
    finally:
        shutil.rmtree(clone / ".venv", ignore_errors=True)  # 5 GiB of wheels unpacked
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "main: done. test_accuracy" in result.stderr
    assert (clone / "mlflow.db").is_file()
    assert not re.findall(r"\w+Warning\b", output), output[-5000:]
    noticed = [line for line in output.splitlines() if "warn" in line.lower()
               and not PIP_CONFIG_NOTICE.match(line)]
    assert noticed == [], noticed
