"""How ``main`` runs a step: it creates the step's run itself, hands that run to MLflow's
launcher (``mlflow.run``), waits, and leaves the run as the step ended it.

Creating the run here, before the step's process exists, puts everything on it from its
first moment: the cache key and inputs (so that a run killed midway is still found by
them), the parent, the name and the cache's :class:`~steps.tracking.pipeline.cache.Decision`.
Nothing travels through the environment, and no process outlives the step.

MLflow 3.17's launcher marks the run it waited on FAILED after any non-zero exit, even one
the step ended KILLED (``mlflow.projects._wait_for`` hands the status string to
``RunStatus.is_terminated``, which expects an int). ``main`` outlives every step it
launches, so it puts the step's own ending back right after the launcher's write, in its
own process, before it goes on (:func:`keep_step_ending`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from steps.tracking.pipeline.cache import REUSE, Decision, StepCache
from steps.tracking.pipeline.inputs import StepInputs
from steps.tracking.runtime import tags
from steps.tracking.runtime.cli import StepError
from steps.tracking.runtime.project import PROJECT_DIR, entry_points
from steps.tracking.runtime.runs import ended, process_tags

log = logging.getLogger("steps.main")

# The tags MLflow's launcher gives a run it creates itself, taken over from the parent's:
# the same project, checkout and user.
SOURCE_TAGS = ("mlflow.user", "mlflow.source.name", "mlflow.source.type",
               "mlflow.source.git.commit", "mlflow.source.git.repoURL",
               "mlflow.source.git.branch")


class Pipeline:
    """Runs steps as children of ``parent``; each result is the run that did the work."""

    def __init__(self, client, parent, use_cache: bool, root: Path = PROJECT_DIR) -> None:
        self.client, self.parent, self.use_cache, self.root = client, parent, use_cache, root
        self.experiment_id = parent.info.experiment_id
        self.cache = StepCache(client, self.experiment_id)
        self.reused: list[str] = []
        self.decisions: dict[str, Decision] = {}

    def step(self, entry_point: str, params: dict, upstream: dict | None = None,
             data_dir: str = ""):
        """Reuse, resume or run ``entry_point``; ``upstream`` maps step names to the runs
        it consumes. Returns the run that did the work."""
        inputs = StepInputs.collect(
            entry_point, params, {s: r.info.run_id for s, r in (upstream or {}).items()},
            data_dir, self.root)
        decision, earlier = self.cache.decide(inputs, self.use_cache)
        self.decisions[entry_point] = decision
        log.info("%s", decision.line())
        if decision.action == REUSE:
            self.record_reuse(earlier, decision)
            return earlier
        return self.launch(inputs, decision, continuing=earlier)

    def given(self, params: dict):
        """``given(step)``: the parameters among ``params`` (main's, parsed) that MLproject
        declares for ``step``, as ``mlflow run`` would pass them (None as empty)."""
        declared = entry_points(self.root)

        def share(step: str) -> dict:
            return {name: "" if params[name] is None else params[name]
                    for name in declared[step]["parameters"] if name in params}
        return share

    def record_reuse(self, hit, decision: Decision) -> None:
        """Record ``hit`` under the parent as a ``<step> (reused)`` pointer run: the UI's
        tree stays complete without redoing the work."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        pointer = self.client.create_run(self.experiment_id, tags={
            MLFLOW_PARENT_RUN_ID: self.parent.info.run_id,
            MLFLOW_RUN_NAME: f"{decision.step} (reused)",
            tags.STEP: "reused", tags.REUSED_STEP: decision.step,
            tags.REUSED_RUN: hit.info.run_id, tags.CACHE_DECISION: decision.to_json(),
        })
        self.client.set_terminated(pointer.info.run_id, "FINISHED")
        self.reused.append(decision.step)

    def create_run(self, inputs: StepInputs, decision: Decision) -> str:
        """A new run for the step, under the parent, carrying everything the step cache
        finds it by; until the step's process takes it up, it names this process as its
        own (so that the orphan check closes it if this process dies first)."""
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import (
            MLFLOW_PARENT_RUN_ID,
            MLFLOW_PROJECT_ENTRY_POINT,
            MLFLOW_RUN_NAME,
        )

        parent_tags = self.parent.data.tags
        run = self.client.create_run(self.experiment_id, run_name=inputs.entry_point, tags={
            **{k: parent_tags[k] for k in SOURCE_TAGS if k in parent_tags},
            MLFLOW_PARENT_RUN_ID: self.parent.info.run_id,
            MLFLOW_RUN_NAME: inputs.entry_point,
            MLFLOW_PROJECT_ENTRY_POINT: inputs.entry_point,
            tags.STEP: inputs.entry_point, **process_tags(),
            tags.CACHE_KEY: inputs.key(), tags.CACHE_INPUTS: inputs.to_json(),
            tags.CACHE_DECISION: decision.to_json(),
        })
        # As MLflow's launcher logs them for a run it creates: the values given.
        self.client.log_batch(run.info.run_id, params=[
            Param(k, v) for k, v in inputs.params.items()])
        return run.info.run_id

    def adopt(self, stopped, decision: Decision) -> str:
        """A stopped run of the step, taken under the parent to be continued."""
        from mlflow.entities import RunTag
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        self.client.log_batch(stopped.info.run_id, tags=[
            RunTag(MLFLOW_PARENT_RUN_ID, self.parent.info.run_id),
            RunTag(tags.CACHE_DECISION, decision.to_json())])
        return stopped.info.run_id

    def launch(self, inputs: StepInputs, decision: Decision, continuing=None):
        """Run the step in its run (``continuing``: in that stopped run) through MLflow's
        launcher and wait; return the run as the step left it."""
        import mlflow
        from mlflow.exceptions import ExecutionException

        started = time.perf_counter()
        run_id = (self.adopt(continuing, decision) if continuing is not None
                  else self.create_run(inputs, decision))
        try:
            mlflow.run(str(self.root), inputs.entry_point, parameters=inputs.params,
                       env_manager="local", experiment_id=self.experiment_id,
                       synchronous=True, run_id=run_id)
        except ExecutionException:
            ending = keep_step_ending(self.client, run_id)
            after = ("its error is above" if inputs.entry_point == "register" else
                     "later steps were not run and nothing was registered")
            how = "was interrupted" if ending.status == "KILLED" else "failed"
            raise StepError(f"step {inputs.entry_point} {how}; {after}") from None
        except KeyboardInterrupt:
            keep_step_ending(self.client, run_id)
            raise
        log.info("main: %s finished in %.1fs", inputs.entry_point,
                 time.perf_counter() - started)
        return self.client.get_run(run_id)


def keep_step_ending(client, run_id: str):
    """Put back the status the step ended its run with where MLflow's launcher wrote
    FAILED over it (see the module's docstring); return how the step ended it."""
    run = client.get_run(run_id)
    ending = ended(run)
    if run.info.status != ending.status and run.info.status != "RUNNING":
        client.set_terminated(run_id, ending.status)
    return ending

