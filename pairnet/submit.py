"""From a run to a submission: predictions for the folder's ``test_private.npz`` from the model
the newest pipeline on that folder shipped (or the namespace's champion stack, or the model the
user names), checked against the submission format and written to one file."""

from __future__ import annotations

import logging
from pathlib import Path

from mlflow.tracking import MlflowClient

from pairnet import names, report
from pairnet.data.generate import FILES
from pairnet.data.splits import check_data_dir
from pairnet.errors import PairnetError
from pairnet.fsutil import check_overwrite, record_output
from pairnet.predict import check_out_path, check_submission, default_model, predict_file
from pairnet.tracking.registry import resolve_version
from pairnet.tracking.session import setup_tracking

log = logging.getLogger(__name__)


def submit(data_dir: str, model: str = "", out: str = "submission.csv", force: bool = False,
           tta: bool | None = None) -> dict:
    """``tta``: the mean over test-time shifts; None: as the pipeline that shipped the model did."""
    d = check_data_dir(data_dir)
    private = d / FILES["private"]
    if not private.exists():
        raise PairnetError(f"{d} has no {FILES['private']}: nothing to submit predictions for")
    out_path = check_overwrite(check_out_path(out, private), "submit", force)  # before the server or the model
    setup_tracking(d)
    uri, why, shipped_tta = (model, "the model you named", False) if model else chosen_model(d)
    tta = shipped_tta if tta is None else tta
    resolve_version(uri)  # a missing model or alias is one line, before any file is written
    n = predict_file(uri, private, out_path, tta)
    problems = check_submission(private, out_path)
    if problems:
        out_path.unlink(missing_ok=True)
        raise PairnetError(f"{out_path} failed the submission check ({problems[0]}); removed")
    record_output(out_path, "submit")
    return {"model": uri, "why": why, "rows": n, "out": str(out_path), "tta": tta}


def chosen_model(d: Path) -> tuple[str, str, bool]:
    """The model the newest finished pipeline on ``d`` shipped (and whether it predicted with
    test-time shifts), else the namespace's champion stack."""
    client = MlflowClient()
    run = report.newest_pipeline(None, str(d), client)
    shipped = run.data.tags.get(names.TAG_SHIPS) if run is not None else None
    if shipped:
        return (shipped, f"the model pipeline run {run.info.run_id} shipped (best out-of-fold or val figure)",
                run.data.params.get("pipeline.tta") == "True")
    return default_model(), "the namespace's champion stack (no finished pipeline on this folder)", False
