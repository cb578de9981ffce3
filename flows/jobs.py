"""Running one capfilt stage, embedded in this process or as a Ray job on a cluster.

A stage is its `capfilt` command and arguments (the CLI is the one entrypoint, so what runs is
what a user can type). Embedded: the command runs in this process on a local Ray. Cluster: it is
submitted with `JobSubmissionClient` as `python -m capfilt.cli <stage> ...`, under a submission
id derived from the flow run and the stage, so a retried Prefect task re-attaches to the job
that is still running (or already succeeded) instead of submitting a second one.
"""

from __future__ import annotations

import inspect
import logging
import os
import shlex
import time
from typing import Callable

import click

from capfilt.errors import CapfiltError, ConfigError
from capfilt.logs import ENV, verbosity

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
ACTIVE = ("PENDING", "RUNNING")


class StageJobError(Exception):
    """A Ray job running a stage ended FAILED or STOPPED (transient: worth a retry)."""


def validate_stage_args(stage: str, argv: list[str], will_exist: tuple[str, ...] = ()) -> None:
    """Parse a stage's arguments exactly as the CLI would and build its typed config, without running
    anything, so whatever the stage would refuse is refused before any work.

    Paths that must exist may instead lie under one of `will_exist` (folders earlier steps of the
    same flow write, e.g. the models a later round reads). Raises ConfigError naming the stage
    and the bad option, so flows fail before any work.
    """
    from capfilt.cli import cli

    command = cli.get_command(None, stage)
    if command is None:
        raise ConfigError(f"unknown stage {stage!r}")
    argv = list(argv)
    if isinstance(command, click.Group):  # e.g. `train stage1 ...`: check the subcommand's options
        sub = command.get_command(None, argv[0]) if argv else None
        if sub is None:
            raise ConfigError(f"stage {stage}: name one of {', '.join(sorted(command.list_commands(None)))} first")
        stage, command, argv = f"{stage} {argv[0]}", sub, argv[1:]
    must_exist = [p for p in command.params if isinstance(p.type, click.Path) and p.type.exists] if will_exist else []
    for param in must_exist:  # checked below, against will_exist too
        param.type.exists = False
    try:
        ctx = command.make_context(f"capfilt {stage}", argv, resilient_parsing=False)
    except click.ClickException as exc:
        raise ConfigError(f"stage {stage}: {exc.format_message()}") from exc
    finally:
        for param in must_exist:
            param.type.exists = True
    for param in must_exist:
        value = ctx.params.get(param.name)
        if value is None or os.path.exists(value):
            continue
        if not any(_under(str(value), folder) for folder in will_exist):
            raise ConfigError(f"stage {stage}: Invalid value for '{param.opts[-1]}': {value} does not exist "
                              f"(and no earlier step writes it).")
    validate = getattr(command, "validate_params", None)  # builds the stage's typed config(s)
    if validate is not None:
        extra = {"will_exist": will_exist} if "will_exist" in inspect.signature(validate).parameters else {}
        try:
            validate(ctx.params, **extra)
        except click.ClickException as exc:
            raise ConfigError(f"stage {stage}: {exc.format_message()}") from None
        except ConfigError as exc:
            raise ConfigError(f"stage {stage}: {exc}") from None


def _under(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def run_embedded(stage: str, argv: list[str]):
    """Run a stage command in this process (local Ray started in-process); returns its result."""
    from capfilt.cli import cli

    return cli.main(args=[stage, *argv], prog_name="capfilt", standalone_mode=False)


def submission_id(flow_run_id: str, stage: str) -> str:
    return f"capfilt-{stage}-{flow_run_id}"


def run_job(
    address: str,
    stage: str,
    argv: list[str],
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
        # `python` of the job's environment: the driver's interpreter path may not exist there.
        entrypoint = f"python -m capfilt.cli {stage} {shlex.join(argv)}"
        env = {"env_vars": {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "NO_ALBUMENTATIONS_UPDATE": "1",
                            # the job logs as quietly or verbosely as the capfilt that submitted it
                            ENV: verbosity()}}
        env.update(runtime_env or {})
        _submit(client, entrypoint, sid, env)
        log(f"{stage}: submitted job {sid}: {entrypoint}")
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
