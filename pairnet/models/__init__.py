"""The model zoo."""

from pairnet.models.pair import PairModel
from pairnet.models.registry import VARIANTS, create_model, list_models, model_from_spec

__all__ = ["PairModel", "VARIANTS", "create_model", "list_models", "model_from_spec"]
