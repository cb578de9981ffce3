"""`capfilt ingest`: download a LAION-style URL source into a run's image shards."""

from __future__ import annotations

import click

from pipeline.ingest import IngestConfig, ingest, read_blocklist
from schemas import SourceColumns


@click.command()
@click.option("--source", required=True, help="Parquet/CSV/JSONL file or folder of them (local path or fsspec URI).")
@click.option("--root", required=True, help="Data root (local path or fsspec URI).")
@click.option("--run", "run_id", required=True, help="Run id.")
@click.option("--shard-size", type=int, default=10_000, show_default=True, help="Source rows per shard.")
@click.option("--allow-private-addresses", is_flag=True, help="Fetch URLs whose host is private/loopback/link-local (off: such rows are rejected as private_address).")
@click.option("--image-size", type=int, default=256, show_default=True, help="img2dataset image_size.")
@click.option("--resize-mode", default="border", show_default=True, help="img2dataset resize_mode: no, border, keep_ratio, keep_ratio_largest, center_crop.")
@click.option("--resize-only-if-bigger", is_flag=True, help="img2dataset resize_only_if_bigger.")
@click.option("--encode-format", default="jpg", show_default=True, help="jpg, png or webp.")
@click.option("--encode-quality", type=int, default=95, show_default=True)
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds per download.")
@click.option("--threads", type=int, default=64, show_default=True, help="Download threads per shard.")
@click.option("--retries", type=int, default=0, show_default=True, help="Immediate retries per URL (img2dataset).")
@click.option("--retry-failed", is_flag=True, help="Re-queue rows that failed with retryable errors (timeouts, 5xx) as a new attempt.")
@click.option("--ignore-opt-out", is_flag=True, help="Do NOT honor X-Robots-Tag noai/noimageai/noindex/noimageindex.")
@click.option("--url-blocklist", type=click.Path(), help="File of URLs or host names to refuse (reason blocklisted).")
@click.option("--hash-blocklist", type=click.Path(), help="File of image sha256 digests to refuse (reason blocklisted).")
@click.option("--max-pixels", type=int, default=64_000_000, show_default=True, help="Refuse images with more pixels (decompression bombs).")
@click.option("--min-image-size", type=int, default=0, show_default=True)
@click.option("--max-aspect-ratio", type=float, default=float("inf"))
@click.option("--url-col", default="URL", show_default=True, help="Source column holding the URL.")
@click.option("--caption-col", default="TEXT", show_default=True, help="Source column holding the caption.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def ingest_command(source, root, run_id, shard_size, allow_private_addresses, image_size, resize_mode,
                   resize_only_if_bigger, encode_format, encode_quality, timeout, threads, retries,
                   retry_failed, ignore_opt_out, url_blocklist, hash_blocklist, max_pixels, min_image_size,
                   max_aspect_ratio, url_col, caption_col, no_progress):
    """Download a URL source with img2dataset into <root>/runs/<run>/images, one Ray task per shard.

    Every source row ends in images/ or in rejected/ingest/ with a reason. Rerunning skips shards
    already done with the same settings.
    """
    config = IngestConfig(
        shard_size=shard_size, image_size=image_size, resize_mode=resize_mode,
        resize_only_if_bigger=resize_only_if_bigger, encode_format=encode_format,
        encode_quality=encode_quality, timeout=timeout, threads=threads, retries=retries,
        respect_opt_out=not ignore_opt_out, allow_private_addresses=allow_private_addresses,
        max_pixels=max_pixels, min_image_size=min_image_size, max_aspect_ratio=max_aspect_ratio,
        url_blocklist=read_blocklist(url_blocklist), hash_blocklist=read_blocklist(hash_blocklist),
        columns=SourceColumns(URL=url_col, TEXT=caption_col),
    )
    summary = ingest(source, root, run_id, config, retry_failed=retry_failed, progress=not no_progress)
    click.echo(summary.line())
    return summary
