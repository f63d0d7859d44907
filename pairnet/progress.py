"""Progress bars for epochs and long steps; silent when stderr is not a terminal."""

from __future__ import annotations

from tqdm.auto import tqdm

from pairnet.train.loop import Callback, FitResult


class EpochBar(Callback):
    def __init__(self, total: int, desc: str, start: int = 0):
        # disable=None: tqdm turns itself off when the output is not a TTY.
        self.bar = tqdm(total=total, initial=start, desc=desc, unit="epoch", disable=None, leave=False)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.bar.set_postfix(val_acc=f"{metrics['val_acc']:.4f}", loss=f"{metrics['train_loss']:.4f}")
        self.bar.update(1)

    def on_fit_end(self, result: FitResult) -> None:
        self.bar.close()
