"""`capfilt ingest`: download a LAION-style URL source into a run's image shards."""

from __future__ import annotations

import click

from capfilt.commands.options import root_option


@click.command()
@click.option("--source", help="Parquet/CSV/JSONL file or folder of them (local path or fsspec URI).")
@click.option("--from-run", help="Instead of --source: reuse this run's downloads (same --root; nothing is downloaded again).")
@root_option()
@click.option("--run", "run_id", required=True, help="Run id.")
@click.option("--shard-size", type=int, default=10_000, show_default=True, help="Source rows per shard.")
@click.option("--allow-private-addresses", is_flag=True, help="Fetch URLs whose host is private/loopback/link-local (off: such rows are rejected as private_address).")
@click.option("--image-size", type=int, default=256, show_default=True, help="Side of the stored images in pixels (img2dataset image_size).")
@click.option("--resize-mode", default="border", show_default=True, help="img2dataset resize_mode: no, border, keep_ratio, keep_ratio_largest, center_crop.")
@click.option("--resize-only-if-bigger", is_flag=True, help="img2dataset resize_only_if_bigger.")
@click.option("--encode-format", default="jpg", show_default=True, help="jpg, png or webp.")
@click.option("--encode-quality", type=int, default=95, show_default=True, help="JPEG/WebP quality, 0-100.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds per download.")
@click.option("--threads", type=int, default=64, show_default=True, help="Download threads per shard.")
@click.option("--retries", type=int, default=2, show_default=True,
              help="Passes, in this run, over rows that failed transiently (5xx, timeout, connection reset); 0: none.")
@click.option("--retry-backoff", type=float, default=1.0, show_default=True,
              help="Seconds before the first retry pass, doubled for each next one.")
@click.option("--retry-failed", is_flag=True, help="Re-queue rows that failed with retryable errors (timeouts, 5xx) as a new attempt.")
@click.option("--ignore-opt-out", is_flag=True, help="Do NOT honor X-Robots-Tag noai/noimageai/noindex/noimageindex.")
@click.option("--url-blocklist", type=click.Path(), help="File of URLs or host names to refuse (reason blocklisted).")
@click.option("--hash-blocklist", type=click.Path(), help="File of image sha256 digests to refuse (reason blocklisted).")
@click.option("--max-pixels", type=int, default=64_000_000, show_default=True, help="Refuse images with more pixels (decompression bombs).")
@click.option("--min-image-size", type=int, default=0, show_default=True,
              help="Refuse images whose shorter side has fewer pixels (before resizing).")
@click.option("--max-aspect-ratio", type=float, default=float("inf"), show_default=True,
              help="Refuse images whose longer side exceeds this many times the shorter side.")
@click.option("--url-col", default="URL", show_default=True, help="Source column holding the URL.")
@click.option("--caption-col", default="TEXT", show_default=True, help="Source column holding the caption.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def ingest_command(**options):
    """Download a URL source with img2dataset into <root>/runs/<run>/images, one Ray task per shard.

    Every source row ends in images/ or in rejected/ingest/ with a reason. Rerunning skips shards
    already done with the same settings. --from-run takes another run's downloads instead.
    """
    from flows.steps import make

    return make("ingest", options, where="").execute(say=click.echo)
