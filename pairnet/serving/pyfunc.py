"""MLflow models-from-code definition of every pairnet model (``mlflow.pyfunc.load_model``).

MLflow stores this file with the model and runs it at load time. The artifacts are
safetensors weights with a JSON spec (a pair model) or, for the stack, those plus a
LightGBM text model and ``lineage.json``; so loading needs no pickle
(MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false works). A pair model returns probabilities
(N,); the stack a DataFrame with ``label`` and ``probability``. The ``pairnet`` package
travels with the model (``code_paths``: the model's ``code/`` folder, which MLflow puts on
``sys.path``), so the model loads where pairnet is not installed, in an environment built
from its pinned public requirements.

Loading picks the device (CUDA when present); prediction then runs batched under
inference_mode with the device's autocast dtype and channels_last weights, exactly the
path ``bench/ensemble_bench.py`` measures against a plain torch forward.
"""

import mlflow
from mlflow.pyfunc import PythonModel


class PairnetPyfunc(PythonModel):
    """uint8 pairs (N, 28, 56) → the predictor's output."""

    # MLflow wraps a PythonModel's predict for type-hint validation and, finding no hints,
    # warns at class creation. pairnet's model is validated by its logged signature; this
    # is the class attribute MLflow reads to skip the type-hint wrapping.
    _skip_type_hint_validation = True

    def load_context(self, context):
        from pathlib import Path

        from pairnet.serving.predictors import PairPredictor, StackPredictor
        from pairnet.device import pick_device

        device = pick_device()  # the serving edge: chosen once, every base model on it
        if "lineage" in context.artifacts:
            self.predictor = StackPredictor.load(Path(context.artifacts["lineage"]).parent, device=device)
        else:
            self.predictor = PairPredictor.load(Path(context.artifacts["weights"]).parent, device=device)

    def predict(self, context, model_input, params=None):
        return self.predictor.predict(model_input)


mlflow.models.set_model(PairnetPyfunc())
