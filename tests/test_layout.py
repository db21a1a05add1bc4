"""Position says what a file is: every ``steps/*.py`` is an MLproject entry point (a door),
the MLflow-aware library lives in the rooms of ``steps/tracking/`` (one subpackage per
concern), the pure core in ``steps/core/``, and tests share helpers through
``tests/helpers/``, fixtures (and pytest's hooks) through ``conftest.py``. The code calls
the engines it builds on through their public interfaces only."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from steps.tracking.runtime.project import entry_module

ROOT = Path(__file__).parent.parent
STEPS = ROOT / "steps"
ENTRY_POINTS = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
DOORS = {entry_module(name) for name in ENTRY_POINTS}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it, including ``from a import b`` as a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return found


def runs_as_main(path: Path) -> bool:
    """``if __name__ == "__main__":`` anywhere at the top level of the file."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return True
    return False


LIBRARY = sorted(p for p in STEPS.rglob("*.py") if module_name(p) not in DOORS)


def test_the_files_directly_in_steps_are_exactly_the_entry_points():
    top = {module_name(p) for p in STEPS.glob("*.py")} - {"steps"}
    assert len(DOORS) == len(ENTRY_POINTS) >= 7
    assert top == DOORS
    # and each entry point's command runs its own door with `python -m`
    for name, spec in ENTRY_POINTS.items():
        assert spec["command"].startswith(f"python -m {entry_module(name)} "), name


def test_only_entry_points_run_as_main():
    doors = [p for p in STEPS.rglob("*.py") if module_name(p) in DOORS]
    assert doors and all(runs_as_main(p) for p in doors)
    everything = [*LIBRARY, *(ROOT / "plugins").rglob("*.py")]
    assert [p for p in everything if runs_as_main(p)] == []
    assert not list(ROOT.joinpath("steps").rglob("__main__.py"))


ROOMS = {"runtime", "pipeline", "training", "registry", "inference"}


def test_library_modules_sit_in_a_room_of_tracking_or_in_core():
    packages = {module_name(p).rsplit(".", 1)[0] for p in LIBRARY if p.name != "__init__.py"}
    assert packages == {"steps.core", *(f"steps.tracking.{room}" for room in ROOMS)}
    # Nothing but the package marker sits in steps/tracking itself, and no room is a hall.
    assert [p.name for p in (STEPS / "tracking").glob("*.py")] == ["__init__.py"]
    for room in ROOMS:
        modules = [p for p in (STEPS / "tracking" / room).glob("*.py") if p.name != "__init__.py"]
        assert 2 <= len(modules) <= 8, (room, [p.name for p in modules])
    # A room is named for what it holds, not as a noun form of a door.
    assert not ROOMS & {door.split(".")[1] for door in DOORS}


def test_each_project_constant_is_defined_once():
    """``PROJECT_DIR`` and its kin live in runtime/project.py; nothing defines them again."""
    names = {"PROJECT_DIR", "PROJECT_FILES", "MAKE_EXPERIMENT", "first_line"}
    where = {}
    for path in [*STEPS.rglob("*.py"), *(ROOT / "tests").rglob("*.py"),
                 *(ROOT / "tools").rglob("*.py")]:
        for node in ast.parse(path.read_text()).body:
            targets = ([t.id for t in node.targets if isinstance(t, ast.Name)]
                       if isinstance(node, ast.Assign) else
                       [node.name] if isinstance(node, ast.FunctionDef) else [])
            for name in set(targets) & names:
                where.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert where == {"PROJECT_DIR": ["steps/tracking/runtime/project.py"],
                     "PROJECT_FILES": ["steps/tracking/runtime/project.py"],
                     "MAKE_EXPERIMENT": ["steps/tracking/runtime/project.py"],
                     "first_line": ["steps/core/text.py"]}


def test_the_makefiles_experiment_is_the_projects():
    from steps.tracking.runtime.project import MAKE_EXPERIMENT
    makefile = (ROOT / "Makefile").read_text()
    assert f"EXPERIMENT ?= $(or $(MLFLOW_EXPERIMENT_NAME),{MAKE_EXPERIMENT})\n" in makefile


# Engines whose private names the code must not touch: their ``_``-named functions,
# methods and modules change without notice. ``os._exit`` is documented, so it is allowed.
ENGINES = {"mlflow", "torch", "optuna", "pyspark", "mlserver", "mlserver_mlflow", "psutil",
           "click", "atexit", "os", "sys", "signal", "subprocess", "threading", "logging",
           "multiprocessing", "json", "pathlib", "tempfile", "shutil", "socket"}
ALLOWED = {"os._exit"}
SCANNED = [*STEPS.rglob("*.py"), *(ROOT / "plugins").rglob("*.py"),
           *(ROOT / "deploy").rglob("*.py"), *(ROOT / "tools").rglob("*.py")]


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(source: str) -> list[str]:
    """Every private name of an engine a piece of code reaches: a ``_`` attribute of
    anything but ``self``/``cls`` (the project's own objects have no private attributes
    read from outside), a ``_`` name or module imported from an engine, and a ``_`` method
    defined on a class that derives from an engine's class."""
    tree = ast.parse(source)
    engine_names = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ENGINES:
                    engine_names.add((alias.asname or alias.name).split(".")[0])
                    found += [alias.name for part in alias.name.split(".") if private(part)]
        elif (isinstance(node, ast.ImportFrom) and node.module and not node.level
              and node.module.split(".")[0] in ENGINES):
            engine_names |= {a.asname or a.name for a in node.names}
            if any(private(part) for part in node.module.split(".")):
                found.append(node.module)
            found += [f"{node.module}.{a.name}" for a in node.names if private(a.name)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            base = ast.unparse(node.value)
            if base not in {"self", "cls"} and f"{base}.{node.attr}" not in ALLOWED:
                found.append(f"{base}.{node.attr}")
        elif isinstance(node, ast.ClassDef):
            bases = {ast.unparse(b).split(".")[0] for b in node.bases}
            if bases & engine_names:
                found += [f"{node.name}.{item.name}" for item in node.body
                          if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
                          and private(item.name)]
    return found


def test_the_scan_finds_each_kind_of_private_use():
    source = """
import atexit
import os
from mlflow.projects import _wait_for
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from mlserver_mlflow import MLflowRuntime

atexit._run_exitfuncs()
os._exit(0)

class Agent(LocalElasticAgent):
    def _monitor_workers(self, group):
        return self._pcontext

class Runtime(MLflowRuntime):
    async def _sync_metadata(self):
        pass

class Mine:
    def _helper(self):
        pass
"""
    assert sorted(private_uses(source)) == sorted([
        "mlflow.projects._wait_for", "atexit._run_exitfuncs", "Agent._monitor_workers",
        "Runtime._sync_metadata"])


def test_nothing_reaches_an_engines_private_names():
    assert len(SCANNED) > 40
    uses = {str(p.relative_to(ROOT)): private_uses(p.read_text()) for p in SCANNED}
    assert {path: found for path, found in uses.items() if found} == {}


def test_no_entry_script_imports_another_and_no_library_module_imports_one():
    for path in [*STEPS.rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]:
        names = imported(path)
        other_doors = (DOORS - {module_name(path)}) & names
        assert not other_doors, f"{path.relative_to(ROOT)} imports {sorted(other_doors)}"
    # The walk does see the library imports of a door.
    assert "steps.tracking.runtime.cli" in imported(STEPS / "train.py")


def test_core_imports_neither_mlflow_nor_click_nor_the_tracking_library():
    seen = {}
    for path in (STEPS / "core").glob("*.py"):
        top_level = {name.split(".")[0] for name in imported(path)}
        seen[path.name] = top_level
        assert not top_level & {"mlflow", "click"}, path
        assert not {n for n in imported(path) if n.startswith("steps.tracking")}, path
    assert "torch" in seen["model.py"]  # the walk does see imports
    # The logged classifier carries model.py alone (code_paths): no import of this project.
    assert seen["model.py"] == {"__future__", "torch"}
    assert seen["choices.py"] == set()  # main and register import it without torch


def test_conftest_holds_fixtures_and_hooks_only_and_tests_import_helpers_by_name():
    tree = ast.parse((ROOT / "tests" / "conftest.py").read_text())
    defined = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
    assert defined
    for node in defined:
        decorators = [ast.unparse(d) for d in getattr(node, "decorator_list", [])]
        hook = node.name.startswith("pytest_")  # pytest's hooks live in conftest.py
        assert hook or any(d.startswith("pytest.fixture") for d in decorators), node.name
    assert not [n for n in tree.body if isinstance(n, ast.Assign)]
    for path in (ROOT / "tests").rglob("*.py"):
        assert "conftest" not in {name.split(".")[0] for name in imported(path)}, path
    assert any("helpers.processes" in imported(p) for p in (ROOT / "tests").glob("test_*.py"))
