"""What the steps hand each other, as URIs: the data artifact download_data logs (read
back, verified, by :func:`load_data_artifact`), and whether a handed-on URI still names
something (:func:`output_missing`: the step cache asks it before reusing a run).

The logged models themselves are ``steps/tracking/inference/models.py``'s.
"""

from __future__ import annotations

from steps.core.text import first_line
from steps.tracking.runtime.cli import StepError


def load_data_artifact(data_uri: str):
    """Download a download_data artifact and return the verified dataset.

    Raises StepError naming the ``data`` parameter when the URI is missing or holds
    something else.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from steps.core.data import DataError, load_saved_dataset

    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=data_uri)
    except (MlflowException, OSError) as exc:
        raise StepError(
            f"data={data_uri!r} cannot be read ({first_line(exc)}); pass the data URI "
            "a download_data run logged (runs:/<run_id>/data) or leave data empty"
        ) from None
    try:
        return load_saved_dataset(local)
    except DataError as exc:
        raise StepError(f"data={data_uri!r}: {exc}") from None


def output_missing(client, uri: str) -> str:
    """Why ``uri`` (a ``runs:/<id>/<path>`` artifact or a ``models:/m-<id>`` logged model)
    can no longer be read, or '' when it can. A listing, not a download."""
    from mlflow.exceptions import MlflowException

    try:
        if uri.startswith("runs:/"):
            run_id, _, path = uri[len("runs:/"):].partition("/")
            if not client.list_artifacts(run_id, path):
                return f"{uri} has no files"
        elif uri.startswith("models:/m-"):
            names = {f.path for f in client.list_logged_model_artifacts(uri[len("models:/"):])}
            if "MLmodel" not in names:
                return f"{uri} has no MLmodel file"
        else:
            return ""
    except (MlflowException, OSError) as exc:
        return f"{uri} cannot be listed ({first_line(exc)})"
    return ""
