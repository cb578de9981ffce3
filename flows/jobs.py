"""Running one capfilt stage, embedded in this process or as a Ray job on a cluster.

A stage is a typed step (flows/steps/: the stage's config objects and where it reads and writes).
Embedded: the step calls its stage function in this process on a local Ray. Cluster: it is
submitted with `JobSubmissionClient` as `python -m flows.stage_job '<step JSON>'`, under a submission
id derived from the flow run and the stage, so a retried Prefect task re-attaches to the job
that is still running (or already succeeded) instead of submitting a second one.
"""

from __future__ import annotations

import json
import logging
import shlex
import threading
import time
from typing import Callable

from capfilt.errors import CapfiltError
from capfilt.logs import ENV, verbosity

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
ACTIVE = ("PENDING", "RUNNING")


class StageJobError(Exception):
    """A Ray job running a stage ended FAILED or STOPPED (transient: worth a retry)."""


def run_embedded(step, say=print):
    """Run a step in this process (local Ray started in-process): the stage function itself."""
    return step.execute(say)


_beside: set = set()  # the processes `run_beside` is waiting for
_stopped: set = set()  # the pids `stop_beside` killed: their steps fail for good, not retried
_beside_lock = threading.Lock()


def run_beside(step, label: str, say=print) -> None:
    """Run a step in a second local process (`python -m flows.stage_job`, as a Ray job would run it)
    and wait for it, relaying its output: a step the flow runs beside others (the toy BLIP-2
    beside round 0's trainings) must not share this process's interpreter with them. Raises
    CapfiltError where the step refused its input (exit 2; retrying will not help), StageJobError
    on any other failure."""
    import os
    import subprocess
    import sys

    command = [sys.executable, *shlex.split(job_entrypoint(step))[1:]]  # this interpreter, not the job's `python`
    env = {**os.environ, **_job_env()}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                               env=env)
    with _beside_lock:
        _beside.add(process)
    tail: list[str] = []
    try:
        for line in process.stdout:
            line = line.rstrip()
            if line:
                tail = (tail + [line])[-5:]
                say(f"[{label}] {line}")
        code = process.wait()
    except BaseException:
        process.kill()
        raise
    finally:
        with _beside_lock:
            _beside.discard(process)
    with _beside_lock:
        stopped = process.pid in _stopped
        _stopped.discard(process.pid)
    if stopped:  # a CapfiltError: the flow failed, and a retry would start the step again behind its back
        raise CapfiltError(f"stage {label} stopped: the flow it ran beside failed")
    if code == 2 and any("capfilt: error:" in line for line in tail):
        raise CapfiltError(f"stage {label} failed: " + "\n".join(tail))
    if code != 0:
        raise StageJobError(f"stage {label} (process {process.pid}) exited {code}:\n" + "\n".join(tail))


class Beside:
    """A step the flow runs while it goes on (`start`: `submit()` returns its Prefect future), and
    the cores it leaves this process: embedded, the step's process trains on `threads` intra-op
    threads, so this one's torch runs on the cores left (at least 1) until `wait`. Models this
    small gain little from a second thread, and OpenMP threads spin while another process holds
    their core: the demo's round-0 Stage 1 beside the toy Stage 1 took 167 ms a step on 2 threads,
    59 ms on 1 (45 ms alone on 2)."""

    def __init__(self, embedded: bool, threads: int = 1):
        self.embedded, self.threads = embedded, threads
        self.future, self._before = None, None

    def start(self, submit) -> None:
        if self.embedded:
            import torch

            from capfilt.environment import usable_cpus

            self._before = torch.get_num_threads()
            torch.set_num_threads(max(1, min(self._before, usable_cpus() - self.threads)))
        self.future = submit()

    def wait(self) -> None:
        """Wait for the step (raising what it raised); this process has its cores back."""
        if self.future is None:
            return
        try:
            self.future.result()
        finally:
            self.future = None
            if self._before is not None:
                import torch

                torch.set_num_threads(self._before)
                self._before = None


def stop_beside() -> list[int]:
    """Stop every process `run_beside` is waiting for (the flow failed or was cancelled); their pids."""
    with _beside_lock:
        running = [p for p in _beside if p.poll() is None]
        _stopped.update(p.pid for p in running)
    for process in running:
        process.kill()
    return [p.pid for p in running]


def _job_env() -> dict:
    """What a stage's own process needs in its environment, a Ray job's or a local one's."""
    # the step logs as quietly or verbosely as the capfilt that started it
    return {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "NO_ALBUMENTATIONS_UPDATE": "1", ENV: verbosity()}


def job_entrypoint(step) -> str:
    """The Ray job's command: the step's typed config as JSON, read back by flows/stage_job.py.
    `python` of the job's environment: the driver's interpreter path may not exist there."""
    from flows.steps import step_data

    return f"python -m flows.stage_job {shlex.quote(json.dumps(step_data(step), sort_keys=True))}"


def submission_id(flow_run_id: str, stage: str) -> str:
    return f"capfilt-{stage}-{flow_run_id}"


def run_job(
    address: str,
    stage: str,
    step,
    base_id: str,
    log: Callable[[str], None] = logging.getLogger(__name__).info,
    poll_s: float = 0.5,
    runtime_env: dict | None = None,
    client=None,
) -> str:
    """Run a stage as a Ray job and wait for it, streaming its logs; returns the submission id.

    Re-attaches to a PENDING/RUNNING job with this base id, returns at once if one SUCCEEDED,
    else submits a new attempt (`<base>-a<n>`). Stops the job if waiting is interrupted
    (flow cancelled, process terminated).
    """
    from ray.job_submission import JobSubmissionClient

    client = client or JobSubmissionClient(address)
    attempts = sorted(
        (job for job in client.list_jobs() if (job.submission_id or "").startswith(base_id + "-a")),
        key=lambda job: int(job.submission_id.rsplit("-a", 1)[1]),
    )
    latest = attempts[-1] if attempts else None
    if latest is not None and _status(latest.status) == "SUCCEEDED":
        log(f"{stage}: job {latest.submission_id} already succeeded; not resubmitting")
        return latest.submission_id
    if latest is not None and _status(latest.status) in ACTIVE:
        sid = latest.submission_id
        log(f"{stage}: re-attaching to running job {sid}")
    else:
        sid = f"{base_id}-a{len(attempts) + 1}"
        entrypoint = job_entrypoint(step)
        env = {"env_vars": _job_env()}
        env.update(runtime_env or {})
        _submit(client, entrypoint, sid, env)
        log(f"{stage}: submitted job {sid}: python -m flows.stage_job ({step.COMMAND})")
    shown = 0
    try:
        while True:
            status = _status(client.get_job_status(sid))
            logs = client.get_job_logs(sid)
            for line in logs[shown:].splitlines():
                log(f"[{sid}] {line}")
            shown = len(logs)
            if status in TERMINAL:
                break
            time.sleep(poll_s)
    except BaseException:
        client.stop_job(sid)
        log(f"{stage}: stopped job {sid} because waiting for it was interrupted")
        raise
    if status != "SUCCEEDED":
        message = client.get_job_info(sid).message or ""
        tail = "\n".join(logs.strip().splitlines()[-5:])
        if "capfilt: error:" in logs:
            # The stage refused its input: retrying will not help.
            raise CapfiltError(f"stage {stage} (job {sid}) failed: {tail}")
        raise StageJobError(f"stage {stage} (job {sid}) ended {status}: {message}\n{tail}")
    return sid


def _submit(client, entrypoint: str, sid: str, runtime_env: dict, patience_s: float = 60.0) -> None:
    """Submit, waiting out a head whose job agent is still starting (it answers 'No available agent')."""
    deadline = time.time() + patience_s
    while True:
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env)
            return
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(1.0)


def stop_jobs(address: str, base_prefix: str, client=None) -> list[str]:
    """Stop every active job whose submission id starts with `base_prefix` (flow cancellation)."""
    from ray.job_submission import JobSubmissionClient

    client = client or JobSubmissionClient(address)
    stopped = []
    for job in client.list_jobs():
        if (job.submission_id or "").startswith(base_prefix) and _status(job.status) in ACTIVE:
            client.stop_job(job.submission_id)
            stopped.append(job.submission_id)
    return stopped


def _status(status) -> str:
    return str(getattr(status, "value", status)).rsplit(".", 1)[-1]
