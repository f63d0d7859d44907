"""Training checkpoints on the tracking server: where they live, how a run resumes.

The loop writes ``last.pt`` every epoch into a local folder (:func:`local_checkpoint`);
the run's :class:`~pairnet.tracking.callback.MlflowCallback` uploads it under
``checkpoint/`` from its background thread; a killed or failed run is found again by
:func:`find_resumable` and its state downloaded by :func:`download_checkpoint`
(``weights_only=True``: tensors and plain containers, nothing else is unpickled).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pairnet import names
from pairnet.errors import PairnetError
from pairnet.train.loop import load_checkpoint

ARTIFACT_DIR, FILE_NAME = names.CHECKPOINT_ARTIFACT.split("/")


@contextlib.contextmanager
def local_checkpoint(run_id: str) -> Iterator[Path]:
    """The path the loop writes a run's checkpoint to; the folder goes when the run ends
    (every epoch's file is on the server by then)."""
    folder = Path(tempfile.mkdtemp(prefix=f"pairnet-{run_id[:8]}-"))
    try:
        yield folder / FILE_NAME
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def download_checkpoint(run_id: str, client: MlflowClient | None = None, *, purpose: str = "to resume from") -> dict:
    """A run's ``checkpoint/last.pt``; ``purpose`` ends the error message."""
    client = client or MlflowClient()
    try:
        client.get_run(run_id)
    except MlflowException:
        raise PairnetError(f"run '{run_id}' not found on the tracking server; cannot resume it") from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, names.CHECKPOINT_ARTIFACT, tmp)
        except (MlflowException, OSError):
            raise PairnetError(f"run '{run_id}' has no '{names.CHECKPOINT_ARTIFACT}' artifact {purpose}") from None
        return load_checkpoint(path)


def find_resumable(stage: str, model_name: str, seed: int, client: MlflowClient | None = None) -> str:
    """The newest KILLED or FAILED run of this stage/model/seed that logged a checkpoint."""
    client = client or MlflowClient()
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        exp_ids,
        filter_string=(f"tags.`{names.TAG_STAGE}` = '{stage}' and tags.`{names.TAG_MODEL}` = '{model_name}' "
                       f"and tags.`{names.TAG_SEED}` = '{seed}'"),
        order_by=["attributes.start_time DESC"], max_results=50,
    )
    for run in (r for r in runs if r.info.status in ("KILLED", "FAILED")):
        logged = [a.path for a in client.list_artifacts(run.info.run_id, ARTIFACT_DIR)]
        if names.CHECKPOINT_ARTIFACT in logged:
            return run.info.run_id
    raise PairnetError(f"no killed or failed {stage} run of {model_name} (seed {seed}) with a checkpoint to resume")


def resume_target(value: str, stage: str, model_name: str, seed: int) -> str | None:
    """What ``resume`` asks for: nothing, the newest resumable run (true) or a run id."""
    value = (value or "").strip()
    if value.lower() in ("", "false", "0", "no"):
        return None
    if value.lower() in ("true", "1", "yes"):
        return find_resumable(stage, model_name, seed)
    return value
