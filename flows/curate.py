"""The `curate` flow: ingest -> caption -> filter (score, dedup, select) for a source.

Wiring only: each step is a typed stage step run embedded or as a Ray job (flows/jobs.py);
what a step does lives in pipeline/. Incremental by construction: every stage skips shards it
already finished with the same settings, so a scheduled run with a fixed run id only processes
source files and shards it has not seen.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from flows.params import CurateParams
from flows.tasks import run_step, stop_flow_run_jobs
from pipeline.run_store import RunStore, stage_totals


def _stop_cluster_jobs(flow, flow_run_obj, state) -> None:
    """On cancellation, stop this flow run's Ray jobs (their ids end with the flow run id)."""
    params = CurateParams.model_validate(flow_run_obj.parameters["params"])
    stop_flow_run_jobs(params.execution, str(flow_run_obj.id), params.labels)


def publish_artifacts(params: CurateParams) -> list[dict]:
    store = RunStore(params.root, params.run)
    totals = stage_totals(store)
    create_table_artifact(key=f"curate-{params.run}-counts".lower().replace("_", "-").replace(".", "-"),
                          table=totals, description=f"Row counts and keep rates of run {params.run}")
    lines = [f"# capfilt run `{params.run}`", "", f"source: `{params.source}`", "",
             "| stage | shards done | rows in | kept | rejected | failed | keep rate |", "|---|---|---|---|---|---|---|"]
    for row in totals:
        lines.append(f"| {row['stage']} | {row['done']}/{row['shards']} | {row['rows_in']} | {row['kept']} | "
                     f"{row['rejected']} | {row['failed']} | {row['keep_rate']:.1%} |")
    create_markdown_artifact(markdown="\n".join(lines), description=f"Summary of run {params.run}")
    report = store.uri(store.report_dir())
    link = report if "://" in report else Path(report).resolve().as_uri()
    create_link_artifact(link=link, link_text=f"report folder of {params.run}")
    return totals


@flow(name="curate", on_cancellation=[_stop_cluster_jobs], log_prints=True)
def curate(params: CurateParams) -> list[dict]:
    """Curate a LAION-style source into a run; returns per-stage counts (also as artifacts)."""
    stages = params.steps()  # every stage's typed config, checked before any work
    progress = create_progress_artifact(progress=0.0, description=f"stages of run {params.run} done")
    for i, (stage, step) in enumerate(stages.items(), start=1):
        run_step.with_options(task_run_name=stage)(stage, step, params.execution)
        update_progress_artifact(progress, progress=100.0 * i / len(stages))
    return publish_artifacts(params)
