"""The bridge from the training loop to MLflow: per-epoch metrics (step = epoch) and the
checkpoint, sent by a background thread that buffers and retries.

Training never waits for the tracking server and never dies because of it: each epoch's
metrics are queued; a sender thread posts them with ``log_batch`` and, when the server
is down (restarted, overloaded), keeps them and retries with back-off until they land.
The newest checkpoint is uploaded the same way every ``checkpoint_every`` epochs (older
queued checkpoints are superseded), so a run killed by SIGKILL, the OOM killer or a lost
machine can be resumed from its last uploaded epoch. ``close()`` waits for the queue
to drain. When a fit ends and the queue has not drained within the flush limit
(``PAIRNET_TRACKING_FLUSH_S``, 600 s by default), the callback gives up and raises
:class:`MetricsLost`: the run ends FAILED, tagged ``pairnet.metrics_lost`` with the number
of metric values the server never got, never FINISHED with epochs missing.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pairnet import names
from pairnet.errors import PairnetError, PairnetRuntimeError
from pairnet.train.loop import Callback, FitResult
from pairnet.tracking.checkpoints import ARTIFACT_DIR

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per request
BACKOFF_S = (0.5, 1, 2, 5, 10)
FLUSH_ENV = "PAIRNET_TRACKING_FLUSH_S"
FLUSH_DEFAULT_S = 600.0


def flush_limit() -> float:
    """Seconds the end of a fit waits for buffered metrics to reach the server."""
    raw = os.environ.get(FLUSH_ENV, "").strip()
    try:
        value = float(raw) if raw else FLUSH_DEFAULT_S
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise PairnetError(f"{FLUSH_ENV}={raw!r}: give the seconds to wait for the tracking server, e.g. 600")
    return value


class MetricsLost(PairnetRuntimeError):
    """Metric values a run buffered never reached the server within the flush limit."""

    def __init__(self, run_id: str, lost: int, seconds: float):
        self.lost = lost
        super().__init__(f"run {run_id}: {lost} metric values could not reach the tracking server within "
                         f"{seconds:g} s ({FLUSH_ENV}); the run ends FAILED, tagged {names.TAG_METRICS_LOST}")


def final_metrics(result: FitResult) -> dict[str, float]:
    """The metrics of the weights a fit returns (its best epoch's), as runs log them."""
    return {**{f"final_{k}": v for k, v in result.final.items()}, "best_epoch": float(result.best_epoch)}


class MlflowCallback(Callback):
    def __init__(self, run_id: str, client: MlflowClient | None = None, *, checkpoint_every: int = 1,
                 artifact_path: str = ARTIFACT_DIR, final_metrics: bool = True):
        self.run_id = run_id
        self.final_metrics = final_metrics  # False: the caller logs them, linked to the logged model
        self.client = client or MlflowClient()
        self.checkpoint_every = checkpoint_every
        self.artifact_path = artifact_path
        self.flush_s = flush_limit()  # read (and a bad value refused) before training, not after it
        self._metrics: list[Metric] = []
        self._ckpt: Path | None = None  # a private snapshot waiting for upload
        self._inflight: Path | None = None  # the snapshot being uploaded now
        self._busy = False
        self._abandoned = False  # gave up: nothing more is queued, sent or re-queued
        self._lost = 0  # metric values dropped after giving up
        self._failures = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._snapshots = Path(tempfile.mkdtemp(prefix=f"pairnet-upload-{run_id[:8]}-"))
        self._thread: threading.Thread | None = None
        self._start()

    def _start(self) -> None:
        """(Re)start the sender; it ends once ``close()`` has drained the queue."""
        with self._lock:
            self._closing = False
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"mlflow-sender-{self.run_id[:8]}",
                                                daemon=True)
                self._thread.start()

    # ------------------------------------------------------------ training thread
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        with self._lock:
            if self._abandoned:
                self._lost += len(metrics)
                return
            self._metrics += [Metric(key, float(value), ts, step) for key, value in metrics.items()]
        self._start()
        self._wake.set()

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.log_metrics(metrics, epoch)

    def on_checkpoint(self, path: Path, epoch: int) -> None:
        if self.checkpoint_every and epoch % self.checkpoint_every == 0:
            self.queue_checkpoint(path)

    def queue_checkpoint(self, path: Path) -> None:
        """Snapshot ``path`` (a hard link: the loop replaces the file, never rewrites it) for upload."""
        self._snapshots.mkdir(parents=True, exist_ok=True)
        snap = Path(tempfile.mkdtemp(dir=self._snapshots)) / Path(path).name
        try:
            os.link(path, snap)
        except OSError:
            shutil.copy2(path, snap)
        with self._lock:
            old, self._ckpt = self._ckpt, snap
            superseded = old is not None and old != self._inflight  # the sender removes the one it uploads
        if superseded:
            shutil.rmtree(old.parent, ignore_errors=True)
        self._start()
        self._wake.set()

    def on_fit_end(self, result: FitResult) -> None:
        if self.final_metrics:
            self.log_metrics(final_metrics(result), 0)
        if not self.close(self.flush_s):
            raise MetricsLost(self.run_id, self.give_up(), self.flush_s)

    def give_up(self) -> int:
        """Drop what is still queued and stop the sender; the number of metric values lost."""
        with self._lock:
            self._lost += len(self._metrics)
            self._metrics, self._ckpt, self._abandoned, self._closing = [], None, True, True
            lost = self._lost
        self._wake.set()
        log.error("run %s: gave up on %d metric values the tracking server never got", self.run_id, lost)
        return lost

    def lost(self, wait: float = 120.0) -> int:
        """Metric values given up on, once the request in flight (if any) has landed or failed."""
        deadline = time.monotonic() + wait
        while self._busy and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            return self._lost

    def abort(self, err: BaseException) -> None:
        """The run ends KILLED or FAILED: the epochs that ran reach the server first. When
        they could not (:class:`MetricsLost`), the run is tagged with how many were lost."""
        from pairnet.tracking.lifecycle import Terminated

        if isinstance(err, MetricsLost):
            try:  # the server may still be away: MLflow's HTTP retries wait for it a while
                self.client.set_tag(self.run_id, names.TAG_METRICS_LOST, str(self.lost()))
            except Exception as tag_err:  # the run still ends FAILED, or the sweeper ends it
                log.warning("run %s: could not tag %s: %s", self.run_id, names.TAG_METRICS_LOST, tag_err)
            return
        self.close(timeout=120)
        if isinstance(err, (KeyboardInterrupt, Terminated)):
            log.warning("interrupted: run %s keeps its last checkpoint; continue it with resume=true or resume=%s",
                        self.run_id, self.run_id)

    def pending(self) -> int:
        with self._lock:
            return len(self._metrics) + (self._ckpt is not None) + self._busy

    def close(self, timeout: float = FLUSH_DEFAULT_S) -> bool:
        """Wait until everything queued reached the server (True) or ``timeout`` passed (False)."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self.pending() and time.monotonic() < deadline and self._thread is not None:
            time.sleep(0.05)
        left = self.pending()
        if not left:
            with self._lock:
                self._closing = True  # the sender thread ends; logging again starts a new one
            self._wake.set()
            shutil.rmtree(self._snapshots, ignore_errors=True)
        else:
            log.warning("run %s: %d metric/checkpoint uploads still pending after %.0f s", self.run_id, left, timeout)
        return not left

    # ------------------------------------------------------------ sender thread
    def _loop(self) -> None:
        while True:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            with self._lock:
                if self._closing and not self._metrics and self._ckpt is None:
                    self._thread = None
                    return
            while self.pending():
                if self._send_once():
                    self._failures = 0
                else:
                    delay = BACKOFF_S[min(self._failures, len(BACKOFF_S) - 1)]
                    self._failures += 1
                    time.sleep(delay)

    def _send_once(self) -> bool:
        with self._lock:
            batch, self._metrics = self._metrics[:MAX_BATCH], self._metrics[MAX_BATCH:]
            ckpt = None if batch else self._ckpt
            self._inflight = ckpt
            self._busy = True
        try:
            if batch:
                self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
            elif ckpt is not None:
                self.client.log_artifact(self.run_id, str(ckpt), artifact_path=self.artifact_path)
                with self._lock:
                    if self._ckpt == ckpt:
                        self._ckpt = None
                shutil.rmtree(ckpt.parent, ignore_errors=True)
            return True
        except Exception as err:  # the server is down or refused: keep everything, retry later
            if batch:
                with self._lock:
                    if self._abandoned:
                        self._lost += len(batch)
                    else:
                        self._metrics = batch + self._metrics
            if self._failures == 0:
                log.warning("tracking server unavailable (%s); buffering and retrying", str(err).splitlines()[0][:200])
            return False
        finally:
            with self._lock:
                self._busy = False
                self._inflight = None
