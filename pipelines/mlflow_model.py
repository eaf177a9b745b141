"""The logged MLflow model, as "models from code": no pickled Python objects.

MLflow copies this file into the model and runs it at load time; it reads the bundle (state
dict loaded with `weights_only=True`, schema and calibration as JSON) from the model's
artifacts. `predict(df, params={"job": "anomaly"})` returns the same columns as the batch jobs
(`impute`, `anomaly`, `embed`; `sample` draws `params["rows"]` rows).
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from pipelines.scoring import DEFAULT_PARAMS, score_frame
from vae_models.bundle import load_bundle


class VAEPyfuncModel(PythonModel):
    """pyfunc flavour of a vaeflow model bundle."""

    bundle = None

    def load_context(self, context) -> None:
        self.bundle = load_bundle(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        merged = {**DEFAULT_PARAMS, **(params or {})}
        return score_frame(
            self.bundle,
            model_input,
            merged["job"],
            k=int(merged["k"]),
            seed=int(merged["seed"]),
            rows=int(merged["rows"]),
        )


mlflow.models.set_model(VAEPyfuncModel())
