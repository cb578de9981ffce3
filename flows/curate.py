"""The `curate` flow: ingest -> caption -> filter (score, dedup, select) for a source.

Wiring only: each step is a `capfilt` stage command run embedded or as a Ray job (flows/jobs.py);
what a step does lives in pipeline/. Incremental by construction: every stage skips shards it
already finished with the same settings, so a scheduled run with a fixed run id only processes
source files and shards it has not seen.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run

from capfilt.errors import CapfiltError
from flows.jobs import run_embedded, run_job, stop_jobs, submission_id, validate_stage_args
from flows.params import CurateParams, Execution
from pipeline.run_store import RunStore, stage_totals


def _transient_only(task, task_run, state) -> bool:
    """Retry Ray/infrastructure failures, never a CapfiltError (bad input or config)."""
    try:
        state.result()
    except CapfiltError:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient (node lost, job failed)
        return True
    return False


@task(name="stage", retries=2, retry_delay_seconds=2, retry_condition_fn=_transient_only)
def run_stage(stage: str, argv: list[str], execution: Execution) -> None:
    logger = get_run_logger()
    if execution.mode == "embedded":
        logger.info("running capfilt %s embedded", stage)
        run_embedded(stage, argv)
        return
    runtime_env = {"working_dir": execution.working_dir} if execution.working_dir else None
    run_job(
        execution.ray_address, stage, argv,
        base_id=submission_id(flow_run.get_id() or "local", stage),
        log=logger.info, runtime_env=runtime_env,
    )


def _stop_cluster_jobs(flow, flow_run_obj, state) -> None:
    """On cancellation, stop this flow run's Ray jobs (their ids end with the flow run id)."""
    params = CurateParams.model_validate(flow_run_obj.parameters["params"])
    if params.execution.mode == "cluster":
        for stage in params.stage_argv():
            stop_jobs(params.execution.ray_address, submission_id(str(flow_run_obj.id), stage))


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
    stages = params.stage_argv()
    for stage, argv in stages.items():  # every stage's options are checked before any work
        validate_stage_args(stage, argv)
    progress = create_progress_artifact(progress=0.0, description=f"stages of run {params.run} done")
    for i, (stage, argv) in enumerate(stages.items(), start=1):
        run_stage.with_options(task_run_name=stage)(stage, argv, params.execution)
        update_progress_artifact(progress, progress=100.0 * i / len(stages))
    return publish_artifacts(params)
