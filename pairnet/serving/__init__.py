"""Pickle-free model files and the predictors built from them.

A pair model is stored as ``weights.safetensors`` (tensors only) plus ``spec.json``
(the zoo name and builder arguments); pairnet's own code rebuilds the network from the
spec and loads the tensors. Nothing is unpickled and no code stored with a model runs.
The stack adds a LightGBM text model and a ``lineage.json`` naming its base models.
"""

from pairnet.serving.predictors import PairPredictor, StackPredictor, load_pair_dir, save_pair_dir, save_stack_dir

__all__ = ["PairPredictor", "StackPredictor", "load_pair_dir", "save_pair_dir", "save_stack_dir"]
