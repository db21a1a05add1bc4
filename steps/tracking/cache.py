"""The step cache: what a step's result depends on, when an earlier run can stand in for
it, and, when it cannot, why.

A step's inputs (:class:`StepInputs`) are everything that can change its result:

- its parameters, as strings (as MLflow stores them);
- the runs it consumed (the upstream steps);
- every project file its process runs or ships into a model: the entry script named in
  MLproject's command, the project modules it imports (found by reading the imports, at
  any depth, in functions too), the modules it names as strings (what a logged model
  carries, ``steps.tracking.artifacts.SHIPPED_MODULES``), their packages' ``__init__`` files,
  and ``MLproject``, ``conda.yaml`` and ``requirements.txt``;
- the installed versions of the packages ``requirements.txt`` pins;
- for ``data_dir``, the names, sizes and modification times of the files in it.

Their hash is the run's ``pipeline.cache_key`` tag, found with one ``search_runs`` filter;
the inputs themselves are kept beside it (``pipeline.cache_inputs``, JSON), so that a step
that runs again can say exactly what changed since the newest finished run of that step.
A run is reused only when it FINISHED and what it hands on still exists (a listing, not a
download: see ``steps.tracking.artifacts.output_missing``). A step's run carries its key from the
start (``steps.tracking.runs.CACHE_ENV``), so a run with these inputs that ended KILLED or FAILED
holding a checkpoint (train's, ``steps/tracking/checkpoints.py``) is found too, and continued in
place rather than started again.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from steps.tracking import tags
from steps.tracking.artifacts import output_missing, read_requirements
from steps.tracking.checkpoints import RESUMABLE_STATUSES, Pointer
from steps.tracking.cli import StepError, first_line
from steps.tracking.runs import CACHE_ENV, newest_runs, quote

log = logging.getLogger("steps.tracking.cache")

PROJECT_DIR = Path(__file__).resolve().parents[2]
# Read by `mlflow run` and by the environment managers, whatever the step.
PROJECT_FILES = ("MLproject", "conda.yaml", "requirements.txt")
PACKAGE = "steps"
# What a step's run hands on to later steps; each must still exist for the run to be reused.
HANDED_ON = (tags.DATA_URI, tags.MODEL_URI, tags.NETWORK_URI)


# --------------------------------------------------------------------------- code


def entry_module(entry_point: str, root: Path = PROJECT_DIR) -> str:
    """The module MLproject's command runs for ``entry_point`` (``python -m <module>``)."""
    import yaml

    command = yaml.safe_load((root / "MLproject").read_text())["entry_points"][entry_point][
        "command"]
    found = re.search(r"python\S*\s+-m\s+(\S+)", command)
    if not found:
        raise StepError(f"MLproject: the command of {entry_point} is not `python -m <module>`")
    return found.group(1)


def module_path(module: str, root: Path) -> Path | None:
    """The source file of a project module under ``root``, or None if it is not one."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _named_modules(tree: ast.Module) -> set[str]:
    """Project modules a file imports (anywhere, functions included) or names in a
    module-level string constant (``SERVING_MODULE = "steps.tracking.serving"``: a module it ships
    into a model or loads by name)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            # `from steps.tracking import tags`: the name may be a module of the package.
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


def _is_uri(value: str) -> bool:
    return value.startswith(("runs:/", "models:/"))


def changes(old: StepInputs, new: StepInputs) -> list[str]:
    """What differs between two steps' inputs, in words a person can check."""
    found = []
    edited = sorted(p for p in old.files.keys() | new.files.keys()
                    if old.files.get(p) != new.files.get(p))
    if edited:
        found.append("changed files: " + ", ".join(edited))
    upstream_changed = old.upstream != new.upstream
    params = [f"{k} {old.params.get(k, '(unset)')!s} -> {new.params.get(k, '(unset)')!s}"
              for k in sorted(old.params.keys() | new.params.keys())
              if old.params.get(k) != new.params.get(k)
              # A URI that moved with its upstream run is said once, as the upstream.
              and not (upstream_changed and _is_uri(old.params.get(k, ""))
                       and _is_uri(new.params.get(k, "")))]
    if params:
        found.append("params: " + ", ".join(params))
    if upstream_changed:
        found.append("upstream: " + ", ".join(
            f"{step} run {old.upstream.get(step, '(none)')} -> {new.upstream.get(step, '(none)')}"
            for step in sorted(old.upstream.keys() | new.upstream.keys())
            if old.upstream.get(step) != new.upstream.get(step)))
    packages = [f"{k} {old.packages.get(k, 'none')} -> {new.packages.get(k, 'none')}"
                for k in sorted(old.packages.keys() | new.packages.keys())
                if old.packages.get(k) != new.packages.get(k)]
    if packages:
        found.append("packages: " + ", ".join(packages))
    if old.data_files != new.data_files:
        found.append("the files in data_dir changed")
    return found


# --------------------------------------------------------------------------- runs


def missing_outputs(client, run) -> list[str]:
    """What ``run`` hands on that can no longer be read (empty when all is there)."""
    from mlflow.exceptions import MlflowException

    missing = [why for why in (output_missing(client, run.data.tags[t])
                               for t in HANDED_ON if t in run.data.tags) if why]
    registered = run.data.tags.get(tags.REGISTERED_VERSION)
    name = run.data.params.get("model_name")
    if registered and name:
        try:
            client.get_model_version(name, registered)
        except MlflowException:
            missing.append(f"model version {name}/{registered} no longer exists")
    return missing


class Pipeline:
    """Runs steps as children of ``parent``; each result is the run that did the work."""

    def __init__(self, client, parent, use_cache: bool, root: Path = PROJECT_DIR) -> None:
        self.client, self.parent, self.use_cache, self.root = client, parent, use_cache, root
        self.experiment_id = parent.info.experiment_id
        self.reused: list[str] = []

    def step(self, entry_point: str, params: dict, upstream: dict | None = None,
             data_dir: str = ""):
        """Reuse or run ``entry_point``; ``upstream`` maps step names to the runs consumed."""
        inputs = StepInputs.collect(
            entry_point, params, {s: r.info.run_id for s, r in (upstream or {}).items()},
            data_dir, self.root)
        if not self.use_cache:
            reason = "use_cache=false"
        else:
            hit, reason = self.lookup(inputs)
            if hit is not None:
                return self.reuse(hit, inputs.entry_point)
            stopped = self.resumable(inputs)
            if stopped is not None:
                pointer = Pointer.of(stopped)
                because = stopped.data.tags.get(tags.ENDED_BECAUSE, "")
                log.info("main: %s resumes run %s at epoch %d of %d (it was %s%s)",
                         entry_point, stopped.info.run_id, pointer.epoch + 1, pointer.epochs,
                         stopped.info.status, f": {because}" if because else "")
                return self.run(inputs, continuing=stopped)
        log.info("main: %s runs: %s", entry_point, reason)
        return self.run(inputs)

    def _with_key(self, inputs: StepInputs, status: str = "", max_results: int = 1) -> list:
        """This experiment's runs with ``inputs``' key (of ``status``, if given), newest
        first."""
        query = f"tags.`{tags.CACHE_KEY}` = {quote(inputs.key())}"
        if status:
            query += f" and attributes.status = '{status}'"
        return self.client.search_runs([self.experiment_id], filter_string=query,
                                       order_by=["attributes.start_time DESC"],
                                       max_results=max_results)

    def resumable(self, inputs: StepInputs):
        """The newest run with these inputs, when it ended KILLED or FAILED and holds a
        checkpoint to continue from; else None."""
        newest = self._with_key(inputs)
        if newest and newest[0].info.status in RESUMABLE_STATUSES and Pointer.of(newest[0]):
            return newest[0]
        return None

    def lookup(self, inputs: StepInputs) -> tuple:
        """(the finished run with these inputs whose outputs still exist, '') or
        (None, why none serves: its outputs are missing, or what changed since the newest
        finished run of this step)."""
        hits = self._with_key(inputs, status="FINISHED")
        if hits:
            missing = missing_outputs(self.client, hits[0])
            if not missing:
                return hits[0], ""
            return None, (f"run {hits[0].info.run_id} had the same inputs but its outputs "
                          "are missing: " + "; ".join(missing))
        for run in newest_runs(self.client, self.experiment_id, inputs.entry_point,
                               max_results=20):
            earlier = StepInputs.from_json(run.data.tags.get(tags.CACHE_INPUTS, ""))
            if earlier is not None:
                return None, f"since run {run.info.run_id}, " + (
                    "; ".join(changes(earlier, inputs)) or "nothing recorded differs")
        return None, f"no earlier finished {inputs.entry_point} run in this experiment"

    def reuse(self, hit, entry_point: str):
        """Record ``hit`` under the parent as a ``<step> (reused)`` pointer run: the UI's
        tree stays complete without redoing the work."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        pointer = self.client.create_run(self.experiment_id, tags={
            MLFLOW_PARENT_RUN_ID: self.parent.info.run_id,
            MLFLOW_RUN_NAME: f"{entry_point} (reused)",
            tags.STEP: "reused", tags.REUSED_STEP: entry_point,
            tags.REUSED_RUN: hit.info.run_id,
        })
        self.client.set_terminated(pointer.info.run_id, "FINISHED")
        self.reused.append(entry_point)
        log.info("main: %s reused from run %s (same params, code, packages and inputs)",
                 entry_point, hit.info.run_id)
        return hit

    def run(self, inputs: StepInputs, continuing=None):
        """Launch the step as a child of the parent (``continuing``: in that stopped run
        of the step, which the parent then adopts); its run is tagged with the inputs
        from its start."""
        import mlflow
        from mlflow.exceptions import ExecutionException
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        started = time.perf_counter()
        if continuing is not None:
            self.client.set_tag(continuing.info.run_id, MLFLOW_PARENT_RUN_ID,
                                self.parent.info.run_id)
        os.environ.update({CACHE_ENV[tags.CACHE_KEY]: inputs.key(),
                           CACHE_ENV[tags.CACHE_INPUTS]: inputs.to_json()})
        try:
            submitted = mlflow.run(
                str(self.root), inputs.entry_point, parameters=inputs.params,
                env_manager="local", experiment_id=self.experiment_id,
                run_name=inputs.entry_point, synchronous=True,
                run_id=continuing.info.run_id if continuing is not None else None,
            )
        except ExecutionException as exc:
            after = ("its error is above" if inputs.entry_point == "register" else
                     "later steps were not run and nothing was registered")
            raise StepError(
                f"step {inputs.entry_point} failed ({first_line(exc)}); {after}") from None
        finally:
            for name in CACHE_ENV.values():
                os.environ.pop(name, None)
        log.info("main: %s finished in %.1fs", inputs.entry_point,
                 time.perf_counter() - started)
        return self.client.get_run(submitted.run_id)
