"""MLflow models-from-code definition of the stacked ensemble (``mlflow.pyfunc.load_model``).

Base models are safetensors + spec folders and the meta-learner is LightGBM's text
format, so loading needs no pickle. The ``pairnet`` package must be importable where
the model is loaded.
"""

import mlflow
from mlflow.pyfunc import PythonModel


class StackPyfunc(PythonModel):
    """uint8 pairs (N, 28, 56) → DataFrame with ``label`` and ``probability``."""

    def load_context(self, context):
        from pathlib import Path

        from pairnet.serving.predictors import StackPredictor

        self.predictor = StackPredictor.load(Path(context.artifacts["lineage"]).parent)

    def predict(self, context, model_input, params=None):
        return self.predictor.predict(model_input)


mlflow.models.set_model(StackPyfunc())
