"""What the steps hand each other: the data artifact and the two logged models.

Writing them (``log_models``), reading them back (``load_data_artifact``, ``load_pyfunc``)
and checking that they still exist (``output_missing``) live here, beside the list of
project files a logged model carries (``SHIPPED_MODULES``), which the step cache hashes.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from importlib.metadata import version
from pathlib import Path

from steps.tracking import tags
from steps.tracking.cli import StepError, first_line

log = logging.getLogger("steps")

# Project modules copied into every logged classifier: the served model's code and the
# networks it rebuilds. A change to either changes what train ships, so the step cache
# (steps/tracking/cache.py) hashes them with the code train runs.
SERVING_MODULE = "steps.tracking.serving"
NETWORK_MODULE = "steps.core.model"
PIXELS_MODULE = "steps.core.pixels"
SHIPPED_MODULES = (SERVING_MODULE, NETWORK_MODULE, PIXELS_MODULE)


def module_file(name: str) -> str:
    """The source file of a project module, found without importing it."""
    return importlib.util.find_spec(name).origin


# --------------------------------------------------------------------------- data


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


# --------------------------------------------------------------------------- models


def log_models(network, arch: str, hidden, example_images, step: int = 0) -> str:
    """Log the pt2 ``model`` and the ``classifier`` to the active run; tag both URIs and
    return the classifier's (what evaluate, register and serving use).

    ``step`` is the epoch whose weights these are: MLflow links both logged models to the
    metrics the run logged at that step, so ``mlflow.search_logged_models`` can rank
    models by ``val_accuracy``."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from steps.core.model import Probabilities

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )
    # Two examples, not one: torch.export treats a batch of 1 as a fixed size.
    example = np.ascontiguousarray(example_images[:2], dtype=np.float32)
    with torch.no_grad():
        logged = mlflow.pytorch.log_model(
            Probabilities(network), name="model", signature=signature,
            input_example=example, pip_requirements=model_requirements(), step=step,
        )
    classifier = log_classifier(network, arch, hidden, example, step)
    mlflow.set_tags({tags.NETWORK_URI: logged.model_uri, tags.MODEL_URI: classifier.model_uri})
    return classifier.model_uri


def log_classifier(network, arch: str, hidden, example, step: int = 0):
    """Log the served model: ``steps/tracking/serving.py`` (model from code) rebuilding ``network``
    from its weights and ``steps/core/model.py``, checking its input with
    ``steps/core/pixels.py``.

    Weights, not the pt2 program: loading a pt2 archive imports torch._dynamo (about 2 s),
    which every evaluation and every server start would pay.
    """
    import json
    import tempfile

    import mlflow
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    signature = ModelSignature(
        inputs=None,  # see steps/tracking/serving.py: several layouts and dtypes are accepted
        outputs=Schema([ColSpec(DataType.long, "label"),
                        ColSpec(Array(DataType.float), "probabilities")]),
    )
    with tempfile.TemporaryDirectory() as tmp:
        weights, architecture = Path(tmp, "weights.pt"), Path(tmp, "architecture.json")
        torch.save(network.state_dict(), weights)
        architecture.write_text(json.dumps({"arch": arch, "hidden": list(hidden or [])}))
        return mlflow.pyfunc.log_model(
            name="classifier", python_model=module_file(SERVING_MODULE),
            artifacts={"weights": str(weights), "architecture": str(architecture)},
            code_paths=[module_file(m) for m in (NETWORK_MODULE, PIXELS_MODULE)],
            signature=signature,
            input_example=example,
            pip_requirements=model_requirements() + [f"pandas=={version('pandas')}"],
            step=step,
        )


def model_requirements() -> list[str]:
    """The logged model's pip requirements, pinned to what trained it.

    Given explicitly: MLflow's inference runs the model in a subprocess (about 10 s here)
    and only rediscovers these.
    """
    return [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "torch", "numpy")]


def load_pyfunc(model_uri: str):
    """``mlflow.pyfunc.load_model`` with a cheaper check of the model's requirements.

    MLflow's own check, on by default, reads the file list of every installed distribution
    (about 1.2 s with torch's CUDA wheels); the model pins a handful of packages, and
    comparing those with what is installed tells the same.
    """
    import mlflow

    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
    mismatches = requirement_mismatches(os.path.join(local, "requirements.txt"))
    if mismatches:
        log.warning("warning: %s was logged with other packages than installed here: %s",
                    model_uri, "; ".join(mismatches))
    return mlflow.pyfunc.load_model(local, suppress_warnings=True)


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


def requirement_mismatches(requirements_txt: str) -> list[str]:
    """Pinned requirements in the file that the installed packages do not satisfy."""
    from importlib.metadata import PackageNotFoundError

    if not os.path.isfile(requirements_txt):
        return []
    found = []
    for requirement in read_requirements(requirements_txt):
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            installed = None
        if installed is None or not requirement.specifier.contains(installed,
                                                                   prereleases=True):
            found.append(f"{requirement} (installed: {installed or 'none'})")
    return found


# --------------------------------------------------------------------------- existence


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
