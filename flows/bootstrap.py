"""The `bootstrap` flow: BLIP's data bootstrapping in rounds.

Round 0 curates the raw source (the preset's round-0 captioner and filter; the toy preset first
trains its frozen pieces on the raw web pairs) and trains Stage 1 + Stage 2 on it. Round k
curates the source again with round k-1's Stage 2 as captioner and its Stage 1 as ITM filter,
then trains round k's models. With a ground-truth table (synthetic worlds), an oracle model is
trained on the true captions, and every model is evaluated.

Wiring only: every step is a capfilt command (flows/tasks.py), curate and train run as subflows.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.curate import curate
from flows.params import BootstrapParams, TrainParams
from flows.tasks import run_step, validate_steps
from flows.train import train


def _all_steps(params: BootstrapParams) -> dict[str, list[str]]:
    """Every command the flow will run, for checking all options before any work."""
    steps: dict[str, list[str]] = {}
    for k in range(params.rounds + 1):
        curate_params, _, train_params = params.round_params(k)
        for stage, argv in curate_params.stage_argv().items():
            steps[f"{stage}-r{k}"] = [stage, *argv]
        steps[f"filter-r{k}"] = params.filter_argv(k)
        for stage, argv in train_params.stage_argv().items():
            steps[f"{stage}-r{k}"] = argv
    if params.pretrain_argv():
        steps["toy"] = params.pretrain_argv()
    for label, argv in oracle_and_eval_steps(params).items():
        steps[label] = argv
    return steps


def oracle_and_eval_steps(params: BootstrapParams) -> dict[str, list[str]]:
    if not params.truth:
        return {}
    steps = {"oracle": ["synth", "oracle", "--truth", params.truth, "--root", params.root,
                        "--from-run", params.round_run(0), "--run", params.oracle_run]}
    return steps


def eval_argv(params: BootstrapParams, run: str) -> list[str]:
    models = params.models(run)
    argv = ["eval", "--root", params.root, "--run", params.round_run(0), "--stage1", f"{models}/stage1",
            "--out", f"{models}/eval.json"]
    if params.stage2 is not None:
        argv += ["--captioner", f"{models}/stage2"]
    if params.truth:
        argv += ["--truth", params.truth]
    return argv


@flow(name="bootstrap", log_prints=True)
def bootstrap(params: BootstrapParams) -> dict:
    """Round 0 + `rounds` CapFilt rounds (+ oracle and evaluation with ground truth)."""
    validate_steps(_all_steps(params))
    trained: list[str] = []
    for k in range(params.rounds + 1):
        curate_params, _, train_params = params.round_params(k)
        curate(curate_params)
        if k == 0 and params.pretrain_argv():
            run_step.with_options(task_run_name="toy-pretrain")("toy", params.pretrain_argv(), params.execution)
        run_step.with_options(task_run_name=f"filter-r{k}")(f"filter-r{k}", params.filter_argv(k), params.execution)
        train(train_params)
        trained.append(train_params.run)
    if params.truth:
        for label, argv in oracle_and_eval_steps(params).items():
            run_step.with_options(task_run_name=label)(label, argv, params.execution)
        oracle: TrainParams = params.train_params(params.oracle_run)
        train(oracle)
        trained.append(oracle.run)
    summary = {"runs": trained, "models": {run: params.models(run) for run in trained}}
    lines = [f"# bootstrap `{params.run}`", "", "| run | models |", "|---|---|"]
    lines += [f"| {run} | `{path}` |" for run, path in summary["models"].items()]
    create_markdown_artifact(markdown="\n".join(lines), description=f"Bootstrap {params.run}")
    return summary
