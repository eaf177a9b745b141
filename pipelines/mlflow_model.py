"""The logged MLflow model, as "models from code": no pickled Python objects.

MLflow copies this file into the model, with the `vae_models` package as its code
(`code_paths`), and runs it at load time: it needs MLflow, torch, numpy, pandas and pydantic,
not vaeflow's pipeline. It reads the bundle (state dict loaded with `weights_only=True`, schema
and calibration as JSON) from the model's artifacts. `predict(df, params={"job": "anomaly"})`
returns the same columns as the batch jobs (`impute`, `anomaly`, `embed`; `sample` draws
`params["rows"]` rows); the outputs of each job are in the model's metadata (`job_outputs`).
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from vae_models.bundle import load_bundle
from vae_models.jobs import DEFAULT_PARAMS, InputError, score_frame


class VAEPyfuncModel(PythonModel):
    """pyfunc flavour of a vaeflow model bundle."""

    bundle = None

    def load_context(self, context) -> None:
        self.bundle = load_bundle(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        merged = {**DEFAULT_PARAMS, **(params or {})}
        try:
            return score_frame(
                self.bundle,
                model_input,
                str(merged["job"]),
                k=int(merged["k"]),
                seed=int(merged["seed"]),
                rows=int(merged["rows"]),
            )
        except InputError as exc:  # a bad request: one message, HTTP 400 when served
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None


mlflow.models.set_model(VAEPyfuncModel())
