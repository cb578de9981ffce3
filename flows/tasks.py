"""The one Prefect task every flow uses: run a typed step, embedded or as a Ray job.

A step is a label (unique within its flow run: it names the Ray job) and a typed step object
(flows/steps/), built and checked before the flow starts any work. Retries are for transient
failures only; on cancellation a flow stops its own Ray jobs, found by the flow run id their
submission ids end with.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.runtime import flow_run

from capfilt.errors import CapfiltError
from flows.jobs import run_beside, run_embedded, run_job, stop_jobs, submission_id
from flows.params import Execution
from flows.progress import current as current_clock


def _transient_only(task, task_run, state) -> bool:
    """Retry Ray/infrastructure failures, never a CapfiltError (bad input or config)."""
    try:
        state.result()
    except CapfiltError:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient (node lost, job failed)
        return True
    return False


@task(name="step", retries=2, retry_delay_seconds=2, retry_condition_fn=_transient_only)
def run_step(label: str, step, execution: Execution, beside: bool = False) -> None:
    """Run one step and wait for it. `beside`: the flow runs it while it runs other steps
    (`run_step.submit`); embedded, it then runs in a second local process, not in this one."""
    logger = get_run_logger()
    command = step.COMMAND  # e.g. "filter", "train stage1"
    where = (", as a Ray job" if execution.mode != "embedded" else
             ", in a second process, beside the next steps" if beside else ", in this process")
    clock = current_clock()  # bootstrap and demo: "step k of N" and the time left
    if clock is not None:
        k, started, line = clock.start(label, command)
        logger.info("%s%s", line, where)
    else:
        logger.info("step %s: capfilt %s%s", label, command, where)
    if execution.mode == "embedded" and beside:
        run_beside(step, label, say=logger.info)
    elif execution.mode == "embedded":
        run_embedded(step, say=logger.info)
    else:
        runtime_env = {"working_dir": execution.working_dir} if execution.working_dir else None
        run_job(
            execution.ray_address, label, step,
            base_id=submission_id(flow_run.get_id() or "local", label),
            log=logger.info, runtime_env=runtime_env,
        )
    if clock is not None:
        logger.info("%s", clock.end(k, started, label, command))


def run_steps(steps: dict, execution: Execution) -> None:
    for label, step in steps.items():
        run_step.with_options(task_run_name=label)(label, step, execution)


def stop_flow_run_jobs(execution: Execution, flow_run_id: str, labels) -> None:
    if execution.mode == "cluster":
        for label in labels:
            stop_jobs(execution.ray_address, submission_id(flow_run_id, label))
