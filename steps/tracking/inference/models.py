"""The two models train logs, and every way they are read back.

Writing them (``log_models``), resolving a URI to one fixed version (``resolve_version``),
loading them (``load_pyfunc``) and checking their files (``verified_model_files``) live
here, beside the list of project files a logged model carries (``SHIPPED_MODULES``), which
the step cache hashes.

A classifier is code as well as weights, and loading it runs that code. So its files get a
digest when train logs it (a tag of the logged model), ``register`` records it on the
version (after checking the files still match), and every load (``load_pyfunc``: evaluate,
predict; ``check_servable``: ``make serve``) refuses files that no longer match it.
"""

from __future__ import annotations

import logging
import os
import re
from importlib.metadata import version
from pathlib import Path

from steps.core.text import first_line
from steps.tracking.runtime import tags
from steps.tracking.runtime.cli import StepError
from steps.tracking.runtime.project import module_file, read_requirements

log = logging.getLogger("steps")

# Project modules copied into every logged classifier: the served model's code and the
# networks it rebuilds. A change to either changes what train ships, so the step cache
# (steps/tracking/pipeline/inputs.py) hashes them with the code train runs.
CLASSIFIER_MODULE = "steps.tracking.inference.classifier"
NETWORK_MODULE = "steps.core.model"
PIXELS_MODULE = "steps.core.pixels"
SHIPPED_MODULES = (CLASSIFIER_MODULE, NETWORK_MODULE, PIXELS_MODULE)


# --------------------------------------------------------------------------- models


def log_models(network, arch: str, hidden, example_images, step: int = 0) -> str:
    """Log the pt2 ``model`` and the ``classifier`` to the active run; tag both URIs, tag
    the classifier with the digest of its files, and return its URI (what evaluate,
    register and serving use).

    ``step`` is the epoch whose weights these are: MLflow links both logged models to the
    metrics the run logged at that step, so ``mlflow.search_logged_models`` can rank
    models by ``val_accuracy``."""
    import tempfile

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
    with tempfile.TemporaryDirectory() as tmp:
        digest = files_digest(mlflow.artifacts.download_artifacts(
            artifact_uri=classifier.model_uri, dst_path=tmp))
    mlflow.set_logged_model_tags(classifier.model_id, {tags.MODEL_DIGEST: digest})
    mlflow.set_tags({tags.NETWORK_URI: logged.model_uri, tags.MODEL_URI: classifier.model_uri})
    return classifier.model_uri


def log_classifier(network, arch: str, hidden, example, step: int = 0):
    """Log the served model: ``steps/tracking/inference/classifier.py`` (model from code)
    rebuilding ``network`` from its weights and ``steps/core/model.py``, checking its input with
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
        inputs=None,  # classifier.py takes several layouts and dtypes
        outputs=Schema([ColSpec(DataType.long, "label"),
                        ColSpec(Array(DataType.float), "probabilities")]),
    )
    with tempfile.TemporaryDirectory() as tmp:
        weights, architecture = Path(tmp, "weights.pt"), Path(tmp, "architecture.json")
        torch.save(network.state_dict(), weights)
        architecture.write_text(json.dumps({"arch": arch, "hidden": list(hidden or [])}))
        return mlflow.pyfunc.log_model(
            name="classifier", python_model=module_file(CLASSIFIER_MODULE),
            artifacts={"weights": str(weights), "architecture": str(architecture)},
            code_paths=[module_file(m) for m in (NETWORK_MODULE, PIXELS_MODULE)],
            signature=signature,
            input_example=example,
            pip_requirements=model_requirements() + [f"pandas=={version('pandas')}"],
            step=step,
        )


def check_servable(model_uri: str) -> None:
    """Raise StepError (one line) unless ``model_uri`` names a model this store has, whose
    files match their recorded digest: what ``make serve`` asks before handing the URI to
    ``mlflow models serve``, which would answer a missing alias with a page of traceback
    and run edited code without a word."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.models.get_model_info(model_uri)
    except (MlflowException, OSError) as exc:
        raise StepError(
            f"MODEL={model_uri} cannot be served ({first_line(exc)}); run the pipeline first "
            "(make run) or pass MODEL=models:/<name>/<version>") from None
    verified_model_files(model_uri)


def model_requirements() -> list[str]:
    """The logged model's pip requirements, pinned to what trained it.

    Given explicitly: MLflow's inference runs the model in a subprocess (about 10 s here)
    and only rediscovers these.
    """
    return [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "torch", "numpy")]


# Written into a logged model's folder by MLflow itself when a version is registered.
MLFLOW_BOOKKEEPING = frozenset({"registered_model_meta"})


def files_digest(folder: str | os.PathLike) -> str:
    """sha256 over every file under ``folder`` (but MLflow's own registration record): each
    one's path relative to it, then its bytes, in sorted order. A file added, removed,
    renamed or edited changes it."""
    import hashlib

    root, digest = Path(folder), hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()
                       and p.relative_to(root).as_posix() not in MLFLOW_BOOKKEEPING):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


MODEL_URI_RE = re.compile(r"^models:/(?:(?P<model_id>m-[0-9a-f]+)|(?P<name>[^/@]+)"
                          r"(?:/(?P<version>\d+)|@(?P<alias>.+)))$")


def resolve_version(client, model_uri: str) -> tuple[str, str]:
    """(a URI that names one fixed model, what to call its version): an alias is resolved
    to ``models:/<name>/<version>`` once, so that a job scoring for minutes uses one
    version even if the alias moves meanwhile; the version is the registered number, or
    the logged model's id for an unregistered model. StepError naming ``model_uri``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    found = MODEL_URI_RE.match(model_uri)
    try:
        if found and found["name"]:
            version = named_version(client, found)
            return f"models:/{version.name}/{version.version}", str(version.version)
        info = mlflow.models.get_model_info(model_uri)
    except (MlflowException, OSError) as exc:
        raise unloadable(model_uri, exc) from None
    return model_uri, info.model_id or model_uri


def named_version(client, found: re.Match):
    """The registered version a ``MODEL_URI_RE`` match of ``models:/<name>@<alias>`` or
    ``models:/<name>/<version>`` names."""
    if found["alias"]:
        return client.get_model_version_by_alias(found["name"], found["alias"])
    return client.get_model_version(found["name"], found["version"])


def unloadable(model_uri: str, error: BaseException) -> StepError:
    """The one line for a model URI that names nothing loadable."""
    return StepError(f"model_uri={model_uri!r} cannot be loaded ({first_line(error)}); run "
                     "the pipeline first or pass a models:/ or runs:/ URI")


def recorded_digest(client, model_uri: str) -> tuple[str, str]:
    """(the digest recorded for the model ``model_uri`` names, what to call that model):
    a registered version's ``model_digest`` tag, else the logged model's; ('', ...) for a
    model logged before digests were (it is loaded unchecked)."""
    import mlflow

    found = MODEL_URI_RE.match(model_uri)
    if found and found["name"]:
        version = named_version(client, found)
        return (version.tags.get(tags.VERSION_MODEL_DIGEST, ""),
                f"{found['name']} v{version.version}")
    model_id = found["model_id"] if found else mlflow.models.get_model_info(model_uri).model_id
    if not model_id:
        return "", model_uri
    # A registered model is named by its version, wherever the URI came from.
    for version in client.search_model_versions(
            f"tags.{tags.VERSION_MODEL_URI} = 'models:/{model_id}'"):
        if tags.VERSION_MODEL_DIGEST in version.tags:
            return (version.tags[tags.VERSION_MODEL_DIGEST],
                    f"{version.name} v{version.version}")
    return client.get_logged_model(model_id).tags.get(tags.MODEL_DIGEST, ""), f"model {model_id}"


def verified_model_files(model_uri: str) -> tuple[Path, str]:
    """Download ``model_uri``'s files and check them against their recorded digest; (their
    local folder, their digest), or StepError naming the model when they changed."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        expected, whose = recorded_digest(client, model_uri)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except (MlflowException, OSError) as exc:
        raise unloadable(model_uri, exc) from None
    found = files_digest(local)
    if expected and found != expected:
        raise StepError(
            f"{whose} ({model_uri}) has changed since it was recorded: its files' sha256 is "
            f"{found[:16]}..., the one recorded {expected[:16]}...; it is not loaded (its "
            "code would run). Register a model trained by the pipeline instead")
    if not expected:
        log.warning("warning: %s has no recorded digest (logged before digests were); "
                    "loading it unchecked", whose)
    return local, found


def load_pyfunc(model_uri: str):
    """``mlflow.pyfunc.load_model`` of the verified files (``verified_model_files``), with a
    cheaper check of the model's requirements.

    MLflow's own requirements check, on by default, reads the file list of every installed
    distribution (about 1.2 s with torch's CUDA wheels); the model pins a handful of
    packages, and comparing those with what is installed tells the same.
    """
    import mlflow

    local, _ = verified_model_files(model_uri)
    warn_of_other_requirements(local, model_uri)
    return mlflow.pyfunc.load_model(str(local), suppress_warnings=True)


def warn_of_other_requirements(local: Path, model_uri: str) -> None:
    """One warning line when the model at ``local`` pins other packages than installed."""
    mismatches = requirement_mismatches(os.path.join(local, "requirements.txt"))
    if mismatches:
        log.warning("warning: %s was logged with other packages than installed here: %s",
                    model_uri, "; ".join(mismatches))


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
