"""MLServer's MLflow runtime, made fit for the registered classifier (`make mlserver`).

MLServer 1.7.1's own runtime (``mlserver_mlflow.MLflowRuntime``) falls short three ways:

- It reads the input schema of every model with a signature. The classifier's signature
  declares outputs only (a declared input schema would make MLflow refuse most of the
  layouts it takes; docs/serving.md), so loading failed with ``'NoneType' object has no
  attribute 'inputs'``. Here a signature without inputs describes the outputs only, and
  requests are decoded as model-settings.json says: one NumPy tensor (``np``).
- Every other loader of this project checks the model's files against the digest recorded
  when it was registered, and refuses a changed model; this one does too, and loads the
  very files it checked.
- A refused input (MLflow's ``INVALID_PARAMETER_VALUE``) is HTTP 400 with its one-line
  reason, not a 500 with a traceback.
"""

from __future__ import annotations

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode
from mlserver.errors import InferenceError, MLServerError
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri
from mlserver_mlflow import MLflowRuntime
from mlserver_mlflow.metadata import DefaultOutputPrefix, to_metadata_tensors

from steps.tracking.artifacts import verified_model_files
from steps.tracking.cli import StepError


class ClassifierRuntime(MLflowRuntime):
    async def load(self) -> bool:
        model_uri = await get_model_uri(self._settings)
        try:
            files, _ = verified_model_files(model_uri)
        except StepError as exc:
            raise MLServerError(str(exc), status_code=500) from None
        self._model = mlflow.pyfunc.load_model(str(files))
        self._input_schema = self._model.metadata.get_input_schema()
        self._signature = self._model.metadata.signature
        self._sync_metadata()
        return True

    def _sync_metadata(self) -> None:
        if self._signature is None or self._signature.inputs is not None:
            super()._sync_metadata()
            return
        self.outputs = to_metadata_tensors(schema=self._signature.outputs,
                                           prefix=DefaultOutputPrefix)

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        try:
            return await super().predict(payload)
        except MlflowException as exc:
            if exc.error_code != ErrorCode.Name(INVALID_PARAMETER_VALUE):
                raise
            raise InferenceError(exc.message) from None
