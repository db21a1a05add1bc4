"""The served model: raw digit images in, predicted label and class probabilities out.

Logged by ``train`` as an MLflow "model from code": this file, ``model.py`` (the network
definitions, via ``code_paths``) and the best epoch's weights, loaded with
``torch.load(weights_only=True)``: no pickled objects anywhere. It accepts what people
actually send:

- uint8 or float pixels 0-255, shape (N, 28, 28), (N, 1, 28, 28) or (N, 784);
- a numpy array, a nested list, or a DataFrame with 784 pixel columns.

Normalisation is inside the network, so no client-side preprocessing. The input has no
tensor schema on purpose: MLflow would enforce one fixed rank and dtype.

Needs only numpy, pandas, torch, mlflow and the copied ``model.py``: it runs inside
``mlflow models serve``, where this project's packages are not importable.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd


def to_images(model_input) -> np.ndarray:
    """Any accepted input -> float32 (N, 28, 28), with a clear error for anything else."""
    if isinstance(model_input, pd.DataFrame):
        array = model_input.to_numpy()
    elif isinstance(model_input, dict) and len(model_input) == 1:
        array = np.asarray(next(iter(model_input.values())))
    else:
        array = np.asarray(model_input)
    if array.dtype == object or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"images must be numeric pixel arrays, got dtype {array.dtype}")
    if array.ndim == 2 and array.shape[1] == 784:
        array = array.reshape(-1, 28, 28)
    elif array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3 or array.shape[1:] != (28, 28):
        raise ValueError(
            f"images must have shape (N, 28, 28), (N, 1, 28, 28) or (N, 784); got {array.shape}"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


class DigitClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import json
        from pathlib import Path

        import torch
        from model import Probabilities, build_model  # steps/core/model.py, via code_paths

        spec = json.loads(Path(context.artifacts["architecture"]).read_text())
        network = build_model(spec["arch"], tuple(spec["hidden"]) or None)
        network.load_state_dict(torch.load(context.artifacts["weights"], weights_only=True))
        self.network = Probabilities(network).eval()

    # The hint is np.ndarray, though to_images takes every form listed above: MLflow reads
    # the hint to decide its own input validation, and ndarray (like DataFrame) tells it to
    # leave the input as it comes.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None
                ) -> pd.DataFrame:
        import torch

        images = torch.from_numpy(to_images(model_input))
        with torch.no_grad():
            probabilities = torch.cat([self.network(images[i : i + 4096])
                                       for i in range(0, len(images), 4096)]).numpy()
        return pd.DataFrame({
            "label": probabilities.argmax(axis=1).astype(np.int64),
            "probabilities": list(probabilities.astype(np.float32)),
        })


mlflow.models.set_model(DigitClassifier())
