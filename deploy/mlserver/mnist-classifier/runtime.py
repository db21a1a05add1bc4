"""An MLServer runtime for the registered classifier (`make mlserver`), on MLServer's
public model interface (``mlserver.MLModel``).

MLServer 1.7.1's own MLflow runtime (``mlserver_mlflow.MLflowRuntime``) does not fit it:

- It reads the input schema of every model with a signature. The classifier's signature
  declares outputs only (a declared input schema would make MLflow refuse most of the
  layouts it takes; docs/serving.md), so loading failed with ``'NoneType' object has no
  attribute 'inputs'``. Here the signature's outputs describe the outputs, and requests are
  decoded as model-settings.json says: one NumPy tensor (``np``).
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
from mlserver import MLModel
from mlserver.errors import InferenceError, MLServerError
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri
from mlserver_mlflow import TensorDictCodec
from mlserver_mlflow.metadata import DefaultOutputPrefix, to_metadata_tensors

from steps.tracking.inference.models import verified_model_files
from steps.tracking.runtime.cli import StepError


class ClassifierRuntime(MLModel):
    async def load(self) -> bool:
        model_uri = await get_model_uri(self.settings)
        try:
            files, _ = verified_model_files(model_uri)
        except StepError as exc:
            raise MLServerError(str(exc), status_code=500) from None
        self.classifier = mlflow.pyfunc.load_model(str(files))
        signature = self.classifier.metadata.signature
        if signature is not None and signature.outputs is not None:
            self.outputs = to_metadata_tensors(schema=signature.outputs,
                                               prefix=DefaultOutputPrefix)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        images = self.decode_request(payload)
        try:
            answer = self.classifier.predict(images)
        except MlflowException as exc:
            if exc.error_code != ErrorCode.Name(INVALID_PARAMETER_VALUE):
                raise
            raise InferenceError(exc.message) from None
        return self.encode_response(answer, default_codec=TensorDictCodec)
