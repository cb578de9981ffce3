"""`capfilt export webdataset`: a run's curated pairs as WebDataset tars (open_clip, LAVIS)."""

from __future__ import annotations

import click

from capfilt.commands.options import root_option


@click.group()
def export():
    """Export a run's curated pairs to training formats."""


@export.command()
@root_option()
@click.option("--run", "run_id", required=True, help="Run id whose curated/ to export.")
@click.option("--out", required=True, help="Folder for the tars (local path or fsspec URI).")
@click.option("--shard-size", type=int, default=10_000, show_default=True, help="Samples per tar.")
@click.option("--prefix", default="curated", show_default=True, help="Tar names: <prefix>-000000.tar, ...")
@click.option("--overwrite", is_flag=True, help="Replace <prefix>-*.tar files already in --out.")
def webdataset(root, run_id, out, shard_size, prefix, overwrite):
    """Write <key>.jpg, <key>.txt (best caption) and <key>.json ({"caption": ..., "captions": [...]}) per curated image."""
    from pipeline import export as export_stage
    from pipeline.run_store import RunStore

    config = export_stage.ExportConfig(out=out, shard_size=shard_size, prefix=prefix, overwrite=overwrite)
    summary = export_stage.run(RunStore(root, run_id), config)
    click.echo(summary.line())
    return summary
