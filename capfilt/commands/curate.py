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
@filter_options
def curate(source, root, run_id, shard_size, allow_private_addresses, image_size, timeout, captioner, num_captions,
           top_p, prompt, seed, **filter_opts):
    """Curate a source into <root>/runs/<run>/curated: every stage's options are checked before any
    work, and every stage skips shards it already finished (rerunning resumes)."""
    from flows.jobs import run_embedded, validate_stage_args
    from flows.params import options_to_argv

    common = ["--root", root, "--run", run_id]
    stages = {
        "ingest": ["--source", source, *common, "--no-progress", *options_to_argv({
            "shard-size": shard_size, "allow-private-addresses": allow_private_addresses,
            "image-size": image_size, "timeout": timeout})],
        "caption": [*common, *options_to_argv({"captioner": captioner, "num-captions": num_captions,
                                               "top-p": top_p, "prompt": prompt or None, "seed": seed})],
        "filter": [*common, *options_to_argv(filter_opts)],
    }
    for stage, argv in stages.items():
        validate_stage_args(stage, argv)
    return {stage: run_embedded(stage, argv) for stage, argv in stages.items()}
