"""MLflow models-from-code definition of a pair model (``mlflow.pyfunc.load_model``).

MLflow stores this file with the model and runs it at load time; the weights are read
from safetensors, so loading needs no pickle (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false
works). The ``pairnet`` package must be importable where the model is loaded.
"""

import mlflow
from mlflow.pyfunc import PythonModel


class PairPyfunc(PythonModel):
    """uint8 pairs (N, 28, 56) → probabilities (N,) of label 1."""

    def load_context(self, context):
        from pathlib import Path

        from pairnet.serving.predictors import PairPredictor

        self.predictor = PairPredictor.load(Path(context.artifacts["weights"]).parent)

    def predict(self, context, model_input, params=None):
        return self.predictor.predict(model_input)


mlflow.models.set_model(PairPyfunc())
