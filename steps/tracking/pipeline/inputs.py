"""What a step's result depends on (:class:`StepInputs`), and what changed between two of
them (:func:`changes`).

A step's inputs are everything that can change its result:

- its parameters, as strings (as MLflow stores them);
- the runs it consumed (the upstream steps);
- every project file its process runs or ships into a model: the entry script named in
  MLproject's command, the project modules it imports (found by reading the imports, at
  any depth, in functions too), the modules it names as strings (what a logged model
  carries, ``steps.tracking.inference.models.SHIPPED_MODULES``), their packages'
  ``__init__`` files, and ``MLproject``, ``conda.yaml`` and ``requirements.txt``;
- the installed versions of the packages ``requirements.txt`` pins;
- for ``data_dir``, the names, sizes and modification times of the files in it.

Their hash is the key the step cache finds a run by (``steps/tracking/pipeline/cache.py``).
``main`` puts it on each step's run; a step started alone that main could have run the same
way puts it on its own (:func:`findable_by_main`).
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from steps.tracking.runtime import tags
from steps.tracking.runtime.project import (
    PACKAGE,
    PROJECT_DIR,
    PROJECT_FILES,
    entry_module,
    entry_points,
    read_requirements,
)

# --------------------------------------------------------------------------- code


def module_path(module: str, root: Path) -> Path | None:
    """The source file of a project module under ``root``, or None if it is not one."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _named_modules(tree: ast.Module) -> set[str]:
    """Project modules a file imports (anywhere, functions included) or names in a
    module-level string constant (``CLASSIFIER_MODULE = "steps.tracking.inference.classifier"``:
    a module it ships into a model or loads by name)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            # `from steps.tracking.runtime import tags`: the name may be a module.
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            found.add(node.value.value)
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


def code_files(entry_point: str, root: Path = PROJECT_DIR) -> list[str]:
    """Every project file the step's process runs or ships, relative to ``root``, sorted."""
    seen: set[Path] = set()
    pending = [entry_module(entry_point, root)]
    while pending:
        module = pending.pop()
        parts = module.split(".")
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
        for depth in range(1, len(parts) + 1):
            path = module_path(".".join(parts[:depth]), root)
            if path is None or path in seen:
                continue
            seen.add(path)
            pending.extend(_named_modules(ast.parse(path.read_text(), str(path))))
    return sorted([p.relative_to(root).as_posix() for p in seen] +
                  [name for name in PROJECT_FILES if (root / name).is_file()])


def file_hashes(paths: list[str], root: Path = PROJECT_DIR) -> dict[str, str]:
    return {p: hashlib.sha256((root / p).read_bytes()).hexdigest()[:16] for p in paths}


@cache
def pinned_package_versions(root: Path = PROJECT_DIR) -> dict[str, str]:
    """Installed version of every package requirements.txt pins ('none' if missing)."""
    versions = {}
    for requirement in read_requirements(root / "requirements.txt"):
        try:
            versions[requirement.name] = version(requirement.name)
        except PackageNotFoundError:
            versions[requirement.name] = "none"
    return versions


def folder_fingerprint(folder: str) -> str:
    """Cheap identity of a folder's files (name, size, mtime), so edited data is not reused."""
    if not folder:
        return ""
    root = Path(folder)
    entries = sorted(
        f"{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in root.rglob("*") if p.is_file()
    ) if root.is_dir() else ["<missing>"]
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class StepInputs:
    """Everything a step's result depends on; equal inputs give an equal key."""

    entry_point: str
    params: dict[str, str]
    upstream: dict[str, str] = field(default_factory=dict)  # step -> run id
    files: dict[str, str] = field(default_factory=dict)  # path -> content hash
    packages: dict[str, str] = field(default_factory=dict)  # name -> installed version
    data_files: str = ""  # data_dir fingerprint

    @classmethod
    def collect(cls, entry_point: str, params: dict, upstream: dict[str, str] | None = None,
                data_dir: str = "", root: Path = PROJECT_DIR) -> StepInputs:
        return cls(entry_point=entry_point,
                   params={k: str(v) for k, v in sorted(params.items())},
                   upstream=dict(upstream or {}),
                   files=file_hashes(code_files(entry_point, root), root),
                   packages=dict(pinned_package_versions(root)),
                   data_files=folder_fingerprint(data_dir))

    def key(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:32]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> StepInputs | None:
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return None


def findable_by_main(entry_point: str, passed: dict[str, str],
                     consumed: dict[str, str] | None = None, data_dir: str = "") -> bool:
    """Give the active run of a step started alone the key main would give this step, so
    that a later ``mlflow run .`` reuses it once it FINISHED, or continues it from its
    checkpoint if it stopped. Returns whether the run was keyed.

    ``passed``: what main would pass besides its own parameters (train's ``data``, the
    resolved ``data_dir``); ``consumed``: upstream step -> the ``runs:/<id>/...`` URI used.
    Only a step main could have run so is keyed: each parameter main does not pass is at
    its default (a ``val_fraction`` of one's own is another training), and each consumed
    URI is a run of that step. A run main created already carries its key.
    """
    import click
    import mlflow
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    client, run_id = mlflow.MlflowClient(), mlflow.active_run().info.run_id
    if tags.CACHE_KEY in client.get_run(run_id).data.tags:
        return False
    upstream = {}
    for step, uri in (consumed or {}).items():
        found = re.match(r"runs:/([0-9a-f]{32})/", uri)
        try:
            if not found or client.get_run(found.group(1)).data.tags.get(tags.STEP) != step:
                return False
        except MlflowException:  # no such run: the step's own check says so, in its words
            return False
        upstream[step] = found.group(1)
    ctx = click.get_current_context()
    by_main = entry_points()["main"]["parameters"]
    params = dict(passed)
    for option in ctx.command.params:
        value = ctx.params.get(option.name)
        if option.name in passed:
            continue
        if option.name in by_main:
            params[option.name] = "" if value is None else value
        elif value != option.type_cast_value(ctx, option.get_default(ctx)):
            return False
    inputs = StepInputs.collect(entry_point, params, upstream, data_dir)
    client.log_batch(run_id, tags=[RunTag(tags.CACHE_KEY, inputs.key()),
                                   RunTag(tags.CACHE_INPUTS, inputs.to_json())])
    return True


# --------------------------------------------------------------------------- changes

# The kinds of :class:`Change`, in the order a why-line tells them.
FILES, PARAMS, UPSTREAM, PACKAGES, DATA_FILES = (
    "files", "params", "upstream", "packages", "data_files")


@dataclass(frozen=True)
class Change:
    """One kind of input that differs: ``items`` are (name, before, after), '' where the
    name was missing on that side (a file added or removed; a data folder has no name)."""

    kind: str
    items: tuple[tuple[str, str, str], ...]

    def said(self) -> str:
        if self.kind == FILES:
            return "changed files: " + ", ".join(name for name, _, _ in self.items)
        if self.kind == DATA_FILES:
            return "the files in data_dir changed"
        unset = "(none)" if self.kind == UPSTREAM else "none" if self.kind == PACKAGES \
            else "(unset)"
        what = "{} run {} -> {}" if self.kind == UPSTREAM else "{} {} -> {}"
        return f"{self.kind}: " + ", ".join(
            what.format(name, before or unset, after or unset)
            for name, before, after in self.items)


def _is_uri(value: str) -> bool:
    return value.startswith(("runs:/", "models:/"))


def _differing(old: dict, new: dict) -> tuple[tuple[str, str, str], ...]:
    return tuple((k, old.get(k, ""), new.get(k, "")) for k in sorted(old.keys() | new.keys())
                 if old.get(k) != new.get(k))


def changes(old: StepInputs, new: StepInputs) -> list[Change]:
    """What differs between two steps' inputs, kind by kind (empty: nothing recorded)."""
    upstream = _differing(old.upstream, new.upstream)
    # A URI that moved with its upstream run is said once, as the upstream.
    params = tuple(item for item in _differing(old.params, new.params)
                   if not (upstream and _is_uri(item[1]) and _is_uri(item[2])))
    found = [Change(FILES, _differing(old.files, new.files)), Change(PARAMS, params),
             Change(UPSTREAM, upstream), Change(PACKAGES, _differing(old.packages,
                                                                     new.packages))]
    if old.data_files != new.data_files:
        found.append(Change(DATA_FILES, (("data_dir", old.data_files, new.data_files),)))
    return [change for change in found if change.items]
