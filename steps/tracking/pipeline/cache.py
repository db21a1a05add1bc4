"""The step cache: when an earlier run can stand in for a step, when a stopped one can be
continued, and, when neither, why the step runs.

A step's inputs (``steps/tracking/pipeline/inputs.py``) hash to the run tag
``pipeline.cache_key``, found with one ``search_runs`` filter; the inputs themselves are
kept beside it (``pipeline.cache_inputs``, JSON), so that a step that runs again can say
exactly what changed since the newest finished run of that step. A run is reused only when
it FINISHED and what it hands on still exists (a listing, not a download: see
``steps.tracking.runtime.artifacts.output_missing``). ``main`` creates each step's run with
its key (``steps/tracking/pipeline/launch.py``), so a run with these inputs that ended
KILLED or FAILED holding a checkpoint (train's, ``steps/tracking/training/checkpoints.py``)
is found too, and continued in place rather than started again. A step started alone
(``mlflow run . -e train``) that main could have run with the same inputs carries the same
key (``steps.tracking.pipeline.inputs.findable_by_main``): main reuses it, or continues it
if it stopped.

Each answer is a :class:`Decision`: what main does with the step and why, in fields; its
:meth:`Decision.line` is the one line main prints, and the run it concerns keeps it as the
tag ``pipeline.cache_decision``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from steps.tracking.pipeline.inputs import Change, StepInputs, changes
from steps.tracking.runtime import tags
from steps.tracking.runtime.artifacts import output_missing
from steps.tracking.runtime.runs import ended, newest_runs, quote
from steps.tracking.training.checkpoints import RESUMABLE_STATUSES, Pointer

# What a step's run hands on to later steps; each must still exist for the run to be reused.
HANDED_ON = (tags.DATA_URI, tags.MODEL_URI, tags.NETWORK_URI)

# What main does with a step.
REUSE, RESUME, RUN = "reuse", "resume", "run"
# Why a step runs.
NO_CACHE, NO_EARLIER_RUN, OUTPUTS_MISSING, INPUTS_CHANGED = (
    "use_cache=false", "no earlier run", "outputs missing", "inputs changed")


@dataclass(frozen=True)
class Decision:
    """What main does with ``step``: reuse run ``run_id``, resume it, or run the step
    afresh for ``reason`` (with ``changes`` since run ``run_id``, or the outputs of run
    ``run_id`` that are ``missing``). A resume says where (``epoch`` of ``epochs``) and how
    the run had ended (``was``, ``because``)."""

    step: str
    action: str
    run_id: str = ""
    reason: str = ""
    changes: tuple[Change, ...] = ()
    missing: tuple[str, ...] = ()
    epoch: int = 0
    epochs: int = 0
    was: str = ""
    because: str = ""

    def line(self) -> str:
        if self.action == REUSE:
            return (f"main: {self.step} reused from run {self.run_id} (same params, code, "
                    "packages and inputs)")
        if self.action == RESUME:
            return (f"main: {self.step} resumes run {self.run_id} at epoch {self.epoch} of "
                    f"{self.epochs} (it was {self.was}"
                    + (f": {self.because})" if self.because else ")"))
        return f"main: {self.step} runs: {self.why()}"

    def why(self) -> str:
        if self.reason == NO_CACHE:
            return NO_CACHE
        if self.reason == OUTPUTS_MISSING:
            return (f"run {self.run_id} had the same inputs but its outputs are missing: "
                    + "; ".join(self.missing))
        if self.reason == INPUTS_CHANGED:
            return f"since run {self.run_id}, " + (
                "; ".join(c.said() for c in self.changes) or "nothing recorded differs")
        return f"no earlier finished {self.step} run in this experiment"

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Decision | None:
        try:
            fields = json.loads(text)
            fields["changes"] = tuple(Change(c["kind"], tuple(map(tuple, c["items"])))
                                      for c in fields.get("changes", ()))
            fields["missing"] = tuple(fields.get("missing", ()))
            return cls(**fields)
        except (ValueError, TypeError, KeyError):
            return None


def decision_of(run) -> Decision | None:
    """The decision a step's run (or its ``(reused)`` pointer) records, if any."""
    return Decision.from_json(run.data.tags.get(tags.CACHE_DECISION, ""))


class StepCache:
    """The runs of one experiment, asked by a step's inputs."""

    def __init__(self, client, experiment_id: str) -> None:
        self.client, self.experiment_id = client, experiment_id

    def decide(self, inputs: StepInputs, use_cache: bool = True) -> tuple[Decision, object]:
        """(the decision for ``inputs``, the run it reuses or resumes, else None)."""
        step = inputs.entry_point
        if not use_cache:
            return Decision(step, RUN, reason=NO_CACHE), None
        hits = self._with_key(inputs, status="FINISHED")
        missing = self.missing_outputs(hits[0]) if hits else []
        if hits and not missing:
            return Decision(step, REUSE, hits[0].info.run_id), hits[0]
        stopped = self.resumable(inputs)
        if stopped is not None:
            pointer, ending = Pointer.of(stopped), ended(stopped)
            return Decision(step, RESUME, stopped.info.run_id, epoch=pointer.epoch + 1,
                            epochs=pointer.epochs, was=ending.status,
                            because=ending.because), stopped
        if hits:
            return Decision(step, RUN, hits[0].info.run_id, OUTPUTS_MISSING,
                            missing=tuple(missing)), None
        for run in newest_runs(self.client, self.experiment_id, step, max_results=20):
            earlier = StepInputs.from_json(run.data.tags.get(tags.CACHE_INPUTS, ""))
            if earlier is not None:
                return Decision(step, RUN, run.info.run_id, INPUTS_CHANGED,
                                tuple(changes(earlier, inputs))), None
        return Decision(step, RUN, reason=NO_EARLIER_RUN), None

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
        """The newest run with these inputs, when it ended KILLED or FAILED (by its own
        account: :func:`steps.tracking.runtime.runs.ended`) and holds a checkpoint to
        continue from; else None."""
        newest = self._with_key(inputs)
        if newest and ended(newest[0]).status in RESUMABLE_STATUSES and Pointer.of(newest[0]):
            return newest[0]
        return None

    def missing_outputs(self, run) -> list[str]:
        """What ``run`` hands on that can no longer be read (empty when all is there)."""
        from mlflow.exceptions import MlflowException

        missing = [why for why in (output_missing(self.client, run.data.tags[t])
                                   for t in HANDED_ON if t in run.data.tags) if why]
        registered = run.data.tags.get(tags.REGISTERED_VERSION)
        name = run.data.params.get("model_name")
        if registered and name:
            try:
                self.client.get_model_version(name, registered)
            except MlflowException:
                missing.append(f"model version {name}/{registered} no longer exists")
        return missing

