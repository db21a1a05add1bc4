"""The served model: raw digit images in, predicted label and class probabilities out.

Logged by ``train`` as an MLflow "model from code": this file, ``model.py`` (the network
definitions) and ``pixels.py`` (what counts as images), both via ``code_paths``, and the
best epoch's weights, loaded with ``torch.load(weights_only=True)``: no pickled objects
anywhere. It accepts what people actually send:

- uint8 or float pixels 0-255, shape (N, 28, 28), (N, 1, 28, 28) or (N, 784);
- a numpy array, a nested list, a DataFrame with 784 pixel columns, or a DataFrame whose
  one column holds an array per image (Spark's ``array<float>`` column).

Anything else (NaN, infinity, pixels outside 0-255, no images, other shapes, text) is
refused with a message saying why: ``mlflow models serve`` answers HTTP 400 with it.
Normalisation is inside the network, so no client-side preprocessing. The input has no
tensor schema on purpose: MLflow would enforce one fixed rank and dtype.

Needs only numpy, pandas, torch, mlflow and the copied ``model.py`` and ``pixels.py``: it
runs inside ``mlflow models serve``, where this project's packages are not importable.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


class BadImages(MlflowException, ValueError):
    """Input that is not a batch of digit images. An MlflowException with MLflow's own
    ``INVALID_PARAMETER_VALUE`` code, so that the scoring server answers HTTP 400 with this
    message (any other error becomes a generic message and a stack trace with the server's
    paths); a ValueError for callers in a Python process."""

    def __init__(self, why: str) -> None:
        self._said = f"images: {why}"
        super().__init__(self._said, error_code=INVALID_PARAMETER_VALUE)

    # The scoring server rewrites the message to "Failed to predict data '<the request's
    # data>' ...": the whole batch of pixels (NaN included) back at the client. The reason
    # is the message.
    @property
    def message(self) -> str:
        return self._said

    @message.setter
    def message(self, _rewritten: str) -> None:
        pass


class DigitClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import json
        from pathlib import Path

        import torch
        from model import Probabilities, build_model  # steps/core/model.py, via code_paths
        from pixels import to_images  # steps/core/pixels.py, via code_paths

        spec = json.loads(Path(context.artifacts["architecture"]).read_text())
        network = build_model(spec["arch"], tuple(spec["hidden"]) or None)
        network.load_state_dict(torch.load(context.artifacts["weights"], weights_only=True))
        self.network = Probabilities(network).eval()
        self.to_images = to_images

    # The hint is np.ndarray, though to_images takes every form listed above: MLflow reads
    # the hint to decide its own input validation, and ndarray (like DataFrame) tells it to
    # leave the input as it comes.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None
                ) -> pd.DataFrame:
        import torch

        try:
            images = torch.from_numpy(self.to_images(model_input))
        except ValueError as exc:
            raise BadImages(str(exc)) from None
        with torch.no_grad():
            probabilities = torch.cat([self.network(images[i : i + 4096])
                                       for i in range(0, len(images), 4096)]).numpy()
        return pd.DataFrame({
            "label": probabilities.argmax(axis=1).astype(np.int64),
            "probabilities": list(probabilities.astype(np.float32)),
        })


mlflow.models.set_model(DigitClassifier())
