"""The servable stacked ensemble as an MLflow pyfunc model (imported only when logging
or loading one)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from pairnet.stack import meta_features


class StackedEnsemble(mlflow.pyfunc.PythonModel):
    """uint8 pairs (N, 28, 56) → DataFrame with ``label`` and ``probability``."""

    def load_context(self, context):
        import lightgbm

        info = json.loads(Path(context.artifacts["lineage"]).read_text())
        self.keys = [b["key"] for b in info["base_models"]]
        self.bases = [mlflow.pyfunc.load_model(context.artifacts[k]) for k in self.keys]
        self.booster = lightgbm.Booster(model_file=context.artifacts["meta_model"])

    def predict(self, context, model_input, params=None):
        x = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else np.asarray(model_input)
        x = x.astype(np.uint8).reshape(-1, 28, 56)
        probs = [np.asarray(b.predict(x), dtype=np.float32).reshape(-1) for b in self.bases]
        p = self.booster.predict(meta_features(probs))
        return pd.DataFrame({"label": (p >= 0.5).astype(np.int64), "probability": p.astype(np.float64)})
