"""The bridge from the training loop to MLflow: per-epoch metrics with step=epoch."""

from __future__ import annotations

import time
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pairnet.train.loop import Callback, FitResult


class MlflowCallback(Callback):
    def __init__(self, run_id: str, client: MlflowClient | None = None):
        self.run_id = run_id
        self.client = client or MlflowClient()
        self.last_checkpoint: Path | None = None

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        ts = int(time.time() * 1000)
        batch = [Metric(key, float(value), ts, epoch) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def on_checkpoint(self, path: Path, epoch: int) -> None:
        self.last_checkpoint = path

    def on_fit_end(self, result: FitResult) -> None:
        ts = int(time.time() * 1000)
        final = [Metric(f"final_{k}", float(v), ts, 0) for k, v in result.final.items()]
        final += [Metric("best_epoch", float(result.best_epoch), ts, 0)]
        self.client.log_batch(self.run_id, metrics=final, synchronous=True)
