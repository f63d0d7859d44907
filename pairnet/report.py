"""Read tracked runs back as tables: what the notebook and the pipeline summary show."""

from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

from pairnet import names
from pairnet.tracking.evaluation import EVAL_DIR
from pairnet.tracking.registry import list_registered

STAGE_ORDER = {"pretrain": 0, "stage1": 1, "stage2": 2, "stage3": 3, "tune": 3.5, "stack": 4}


def _experiment_ids(client: MlflowClient, experiment: str | None) -> list[str]:
    if experiment is None:
        return [e.experiment_id for e in client.search_experiments()]
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no experiment named '{experiment}' on {client.tracking_uri}")
    return [exp.experiment_id]


def ladder(experiment: str | None = None, client: MlflowClient | None = None) -> pd.DataFrame:
    """The stage ladder: one row per finished training or stacking run."""
    client = client or MlflowClient()
    runs = client.search_runs(_experiment_ids(client, experiment), filter_string="attributes.status = 'FINISHED'",
                              max_results=2000)
    rows = []
    for r in runs:
        stage = r.data.tags.get(names.TAG_STAGE)
        m = r.data.metrics
        if stage in ("pretrain", "stage1", "stage2", "stage3"):
            rows.append({"stage": stage, "model": r.data.tags.get(names.TAG_REGISTERED_NAME),
                         "init_from": r.data.tags.get(names.TAG_INIT_FROM, ""),
                         "val_acc": m.get("final_val_acc"), "test_public_acc": m.get("test_public_acc"),
                         "run_id": r.info.run_id, "start": r.info.start_time})
        elif stage == "stack":
            rows.append({"stage": stage, "model": "pairnet-stack", "init_from": "", "val_acc": m.get("cv_oof_acc"),
                         "test_public_acc": m.get("test_public_acc_lightgbm_stack"), "run_id": r.info.run_id,
                         "start": r.info.start_time})
    df = pd.DataFrame(rows, columns=["stage", "model", "init_from", "val_acc", "test_public_acc", "run_id", "start"])
    if df.empty:
        return df
    df["order"] = df["stage"].map(STAGE_ORDER)
    return df.sort_values(["order", "model", "start"]).drop(columns=["order"]).reset_index(drop=True)


def learning_curve(run_id: str, client: MlflowClient | None = None,
                   keys: tuple[str, ...] = ("train_loss", "val_loss", "train_acc", "val_acc")) -> pd.DataFrame:
    client = client or MlflowClient()
    cols = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in keys}
    return pd.DataFrame(cols).sort_index().rename_axis("epoch")


def stack_comparison(experiment: str | None = None, client: MlflowClient | None = None) -> pd.DataFrame:
    """The newest stack run's comparison table (method, test_public accuracy)."""
    import tempfile

    client = client or MlflowClient()
    runs = client.search_runs(_experiment_ids(client, experiment),
                              filter_string=f"tags.`{names.TAG_STAGE}` = 'stack' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return pd.DataFrame(columns=["method", "test_public_acc"])
    with tempfile.TemporaryDirectory() as tmp:
        return pd.read_csv(client.download_artifacts(runs[0].info.run_id, "comparison.csv", tmp))


def registry_state(client: MlflowClient | None = None) -> pd.DataFrame:
    return pd.DataFrame(list_registered(client=client or MlflowClient()))


def _table(run_id: str, path: str, client: MlflowClient) -> pd.DataFrame:
    """An MLflow table artifact (``mlflow.log_table``'s JSON) of a run, as a DataFrame."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, open(client.download_artifacts(run_id, path, tmp)) as fh:
        return pd.DataFrame(**json.load(fh))


def predictions(run_id: str, split: str = "val", client: MlflowClient | None = None) -> pd.DataFrame:
    """A run's predictions on ``split`` (id, label, probability, predicted), from its evaluation."""
    return _table(run_id, f"{EVAL_DIR}/{split}/predictions.json", client or MlflowClient())


def digit_pair_errors(run_id: str, split: str = "val", client: MlflowClient | None = None) -> pd.DataFrame:
    """Pairs, errors and error rate per (left, right) digit; empty when the data has no digits."""
    client = client or MlflowClient()
    files = {a.path for a in client.list_artifacts(run_id, f"{EVAL_DIR}/{split}")}
    if f"{EVAL_DIR}/{split}/digit_pair_errors.json" not in files:
        return pd.DataFrame(columns=["left", "right", "pairs", "errors", "error_rate"])
    return _table(run_id, f"{EVAL_DIR}/{split}/digit_pair_errors.json", client)


def tune_history(experiment: str | None = None, client: MlflowClient | None = None) -> pd.DataFrame:
    """The newest tune study run's optimisation history (trial, value, best so far); empty if none."""
    client = client or MlflowClient()
    runs = client.search_runs(_experiment_ids(client, experiment),
                              filter_string=f"tags.`{names.TAG_STAGE}` = 'tune' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=50)
    parents = [r for r in runs if names.TAG_PARENT not in r.data.tags]
    if not parents:
        return pd.DataFrame(columns=["trial", "value", "best_so_far"])
    run_id = parents[0].info.run_id
    value = {m.step: m.value for m in client.get_metric_history(run_id, "trial_value")}
    best = {m.step: m.value for m in client.get_metric_history(run_id, "best_value_so_far")}
    return pd.DataFrame({"trial": sorted(value), "value": [value[s] for s in sorted(value)],
                         "best_so_far": [best.get(s) for s in sorted(value)]})
