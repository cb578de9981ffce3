"""The `train` flow: Stage 1 then Stage 2 on a curated run.

Wiring only: each stage is a typed step (`train stage1|stage2`), run embedded or as a Ray job; the
trainers resolve the run's curated data and record its lineage in their checkpoints. Retried
tasks resume from the last checkpoint (the trainers resume by default).
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from flows.params import TrainParams
from flows.tasks import run_steps, stop_flow_run_jobs

LOSS_KEYS = ("loss", "itc", "itm", "itg", "lm", "itm_accuracy")


def _stop_cluster_jobs(flow, flow_run_obj, state) -> None:
    params = TrainParams.model_validate(flow_run_obj.parameters["params"])
    stop_flow_run_jobs(params.execution, str(flow_run_obj.id), params.labels)


def training_summary(params: TrainParams) -> list[dict]:
    """First and last logged losses of each trained stage (from its metrics.jsonl)."""
    rows = []
    for stage in params.labels:
        metrics = Path(params.models) / stage / "metrics.jsonl"
        log = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.exists() else []
        if not log:
            continue
        first, last = log[0], log[-1]
        for key in LOSS_KEYS:
            if key in last:
                rows.append({"stage": stage, "metric": key, "first": round(first.get(key, float("nan")), 4),
                             "last": round(last[key], 4), "step": last["step"]})
    return rows


def publish_artifacts(params: TrainParams) -> list[dict]:
    rows = training_summary(params)
    key = f"train-{params.run}-losses".lower().replace("_", "-").replace(".", "-")
    create_table_artifact(key=key, table=rows, description=f"Losses of the models trained on run {params.run}")
    lines = [f"# models trained on run `{params.run}`", "", f"checkpoints: `{params.models}`", "",
             "| stage | metric | first | last | step |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['metric']} | {r['first']} | {r['last']} | {r['step']} |" for r in rows]
    create_markdown_artifact(markdown="\n".join(lines), description=f"Training on run {params.run}")
    if "://" not in params.models:
        create_link_artifact(link=Path(params.models).resolve().as_uri(), link_text=f"checkpoints of {params.run}")
    return rows


@flow(name="train", on_cancellation=[_stop_cluster_jobs], log_prints=True)
def train(params: TrainParams) -> list[dict]:
    """Train Stage 1 (and Stage 2 when asked) on a curated run; returns the loss summary."""
    run_steps(params.steps(), params.execution)  # every step checked before the first runs
    return publish_artifacts(params)
