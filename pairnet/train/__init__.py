"""Training: config, losses, metrics and the fit/evaluate loop."""

from pairnet.train.config import TrainConfig
from pairnet.train.loop import Callback, FitResult, evaluate, fit, load_checkpoint, pick_device, predict_proba

__all__ = ["Callback", "FitResult", "TrainConfig", "evaluate", "fit", "load_checkpoint", "pick_device", "predict_proba"]
