"""`capfilt bootstrap`: the `bootstrap` Prefect flow from the command line (local Ray, Prefect local mode)."""

from __future__ import annotations

import json

import click

from capfilt.commands.options import root_option
from capfilt.logs import is_quiet

STAGE_DICTS = ("ingest", "round0_caption", "round0_filter", "caption", "filter", "stage1", "stage2", "eval",
               "finetune_filter", "finetune_captioner", "pretrain")


def parse_sets(values: tuple[str, ...]) -> dict[str, dict]:
    """('stage1.steps=100', 'filter.top-k=1') -> {'stage1': {'steps': 100}, 'filter': {'top-k': 1}}."""
    out: dict[str, dict] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        stage, dot, option = key.partition(".")
        if not sep or not dot or stage.replace("-", "_") not in STAGE_DICTS:
            raise click.BadParameter(
                f"{item!r}: use STAGE.OPTION=VALUE with STAGE one of {', '.join(STAGE_DICTS)}", param_hint="--set"
            )
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(stage.replace("-", "_"), {})[option] = value
    return out


def bootstrap_params(source, root, run, rounds, preset, quick, truth, sets, ray_address, working_dir, heldout=None,
                     evaluate=True, annotated=None, ablation=False):
    from pydantic import ValidationError

    from capfilt.errors import ConfigError
    from flows.params import BootstrapParams, describe_errors

    execution = {"mode": "cluster", "ray_address": ray_address, "working_dir": working_dir} if ray_address else {}
    try:
        return BootstrapParams(source=source, root=root, run=run, rounds=rounds, preset=preset, quick=quick,
                               truth=truth, heldout=heldout, evaluate=evaluate, annotated=annotated, ablation=ablation,
                               execution=execution, **parse_sets(sets))
    except ValidationError as exc:
        raise ConfigError(f"bootstrap parameters: {describe_errors(exc)}") from exc


@click.command()
@click.option("--source", required=True, help="LAION-style source: Parquet/CSV/JSONL file or folder (local or fsspec URI).")
@root_option("Data root for runs and models.")
@click.option("--run", default="bootstrap", show_default=True, help="Prefix of the rounds' run ids (<run>-r0, <run>-r1, ...).")
@click.option("--rounds", type=int, default=1, show_default=True, help="CapFilt rounds after round 0.")
@click.option("--preset", type=click.Choice(["toy", "blip2", "none"]), default="toy", show_default=True,
              help="toy: everything trained from scratch on the source (no downloads); blip2: the papers' models.")
@click.option("--quick", is_flag=True, help="Toy preset: fewer steps and captions.")
@click.option("--truth", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Ground-truth Parquet (synthetic worlds): also trains an oracle and evaluates every model.")
@click.option("--heldout", type=click.Path(exists=True, file_okay=False), default=None,
              help="A synthetic world folder no model trains on: the clean evaluation set.")
@click.option("--annotated", default=None,
              help="Clean annotated set (Parquet/JSONL: image_id, image|image_path|url, captions): rounds >= 1 "
                   "finetune the previous round's filter and captioner on it and keep every caption whose ITM "
                   "probability reaches the threshold calibrated on its held-out part (BLIP's CapFilt).")
@click.option("--eval/--no-eval", "evaluate", default=True, show_default=True, help="Evaluate every model (capfilt eval).")
@click.option("--ablation", is_flag=True,
              help="BLIP's Table 1: also train, with the same budget, a captioner-only arm (web + synthetic captions, "
                   "no filter) and a filter-only arm (web captions, filtered) from round 1's captions and scores; the "
                   "report compares raw, captioner, filter, capfilt and oracle.")
@click.option("--set", "sets", multiple=True, metavar="STAGE.OPTION=VALUE",
              help="Override one stage option of the preset, e.g. --set stage1.steps=500 --set filter.top-k=1.")
@click.option("--ray-address", default=None, help="Run every stage as a Ray job on this cluster (http://head:8265).")
@click.option("--working-dir", default=None, help="With --ray-address: runtime_env working_dir uploaded with each job.")
def bootstrap(source, root, run, rounds, preset, quick, truth, heldout, annotated, evaluate, ablation, sets, ray_address,
              working_dir):
    """Round 0 on the raw source, then CapFilt rounds with each round's own models (a Prefect flow)."""
    from flows.bootstrap import bootstrap as bootstrap_flow
    from flows.bootstrap import check
    from flows.server import ensure_prefect_api

    params = bootstrap_params(source, root, run, rounds, preset, quick, truth, sets, ray_address, working_dir,
                              heldout, evaluate, annotated, ablation)
    check(params)  # every stage's options, before Prefect, Ray or any download starts
    ensure_prefect_api((lambda line: None) if is_quiet() else click.echo)
    summary = bootstrap_flow(params)
    click.echo(format_summary(summary))


def format_summary(summary: dict) -> str:
    lines = [f"models: {', '.join(f'{run} -> {path}' for run, path in summary['models'].items())}"]
    if summary.get("report"):
        lines.append(f"report: {summary['report']}")
    table = summary.get("table")
    if table:
        names = list(table[0])[1:]
        width = max(len(r["metric"]) for r in table)
        lines.append(f"{'metric':<{width}}  " + "  ".join(f"{n:>12}" for n in names))
        for row in table:
            cells = "  ".join(f"{'-' if row[n] is None else format(row[n], '.3f'):>12}" for n in names)
            lines.append(f"{row['metric']:<{width}}  {cells}")
    for label, figures in (summary.get("captioners") or {}).items():
        lines.append(f"{label} (the captioner that wrote its synthetic captions), held-out: " + ", ".join(
            f"{name} {'-' if value is None else format(value, '.3f')}" for name, value in figures.items()))
    return "\n".join(lines)
