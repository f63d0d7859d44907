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


def newest_pipeline(experiment: str | None = None, data_dir: str | None = None,
                    client: MlflowClient | None = None):
    """The newest FINISHED pipeline run (of ``data_dir``, when given), or None."""
    client = client or MlflowClient()
    runs = client.search_runs(_experiment_ids(client, experiment),
                              filter_string=f"tags.`{names.TAG_STAGE}` = 'pipeline' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=200)
    for run in runs:
        if data_dir is None or run.data.params.get("pipeline.data_dir") == str(data_dir):
            return run
    return None


def pipeline_ladder(run, client: MlflowClient | None = None) -> list[dict]:
    """The ladder a pipeline run logged (``ladder.json``): one dict per model."""
    import json
    import tempfile
    from pathlib import Path

    client = client or MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run.info.run_id, "ladder.json", tmp)).read_text())


def ladder_html(run, table: list[dict], client: MlflowClient | None = None) -> str:
    """One self-contained page: the ladder, the plan, and each model's evaluation figures
    (learning curves, val curves and confusion matrix), the images inlined."""
    import base64
    import html
    import tempfile
    from pathlib import Path

    client = client or MlflowClient()
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    rows = "".join(
        f"<tr{' class=ships' if r.get('ships') else ''}><td>{'*' if r.get('ships') else ''}</td>"
        f"<td>{html.escape(r['model'])}</td><td>{html.escape(str(r['version']))}</td><td>{r['stage']}</td>"
        f"<td>{fmt(r['val_acc'])}</td><td>{fmt(r['test_public_acc'])}</td></tr>" for r in table)
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        plan = (Path(client.download_artifacts(run.info.run_id, "plan.txt", tmp)).read_text()
                if "plan.txt" in files else "")
        seen = set()
        for r in table:
            run_id = r.get("run_id")
            if not run_id or run_id in seen:
                continue
            seen.add(run_id)
            imgs = []
            for path in ("learning_curves.png", f"{EVAL_DIR}/val/curves.png", f"{EVAL_DIR}/val/confusion_matrix.png"):
                try:
                    local = client.download_artifacts(run_id, path, tmp)
                except Exception:  # noqa: BLE001 - a run without that figure (the stack) shows the others
                    continue
                data = base64.b64encode(Path(local).read_bytes()).decode()
                imgs.append(f'<img alt="{html.escape(path)}" src="data:image/png;base64,{data}">')
            if imgs:
                figures.append(f"<h3>{html.escape(r['model'])} (run {run_id})</h3>" + "".join(imgs))
    return ("<!doctype html><meta charset=utf-8><title>pairnet ladder</title><style>body{font-family:sans-serif}"
            "td,th{padding:2px 10px;text-align:right}td:nth-child(2){text-align:left}tr.ships{font-weight:bold}"
            "img{max-width:32%;margin:4px}</style>"
            f"<h1>pairnet ladder: pipeline run {run.info.run_id}</h1>"
            f"<p>preset {html.escape(run.data.params.get('pipeline.preset', '?'))}, data "
            f"{html.escape(run.data.params.get('pipeline.data_dir', '?'))}; * marks the model whose predictions "
            "were written. Stack val: 5-fold out-of-fold accuracy on val; the others: best epoch on val.</p>"
            "<table><tr><th></th><th>model</th><th>ver</th><th>stage</th><th>val acc</th><th>test_public acc</th></tr>"
            f"{rows}</table><h2>Plan</h2><pre>{html.escape(plan)}</pre><h2>Figures</h2>{''.join(figures)}")
