"""Position says what a file is: every ``steps/*.py`` is an MLproject entry point (a door),
the MLflow-aware library lives in ``steps/tracking/``, the pure core in ``steps/core/``, and
tests share helpers through ``tests/helpers/``, fixtures (and pytest's hooks) through
``conftest.py``."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from steps.tracking.cache import entry_module

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
    # and each entry point's command runs one of them with `python -m`
    assert all(door.count(".") == 1 for door in DOORS)


def test_only_entry_points_run_as_main():
    doors = [p for p in STEPS.rglob("*.py") if module_name(p) in DOORS]
    assert doors and all(runs_as_main(p) for p in doors)
    everything = [*LIBRARY, *(ROOT / "plugins").rglob("*.py")]
    assert [p for p in everything if runs_as_main(p)] == []
    assert not list(ROOT.joinpath("steps").rglob("__main__.py"))


def test_library_modules_sit_in_tracking_or_core():
    packages = {module_name(p).rsplit(".", 1)[0] for p in LIBRARY if p.name != "__init__.py"}
    assert packages == {"steps.tracking", "steps.core"}


def test_no_entry_script_imports_another_and_no_library_module_imports_one():
    for path in [*STEPS.rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]:
        names = imported(path)
        other_doors = (DOORS - {module_name(path)}) & names
        assert not other_doors, f"{path.relative_to(ROOT)} imports {sorted(other_doors)}"
    # The walk does see the library imports of a door.
    assert "steps.tracking.cli" in imported(STEPS / "train.py")


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
