"""Ingest's download: its settings (`IngestConfig`, whose hash decides whether a shard is redone) and
the per-shard job: one shard's rows through img2dataset's Downloader, every row ending in images/
or rejected/ingest/ with a reason, committed through the run store (the body of a Ray task).

Rows refused by the policy (pipeline/ingest_policy.py) or repeating an earlier row's URL are not
downloaded; the rest go to img2dataset in a temporary folder, behind a resizer that reads each
image's header first (too many pixels, HTML pages, truncated files), and rows that failed
transiently are downloaded again after a backoff. Results are put back in the shard's row order.
"""

from __future__ import annotations

import os
import tempfile
import time
import urllib.request
import warnings
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.errors import ConfigError
from pipeline.ingest_policy import (DROP_REASONS, AddressPolicy, NoPrivateRedirects, caption_problems, classify_error,
                                    is_retryable, precheck)
from pipeline.ingest_source import ShardSpec, shard_rows
from pipeline.run_store import RunStore, ShardCounts
from schemas import IMAGES, REJECTED, SourceColumns

STAGE = "ingest"


@dataclass(frozen=True)
class IngestConfig:
    """Everything that decides what ingest writes; its hash decides whether a shard is redone."""

    shard_size: int = 10_000
    image_size: int = 256
    resize_mode: str = "border"
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    encode_quality: int = 95
    timeout: float = 10.0
    threads: int = 64
    retries: int = 2  # passes over the rows that failed transiently (5xx, timeout, connection), in this run
    retry_backoff: float = 1.0  # seconds before the first retry pass, doubled for each next one
    respect_opt_out: bool = True
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    user_agent_token: str = "capfilt"
    allow_private_addresses: bool = False
    max_pixels: int = 64_000_000
    min_image_size: int = 0
    max_aspect_ratio: float = float("inf")
    url_blocklist: tuple[str, ...] = ()
    hash_blocklist: tuple[str, ...] = ()
    columns: SourceColumns = field(default_factory=SourceColumns)

    def __post_init__(self):
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size must be >= 1, got {self.shard_size}.")
        if self.image_size < 8:
            raise ConfigError(f"--image-size must be >= 8, got {self.image_size}.")
        if self.resize_mode not in ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"):
            raise ConfigError(
                f"--resize-mode {self.resize_mode!r} is not one of no, border, keep_ratio, "
                f"keep_ratio_largest, center_crop."
            )
        if self.encode_format not in ("jpg", "png", "webp"):
            raise ConfigError(f"--encode-format {self.encode_format!r} is not one of jpg, png, webp.")
        if self.timeout <= 0 or self.threads < 1 or self.retries < 0 or self.retry_backoff < 0:
            raise ConfigError("--timeout must be > 0, --threads >= 1, --retries >= 0 and --retry-backoff >= 0.")
        if self.max_pixels < 1:
            raise ConfigError(f"--max-pixels must be >= 1, got {self.max_pixels}.")


# -- the per-shard job -------------------------------------------------------------------------

def _guarded_resizer(config: IngestConfig):
    """img2dataset's Resizer behind a check that reads the image header before any decoding.

    Refuses images over `max_pixels` (decompression bombs), non-image bodies (HTML pages, junk)
    and truncated files, with messages `classify_error` maps to reasons. OpenCV, which does the
    real decoding, is also capped through OPENCV_IO_MAX_IMAGE_PIXELS (set on the task).
    """
    from img2dataset.resizer import Resizer
    from PIL import Image

    class GuardedResizer(Resizer):
        def __call__(self, img_stream, blurring_bbox_list=None):
            img_stream.seek(0)
            head = img_stream.read(512)
            img_stream.seek(0)
            stripped = head.lstrip().lower()
            if stripped.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
                return None, None, None, None, None, "html page instead of an image"
            try:
                with warnings.catch_warnings():
                    # PIL warns past MAX_IMAGE_PIXELS; the size check below turns that into a reason.
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    probe = Image.open(img_stream)
                with probe:
                    width, height = probe.size
                    if width * height > config.max_pixels:
                        return None, None, None, None, None, (
                            f"too many pixels: {width}x{height} > --max-pixels {config.max_pixels}"
                        )
                    if probe.format == "JPEG":
                        probe.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                    probe.load()  # a cheap full read that notices truncated files
            except Image.DecompressionBombError as exc:
                return None, None, None, None, None, f"too many pixels: {exc}"
            except Image.UnidentifiedImageError:
                return None, None, None, None, None, "not an image (unrecognised format)"
            except OSError as exc:
                if "truncated" in str(exc).lower():
                    return None, None, None, None, None, f"truncated image: {exc}"
                return None, None, None, None, None, f"not an image: {exc}"
            finally:
                img_stream.seek(0)
            return super().__call__(img_stream, blurring_bbox_list)

    Image.MAX_IMAGE_PIXELS = max(config.max_pixels, 1)
    return GuardedResizer(
        image_size=config.image_size,
        resize_mode=config.resize_mode,
        resize_only_if_bigger=config.resize_only_if_bigger,
        upscale_interpolation="lanczos",
        downscale_interpolation="area",
        encode_quality=config.encode_quality,
        encode_format=config.encode_format,
        skip_reencode=False,
        disable_all_reencoding=False,
        min_image_size=config.min_image_size,
        max_image_area=float(config.max_pixels),
        max_aspect_ratio=config.max_aspect_ratio,
        blurrer=None,
    )


def _rejected_row(spec: ShardSpec, row: dict, reason: str, message: str, duplicate_of: str | None = None) -> dict:
    return {
        "stage": STAGE,
        "shard": spec.shard,
        "sample_id": row["sample_id"],
        "caption_id": None,
        "url": row.get("URL") if "URL" in row else row.get("url"),
        "caption": row.get("TEXT") if "TEXT" in row else row.get("caption"),
        "outcome": "dropped" if reason in DROP_REASONS else "failed",
        "reason": reason,
        "error_message": message,
        "duplicate_of": duplicate_of,
        "attempt": spec.attempt,
    }


def download_shard(spec: ShardSpec, config: IngestConfig) -> tuple[pa.Table, pa.Table, dict]:
    """Download one shard with img2dataset. Pure of the run store: returns (images, rejected, stats).

    Every source row of the shard is in exactly one of the two tables.
    """
    started = time.time()
    rows = shard_rows(spec, config.columns)
    captions, problems = caption_problems(rows.column("TEXT"))
    rows = rows.set_column(rows.schema.get_field_index("TEXT"), "TEXT", captions)
    policy = AddressPolicy(config.allow_private_addresses)
    url_blocklist = frozenset(config.url_blocklist)
    rejected: list[dict] = []
    to_fetch: list[dict] = []
    first_with_url: dict[str, str] = {}  # a URL repeated within the shard is downloaded once
    earlier_shard = dict(spec.duplicate_of)  # ... and so is one an earlier shard has
    for row, problem in zip(rows.to_pylist(), problems):
        verdict = precheck(row["URL"], policy, url_blocklist)
        if verdict is None and problem:
            verdict = ("bad_caption", problem)
        if verdict is None and row["sample_id"] in earlier_shard:
            first = earlier_shard[row["sample_id"]]
            rejected.append(_rejected_row(spec, row, "duplicate_url", f"the same URL as {first}, an earlier row "
                                          f"of the source in another shard", duplicate_of=first))
        elif verdict is None and row["URL"] in first_with_url:
            rejected.append(_rejected_row(spec, row, "duplicate_url", "the same URL as an earlier row of the shard",
                                          duplicate_of=first_with_url[row["URL"]]))
        elif verdict is None:
            first_with_url[row["URL"]] = row["sample_id"]
            to_fetch.append(row)
        else:
            rejected.append(_rejected_row(spec, row, *verdict))

    images: list[dict] = []
    if to_fetch:
        # Rows that failed transiently are downloaded again in the same run, after a backoff
        # (1 s, 2 s, ... by default): a flaky server's 503 or reset does not cost the row.
        results: dict[str, dict] = {}
        pending = to_fetch
        for attempt in range(config.retries + 1):
            if attempt:
                time.sleep(config.retry_backoff * 2 ** (attempt - 1))
            for out in _img2dataset(pending, config, policy, rows.schema):
                results[out["sample_id"]] = out
            pending = [row for row in pending if _transient(results.get(row["sample_id"]))]
            if not pending:
                break
        # In the shard's row order, not the order downloads finished: images/ (and so captions/
        # and the batches scores are computed in) must not depend on which server answered first.
        row_of = {row["sample_id"]: i for i, row in enumerate(to_fetch)}
        result = sorted(results.values(), key=lambda out: row_of.get(out["sample_id"], len(row_of)))
        seen = set()
        hash_blocklist = frozenset(config.hash_blocklist)
        for out in result:
            seen.add(out["sample_id"])
            row = {"sample_id": out["sample_id"], "URL": out["url"], "TEXT": out["caption"]}
            if out["status"] != "success":
                message = out["error_message"] or out["status"] or "unknown error"
                rejected.append(_rejected_row(spec, row, classify_error(message), message))
            elif out["sha256"] in hash_blocklist:
                rejected.append(_rejected_row(spec, row, "blocklisted", f"image sha256 {out['sha256']} is on the hash blocklist"))
            else:
                images.append({
                    "sample_id": out["sample_id"], "key": out["key"], "url": out["url"],
                    "caption": out["caption"], "image": out[config.encode_format],
                    "image_format": config.encode_format, "width": out["width"], "height": out["height"],
                    "original_width": out["original_width"], "original_height": out["original_height"],
                    "sha256": out["sha256"], "exif": out.get("exif"), "similarity": out["similarity"],
                    "punsafe": out["punsafe"], "pwatermark": out["pwatermark"], "license": out["LICENSE"],
                })
        # img2dataset logs and skips a sample whose post-processing raised; never lose it silently.
        for row in to_fetch:
            if row["sample_id"] not in seen:
                rejected.append(_rejected_row(spec, row, "internal_error", "img2dataset wrote no result for this row (see the task log)"))

    reasons = Counter(r["reason"] for r in rejected)
    stats = {
        "shard": spec.shard,
        "attempt": spec.attempt,
        "rows_in": rows.num_rows,
        "kept": len(images),
        "rejected": sum(1 for r in rejected if r["outcome"] == "dropped"),
        "failed": sum(1 for r in rejected if r["outcome"] == "failed"),
        "reasons": dict(sorted(reasons.items())),
        "seconds": time.time() - started,
    }
    stats["images_per_s"] = stats["kept"] / max(stats["seconds"], 1e-9)
    return IMAGES.from_pylist(images), REJECTED.from_pylist(rejected), stats


def _transient(out: dict | None) -> bool:
    """A result worth another try: a retryable failure (not a refusal, a 404 or a decision)."""
    if out is None or out["status"] == "success":
        return False
    return is_retryable(classify_error(out["error_message"] or out["status"] or ""))


def _img2dataset(to_fetch: list[dict], config: IngestConfig, policy, schema: pa.Schema) -> list[dict]:
    """img2dataset's Downloader on these rows (one shard, in a temporary folder): its result rows."""
    from img2dataset.downloader import Downloader
    from img2dataset.writer import ParquetSampleWriter

    extras = ["sample_id", "similarity", "punsafe", "pwatermark", "LICENSE"]
    fetch = pa.table({
        "url": [r["URL"].strip() for r in to_fetch],
        "caption": [r["TEXT"] for r in to_fetch],
        **{name: pa.array([r[name] for r in to_fetch], schema.field(name).type) for name in extras},
    })
    with tempfile.TemporaryDirectory(prefix="capfilt-ingest-") as tmp:
        shard_file = os.path.join(tmp, "input.feather")
        with pa.OSFile(shard_file, "wb") as sink, pa.ipc.new_file(sink, fetch.schema) as writer:
            writer.write_table(fetch)
        out_dir = os.path.join(tmp, "out")
        os.makedirs(out_dir)
        downloader = Downloader(
            sample_writer_class=ParquetSampleWriter,
            resizer=_guarded_resizer(config),
            thread_count=min(config.threads, len(to_fetch)),
            save_caption=True,
            extract_exif=True,
            output_folder=out_dir,
            column_list=["url", "caption", *extras],
            timeout=config.timeout,
            number_sample_per_shard=max(len(to_fetch), 10),
            oom_shard_count=5,
            compute_hash="sha256",
            verify_hash_type=None,
            encode_format=config.encode_format,
            retries=0,  # retried here, after a backoff, and only when the failure is transient
            user_agent_token=config.user_agent_token,
            disallowed_header_directives=list(config.disallowed_header_directives) if config.respect_opt_out else None,
        )
        previous_opener = urllib.request._opener  # img2dataset calls urllib.request.urlopen
        if not config.allow_private_addresses:
            urllib.request.install_opener(urllib.request.build_opener(NoPrivateRedirects(policy)))
        try:
            downloader.download_shard((0, shard_file))
        finally:
            urllib.request._opener = previous_opener
        return pq.read_table(os.path.join(out_dir, "00000.parquet")).to_pylist()


def run_shard(root: str, run_id: str, spec: ShardSpec, config: IngestConfig, cfg_hash: str) -> dict:
    """Download one shard and commit it through the run store (the body of a Ray task)."""
    store = RunStore(root, run_id)
    store.start_shard(STAGE, spec.shard, cfg_hash)
    try:
        images, rejected, stats = download_shard(spec, config)
        counts = ShardCounts(rows_in=stats["rows_in"], kept=stats["kept"], rejected=stats["rejected"], failed=stats["failed"])
        store.commit_shard(STAGE, spec.shard, cfg_hash, outputs={"images": (IMAGES, images)}, counts=counts,
                           rejected=rejected, extra={"stats": stats, "attempt": spec.attempt})
    except Exception as exc:
        store.fail_shard(STAGE, spec.shard, cfg_hash, f"{type(exc).__name__}: {exc}")
        raise
    return stats
