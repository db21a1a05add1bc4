"""The project itself: its folder, what MLproject says each entry point runs, the files
every ``mlflow run`` reads, and the pins of ``requirements.txt``. The one place these are
read from (the step cache hashes them, the layout test and the doors' checks ask them)."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[3]
# Read by `mlflow run` and by the environment managers, whatever the entry point.
PROJECT_FILES = ("MLproject", "conda.yaml", "requirements.txt")
PACKAGE = "steps"
# The experiment the Makefile's targets use (its EXPERIMENT; a test keeps the two equal).
MAKE_EXPERIMENT = "mnist-pipeline"


def entry_points(root: Path = PROJECT_DIR) -> dict:
    """MLproject's ``entry_points``: name -> {parameters, command}."""
    import yaml

    return yaml.safe_load((root / "MLproject").read_text())["entry_points"]


def entry_module(entry_point: str, root: Path = PROJECT_DIR) -> str:
    """The module MLproject's command runs for ``entry_point`` (``python -m <module>``)."""
    command = entry_points(root)[entry_point]["command"]
    found = re.search(r"python\S*\s+-m\s+(\S+)", command)
    if not found:
        raise ValueError(f"MLproject: the command of {entry_point} is not "
                         "`python -m <module>`")
    return found.group(1)


def module_file(name: str) -> str:
    """The source file of a project module, found without importing it."""
    return importlib.util.find_spec(name).origin


def read_requirements(path: str | os.PathLike) -> list:
    """The requirements of a pip requirements file as ``packaging`` Requirements; comments,
    options (``-r``, ``-c``) and unparsable lines are skipped, as MLflow does."""
    from packaging.requirements import InvalidRequirement, Requirement

    found = []
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            found.append(Requirement(line))
        except InvalidRequirement:
            continue
    return found
