"""Training: config, losses, metrics and the fit/evaluate loop."""

from pairnet.train.config import TrainConfig

__all__ = ["Callback", "FitResult", "TrainConfig", "evaluate", "fit", "load_checkpoint", "pick_device", "predict_proba"]
_LOOP = frozenset(__all__) - {"TrainConfig"}


def __getattr__(name: str):
    # The loop imports torch (seconds): loaded on first use, so the CLI can read TrainConfig
    # to build its flags without it.
    if name in _LOOP:
        from pairnet.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'pairnet.train' has no attribute '{name}'")
