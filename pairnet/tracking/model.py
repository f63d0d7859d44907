"""Logging pair models with MLflow's PyTorch flavour.

The logged module is :class:`ProbabilityModel`: ``mlflow.pyfunc.load_model(uri)``
takes uint8 pairs (N, 28, 56) and returns probabilities (N,) of label 1. The
``pairnet`` package must be importable where the model is loaded.
"""

from __future__ import annotations

import numpy as np
import mlflow
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pairnet.models.pair import PairModel, ProbabilityModel

SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 56))]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,))]),
)


def log_pair_model(model: PairModel, example: np.ndarray, registered_name: str | None = None):
    """Log (and register) the model; returns MLflow's ModelInfo."""
    serving = ProbabilityModel(model).to("cpu", memory_format=torch.contiguous_format).eval()
    return mlflow.pytorch.log_model(
        serving,
        name="model",
        signature=SIGNATURE,
        input_example=np.ascontiguousarray(example[:2]),
        registered_model_name=registered_name,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pairnet"],
    )
