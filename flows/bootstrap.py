"""The `bootstrap` flow: BLIP's data bootstrapping in rounds.

Round 0 curates the raw source (the preset's round-0 captioner and filter; the toy preset first
trains its frozen pieces on the raw web pairs) and trains Stage 1 + Stage 2 on it. Round k
curates round 0's images again with round k-1's Stage 2 as captioner and its Stage 1 as ITM
filter, then trains round k's models. With an annotated set (BLIP's recipe), round k-1's models
are first finetuned on it (filter: ITC + ITM, then its ITM threshold calibrated on the set's
held-out part; captioner: LM loss), and the filter keeps every caption, web or synthetic, whose
ITM probability reaches that threshold. With a ground-truth table (synthetic worlds), an oracle model is
trained on the true captions. Every model is evaluated (`capfilt eval`) and one report page
shows the last round's funnel, plots, training curves and the evaluation table.

Wiring only: every step is a typed stage step (flows/steps/, run by flows/tasks.py), curate and train
run as subflows.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from flows.curate import curate, publish_artifacts
from flows.jobs import Beside, stop_beside
from flows.params import BootstrapParams
from flows.progress import step_clock
from flows.tasks import run_step, run_steps
from flows.train import train


def planned_steps(params: BootstrapParams) -> list[tuple[str, object]]:
    """(label, typed step) of every step `bootstrap` runs, in the order it runs them (curate's and
    train's steps included): what "step k of N" counts. Building them checks every stage's config."""
    steps: list[tuple[str, object]] = []
    early, late = eval_steps(params)
    for k in range(params.rounds + 1):
        if k == 1:
            steps += early.items()
        curate_params, _, train_params = params.round_params(k)
        steps += params.finetune_steps(k).items()
        steps += [(f"{stage}-r{k}", step) for stage, step in curate_params.steps(params.will_exist).items()]
        if k == 0:
            steps += params.pretrain_steps().items()
        steps.append((f"filter-r{k}", params.filter_step(k)))
        steps += [(f"{stage}-r{k}", step) for stage, step in train_params.steps().items()]
        if k == 0 and params.truth:
            steps.append(("oracle", params.oracle_step()))
            steps += [(f"{stage}-oracle", step) for stage, step in params.train_params(params.oracle_run).steps().items()]
    if params.ablation:
        for arm in params.ABLATION_ARMS:
            curate_params, filter_step, train_params = params.ablation_steps(arm)
            steps += [(f"{stage}-{arm}", step) for stage, step in curate_params.steps(params.will_exist).items()]
            steps.append((f"filter-{arm}", filter_step))
            steps += [(f"{stage}-{arm}", step) for stage, step in train_params.steps().items()]
    return steps + list(late.items())


def check(params: BootstrapParams) -> list[tuple[str, object]]:
    """Every step's typed config, built and checked as its stage would check it, before any work
    (no Prefect needed); returns the planned steps."""
    steps = planned_steps(params)
    if params.execution.mode == "embedded":  # on a cluster the source may be where only the cluster sees it
        from capfilt.errors import CapfiltError, ConfigError
        from pipeline.ingest_source import list_source_files

        # Ingest reads the source only when it runs, after Prefect and Ray started: a typo fails here.
        for _, step in steps:
            if step.COMMAND == "ingest" and step.source:
                try:
                    list_source_files(step.source)
                except CapfiltError as exc:
                    raise ConfigError(f"stage ingest: {exc}") from exc
    return steps


def model_labels(params: BootstrapParams) -> dict[str, str]:
    """Trained run -> column name in the summary: raw (round 0), curated rounds, oracle; with the
    ablation BLIP's Table 1 names: raw, captioner, filter, capfilt (round 1), oracle."""
    if params.ablation:
        labels = {params.round_run(0): "raw"}
        labels |= {params.ablation_run(arm): arm for arm in params.ABLATION_ARMS}
        labels |= {params.round_run(k): "capfilt" if k == 1 else f"capfilt-r{k}" for k in range(1, params.rounds + 1)}
        if params.truth:
            labels[params.oracle_run] = "oracle"
        return labels
    labels = {params.round_run(0): "raw-r0"}
    labels |= {params.round_run(k): f"capfilt-r{k}" for k in range(1, params.rounds + 1)}
    if params.truth:
        labels[params.oracle_run] = "oracle"
    return labels


def eval_steps(params: BootstrapParams) -> tuple[dict, dict]:
    """The eval steps (label -> step), in two groups: round 0's and the oracle's models, evaluated
    before round 1 (while the flow would wait for the toy BLIP-2 pretraining beside them), then the
    other models and the rounds' captioners after the last round. Both empty without --evaluate."""
    if not params.evaluate:
        return {}, {}
    first = {params.round_run(0), params.oracle_run} if params.rounds >= 1 else set()
    models = {run: (f"eval-{label}", params.eval_step(run)) for run, label in model_labels(params).items()}
    late = dict(step for run, step in models.items() if run not in first)
    late |= {f"eval-{label}": step for label, step in params.captioner_evals().items()}
    return dict(step for run, step in models.items() if run in first), late


@task(name="bootstrap-report")
def write_report(params: BootstrapParams, labels: dict[str, str]) -> dict:
    from pipeline.bootstrap_report import captioner_figures, headline_rows, write_bootstrap_report

    evaluations, captioners = {}, {}
    for run, label in labels.items():
        path = Path(params.models(run)) / "eval.json"
        if path.exists():
            evaluations[label] = json.loads(path.read_text())
    for label, step in params.captioner_evals().items():
        path = Path(step.out) / "eval.json"
        if path.exists():
            captioners[label] = json.loads(path.read_text())
    last = params.round_run(params.rounds)
    notes = [f"source: {params.source}", f"preset: {params.preset}{' (quick)' if params.quick else ''}",
             f"rounds: {params.rounds} after round 0; funnel and plots of {last}"]
    if params.heldout:
        notes.append(f"evaluation set: held-out world {params.heldout} (true captions, never trained on)")
    page = write_bootstrap_report(params.root, params.run, last,
                                  {label: params.models(run) for run, label in labels.items()}, evaluations, notes,
                                  captioners=captioners)
    return {"report": str(page), "table": headline_rows(evaluations),
            "captioners": {label: captioner_figures(ev) for label, ev in captioners.items()}}


@flow(name="bootstrap", log_prints=True)
def bootstrap(params: BootstrapParams) -> dict:
    """Round 0 + `rounds` CapFilt rounds (+ oracle with ground truth), evaluation and report."""
    steps = check(params)
    with step_clock([step.COMMAND for _, step in steps]):
        return _bootstrap(params)


def _bootstrap(params: BootstrapParams) -> dict:
    try:
        return _rounds(params)
    except BaseException:
        stop_beside()  # a step running beside the failed ones (the toy BLIP-2) stops with the flow
        raise


def _rounds(params: BootstrapParams) -> dict:
    # the toy BLIP-2 (Stage 1, then Stage 2; one torch thread: ToyPreset.threads), pretrained while round 0
    # and the oracle train; round 1's filter and captioner start from it
    beside = Beside(params.execution.mode == "embedded", threads=1)
    early, late = eval_steps(params)
    for k in range(params.rounds + 1):
        if k == 1:
            run_steps(early, params.execution)  # round 0's and the oracle's models, while the toy BLIP-2 finishes
            beside.wait()  # raises if it failed
        curate_params, _, train_params = params.round_params(k)
        run_steps(params.finetune_steps(k), params.execution)  # BLIP: finetune on the annotated set first
        curate(curate_params)
        if k == 0:
            for label, step in params.pretrain_steps().items():
                if label == "toy-blip2":
                    beside.start(lambda: run_step.with_options(task_run_name=label).submit(
                        label, step, params.execution, beside=True))
                else:
                    run_step.with_options(task_run_name=label)(label, step, params.execution)
        run_step.with_options(task_run_name=f"filter-r{k}")(f"filter-r{k}", params.filter_step(k), params.execution)
        publish_artifacts(curate_params)  # the round's counts now include the filter
        train(train_params)
        if k == 0 and params.truth:  # the oracle needs only round 0's images: it trains while the toy BLIP-2 does
            run_step.with_options(task_run_name="oracle")("oracle", params.oracle_step(), params.execution)
            train(params.train_params(params.oracle_run))
    beside.wait()
    if params.ablation:  # BLIP's Table 1: round 1's captions and scores, selected as each arm does
        for arm in params.ABLATION_ARMS:
            curate_params, filter_step, train_params = params.ablation_steps(arm)
            curate(curate_params)
            run_step.with_options(task_run_name=f"filter-{arm}")(f"filter-{arm}", filter_step, params.execution)
            publish_artifacts(curate_params)
            train(train_params)
    labels = model_labels(params)
    run_steps(late, params.execution)  # the other models, and the captioners that wrote the rounds' captions
    report = write_report(params, labels)
    summary = {"runs": list(labels), "models": {run: params.models(run) for run in labels}, **report}
    lines = [f"# bootstrap `{params.run}`", "", f"report: `{report['report']}`", "", "| run | models |", "|---|---|"]
    lines += [f"| {run} | `{path}` |" for run, path in summary["models"].items()]
    if report["table"]:
        names = list(report["table"][0])[1:]
        lines += ["", "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += ["| " + row["metric"] + " | " + " | ".join("-" if row[n] is None else f"{row[n]:.3f}" for n in names)
                  + " |" for row in report["table"]]
    create_markdown_artifact(markdown="\n".join(lines), description=f"Bootstrap {params.run}")
    if "://" not in report["report"]:
        create_link_artifact(link=Path(report["report"]).resolve().as_uri(), link_text="bootstrap report",
                             description=f"Bootstrap report of {params.run}")
    return summary
