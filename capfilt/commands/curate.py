"""`capfilt curate`: ingest, caption and filter (score, dedup, select) a source in one go."""

from __future__ import annotations

import click

from capfilt.commands.filter import filter_options
from capfilt.commands.options import root_option


@click.command()
@click.option("--source", required=True, help="LAION-style Parquet/CSV/JSONL file or folder (local path or fsspec URI).")
@root_option()
@click.option("--run", "run_id", required=True, help="Run id.")
@click.option("--shard-size", type=int, default=10_000, show_default=True, help="ingest: source rows per shard.")
@click.option("--allow-private-addresses", is_flag=True, help="ingest: fetch private/loopback hosts (needed for a synthetic world on 127.0.0.1).")
@click.option("--image-size", type=int, default=256, show_default=True, help="ingest: side of the stored images in pixels (img2dataset image_size).")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="ingest: seconds per download.")
@click.option("--captioner", required=True, help="caption: hub id or save_pretrained folder.")
@click.option("--num-captions", type=int, default=4, show_default=True, help="caption: synthetic captions per image.")
@click.option("--top-p", type=float, default=0.9, show_default=True, help="caption: nucleus sampling mass.")
@click.option("--prompt", default="", help="caption: text the captions continue, e.g. 'a photo of'.")
@click.option("--seed", type=int, default=0, show_default=True, help="caption: same seed, same captions.")
@click.option("--annotated", default=None,
              help="Clean annotated set (Parquet/JSONL: image_id, image|image_path|url, captions): the --itm model's "
                   "threshold is calibrated on it (matched vs mismatched pairs, hard negatives included) to "
                   "--target-precision, and the filter keeps every caption whose ITM probability reaches it "
                   "(BLIP's filter, --policy calibrated).")
@filter_options
def curate(source, root, run_id, shard_size, allow_private_addresses, image_size, timeout, captioner, num_captions,
           top_p, prompt, seed, annotated, **filter_opts):
    """Curate a source into <root>/runs/<run>/curated: every stage's options are checked before any
    work, and every stage skips shards it already finished (rerunning resumes)."""
    from flows.steps import make

    where = {"root": root, "run": run_id}
    calibration = None
    if annotated:
        calibration = annotated_filter(click.get_current_context(), root, run_id, filter_opts)
    will_exist = (calibration,) if calibration else ()
    steps = {  # every stage's typed config, checked before any work
        "ingest": make("ingest", {"source": source, **where, "progress": False, "shard_size": shard_size,
                                  "allow_private_addresses": allow_private_addresses, "image_size": image_size,
                                  "timeout": timeout}),
        "caption": make("caption", {**where, "captioner": captioner, "num_captions": num_captions, "top_p": top_p,
                                    "prompt": prompt, "seed": seed, "executor": filter_opts["executor"]}),
        "filter": make("filter", {**filter_opts, **where}, will_exist),
    }
    if annotated:  # before any download: a set that cannot reach the precision fails here
        from pipeline.calibrate import DEFAULT_MATCH_PRIOR, DEFAULT_TARGET_PRECISION, calibrate_on_annotated

        found = calibrate_on_annotated(filter_opts["itm"], annotated, calibration,
                                       filter_opts["target_precision"] or DEFAULT_TARGET_PRECISION,
                                       filter_opts["match_prior"] or DEFAULT_MATCH_PRIOR, seed)
        click.echo(f"calibrated {filter_opts['itm']} on {annotated}: ITM threshold {found.threshold:.4f} for precision "
                   f"{found.target_precision} (predicted {found.predicted_precision:.3f}, recall "
                   f"{found.predicted_recall:.3f}); curve in {calibration}")
    return {stage: step.execute(say=click.echo) for stage, step in steps.items()}


def annotated_filter(ctx: click.Context, root: str, run_id: str, filter_opts: dict) -> str:
    """With --annotated the filter is BLIP's: --policy calibrated with the calibration this
    command writes to <root>/runs/<run>/calibration.json. Returns that path."""
    import os

    if not filter_opts.get("itm"):
        raise click.UsageError("--annotated calibrates an ITM model's threshold: give --itm (hub id or folder).")
    if "://" in root:
        raise click.UsageError("--annotated needs a local --root (the calibration is a local file); calibrate with "
                               "`capfilt finetune filter` and pass --calibration instead.")
    policies = [p.strip() for p in filter_opts["policy"].split(",") if p.strip()]
    from pipeline.select import CALIBRATED

    if not CALIBRATED & set(policies):
        if ctx.get_parameter_source("policy") != click.core.ParameterSource.DEFAULT:
            raise click.UsageError(f"--annotated calibrates the ITM threshold, but --policy {filter_opts['policy']} does "
                                   "not use it: add calibrated (e.g. --policy calibrated).")
        filter_opts["policy"] = "calibrated"
    if filter_opts.get("calibration"):
        raise click.UsageError("give either --annotated (calibrate here) or --calibration (an existing one), not both.")
    filter_opts["calibration"] = os.path.join(root, "runs", run_id, "calibration.json")
    return filter_opts["calibration"]
