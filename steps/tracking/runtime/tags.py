"""Every tag name the project writes or reads, in one table.

Run tags carry the ``pipeline.`` prefix so they sort together in the UI; model-version tags
are short because the registry page shows them as a list beside the version.
"""

# On runs: what a step is and what it hands on.
STEP = "pipeline.step"
DATASET = "pipeline.dataset"
DATA_URI = "pipeline.data_uri"
DATA_DIGEST = "pipeline.data_digest"
MODEL_URI = "pipeline.model_uri"  # the classifier: what is evaluated, registered and served
NETWORK_URI = "pipeline.network_uri"  # the bare pt2 network
MODEL_VERSION = "pipeline.model_version"  # score: the version every image was scored with
OUTPUT = "pipeline.output"  # score: where its predictions are
# On a logged classifier (a logged-model tag): the sha256 of its files, set by train.
MODEL_DIGEST = "pipeline.model_digest"
TRAIN_RUN = "pipeline.train_run_id"
RESOLVED_DEVICE = "pipeline.resolved_device"
REGISTERED_VERSION = "pipeline.registered_version"
ALIAS_DECISION = "pipeline.alias_decision"
BEST_TRIAL_RUN = "pipeline.best_trial_run_id"
STUDY_NAME = "pipeline.study_name"  # a tune run that joined a shared Optuna study
STUDY_BEST_RUN = "pipeline.study_best_run_id"  # the study's best trial, any worker's
# On train runs: checkpoints and resumes (steps/tracking/training/checkpoints.py).
CHECKPOINT = "pipeline.checkpoint"  # JSON: the newest whole checkpoint (file, epoch, sha256)
CHECKPOINT_REFUSED = "pipeline.checkpoint_refused"  # why a checkpoint was not resumed
RESUMES = "pipeline.resumes"  # JSON list: each continuation of the run, oldest first
RESTARTS = "pipeline.restarts"  # JSON list: each restart of a data-parallel job, its cause
RESUMED_RUN = "pipeline.resumed_run_id"  # on the launcher's run of `-e train -P resume=ID`
OPTUNA_TRIAL = "optuna.trial"  # Optuna's own names, kept as Optuna users know them
OPTUNA_STATE = "optuna.state"
RETRY_OF_RUN = "pipeline.retry_of_run_id"  # on a trial: the lost trial run it tries again

# On runs: the step cache (steps/tracking/pipeline/).
CACHE_KEY = "pipeline.cache_key"
CACHE_INPUTS = "pipeline.cache_inputs"
CACHE_DECISION = "pipeline.cache_decision"  # JSON: what main did with the step, and why
REUSED_STEP = "pipeline.reused_step"
REUSED_RUN = "pipeline.reused_run_id"
REUSED_STEPS = "pipeline.reused_steps"


def step_run_id(step: str) -> str:
    """The tag on ``main`` naming the run that did ``step``'s work (fresh or reused)."""
    return f"pipeline.{step}_run_id"


# On model versions.
VERSION_MODEL_URI = "model_uri"
VERSION_DATA_DIGEST = "data_digest"
VERSION_DATASET = "dataset"
VERSION_TRAIN_RUN = "train_run_id"
VERSION_EVALUATE_RUN = "evaluate_run_id"
# Set on versions that outranked the target of a forced alias move (a rollback): they no
# longer compete for the alias until a forced move names them again.
VERSION_DEMOTED = "demoted"
# The sha256 of the version's model files when it was registered; every loader checks it.
VERSION_MODEL_DIGEST = "model_digest"
# Set on every version register creates: whether it passed the promotion rule
# (min_delta, min_score) when it was registered, and why (steps/tracking/registry/).
VERSION_VALIDATION = "validation_status"
VERSION_VALIDATION_REASON = "validation_reason"

# On the registered model: every alias move, a JSON list, newest last (steps/tracking/registry/).
ALIAS_HISTORY = "alias_history"

# The alias that marks the best version; ``register`` moves it, ``evaluate`` and ``predict``
# read it.
DEFAULT_ALIAS = "champion"

# On the experiment: what the MLflow UI reads to open on training runs (not the GenAI
# overview) and the description it shows.
EXPERIMENT_KIND = "mlflow.experimentKind"
TRAINING_EXPERIMENT = "custom_model_development"
EXPERIMENT_NOTE = "mlflow.note.content"

# On runs: which process runs them, so that a later step can tell a run whose process died
# (kill -9, OOM, a crashed machine) from one still working (steps/tracking/runtime/runs.py).
HOST = "pipeline.host"
PID = "pipeline.pid"
PID_STARTED = "pipeline.pid_started"
# How the run ended by its own account (steps.tracking.runtime.runs.Ending): a launcher may
# write its own status over the run's.
ENDED_AS = "pipeline.ended_as"
ENDED_CAUSE = "pipeline.ended_cause"
ENDED_BECAUSE = "pipeline.ended_because"
