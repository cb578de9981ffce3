"""Ingest: turn a LAION-style URL source into `images/` shards with img2dataset, on Ray.

A source (one or many Parquet/CSV/JSONL files, local or any fsspec URI) is planned into shards
of `shard_size` rows. Each shard is one Ray task that runs img2dataset's `Downloader` on it and
commits the result through the run store: successful rows to `images/<shard>.parquet`, every
other row to `rejected/ingest/<shard>.parquet` with a reason. Shards done with the same config
are skipped on rerun, so a killed run resumes where it stopped.

Why Ray tasks around img2dataset's Downloader, and not img2dataset's own ray distributor: the
distributor writes img2dataset's shard layout and resumes by its own `_stats.json` files, while
capfilt needs each shard committed atomically through the run store (manifest, accounting,
rejected rows with reasons, one config hash). Calling the Downloader per shard inside a Ray task
keeps img2dataset's downloading, resizing, hashing and X-Robots-Tag handling as they are and
puts scheduling, resume and accounting in one place; the tasks spread over a Ray cluster the
same way.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import PurePosixPath

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

import pipeline.ray_env  # noqa: F401  (sets RAY_ENABLE_UV_RUN_RUNTIME_ENV before ray)
from capfilt.errors import CapfiltError, ConfigError
from capfilt.logs import is_quiet
from pipeline.run_store import RunStore, ShardCounts, config_hash
from pipeline.summary import StageSummary
from schemas import IMAGES, REJECTED, SOURCE, SourceColumns, to_canonical

STAGE = "ingest"
SOURCE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")
RETRYABLE_REASONS = ("timeout", "connection_error", "dns_error")  # and every http_5xx
# Reasons that are a decision about the row (dropped); every other reason is an error (failed).
DROP_REASONS = {
    "invalid_url",
    "private_address",
    "blocklisted",
    "opt_out",
    "too_many_pixels",
    "image_too_small",
    "aspect_ratio_too_large",
    "bad_caption",
    "duplicate_url",
}
# Longer "alt text" is a page or a payload, not a caption; it would only cost tokenizer time and
# Parquet space downstream (LAION's longest captions are a few KB).
MAX_CAPTION_BYTES = 65_536


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


def read_blocklist(path: str | None, option: str = "blocklist") -> tuple[str, ...]:
    """Lines of a blocklist file (URLs or host names; or sha256 hex digests), comments skipped."""
    if not path:
        return ()
    try:
        with fsspec.open(path, "r") as handle:
            lines = [line.strip() for line in handle]
    except FileNotFoundError as exc:
        raise ConfigError(f"{option}: blocklist file {path} does not exist; check the path.") from exc
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{option}: blocklist file {path} is not a text file of one entry per line ({exc}).") from exc
    return tuple(sorted({line for line in lines if line and not line.startswith("#")}))


# -- source planning ------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceFile:
    path: str  # fsspec path of the file
    name: str  # path relative to the source root, without suffix: the sample_id prefix
    rows: int


@dataclass(frozen=True)
class ShardSpec:
    shard: str
    file: SourceFile
    start: int
    stop: int
    attempt: int = 1
    rows: tuple[str, ...] | None = None  # sample_ids to redo, for --retry-failed shards
    # (sample_id, sample_id of the first row with the same URL) for rows of this shard whose URL
    # an earlier shard of the source already has: see mark_cross_shard_duplicates
    duplicate_of: tuple[tuple[str, str], ...] = ()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "part"


def list_source_files(source: str) -> list[tuple[fsspec.AbstractFileSystem, str, str]]:
    """(fs, path, name) of every source file under `source` (a file or a folder), sorted."""
    try:
        fs, root = fsspec.core.url_to_fs(source)
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"--source {source!r}: cannot open this location ({exc}).") from exc
    if not fs.exists(root):
        raise ConfigError(f"--source {source}: no such file or folder.")
    if fs.isdir(root):
        paths = sorted(
            p for p in fs.find(root)
            if p.endswith(SOURCE_SUFFIXES) and not PurePosixPath(p).name.startswith((".", "_"))
        )
        if not paths:
            raise ConfigError(
                f"--source {source}: the folder holds no {', '.join(SOURCE_SUFFIXES)} files."
            )
        names = [str(PurePosixPath(p).relative_to(root).with_suffix("")) for p in paths]
    else:
        if not root.endswith(SOURCE_SUFFIXES):
            raise ConfigError(f"--source {source}: expected a {', '.join(SOURCE_SUFFIXES)} file or a folder of them.")
        paths, names = [root], [PurePosixPath(root).stem]
    return [(fs, p, n) for p, n in zip(paths, names)]


def read_source_file(fs: fsspec.AbstractFileSystem, path: str, columns: SourceColumns, where: str) -> pa.Table:
    """One source file as a canonical `source` table (see schemas/source.py)."""
    try:
        with fs.open(path, "rb") as handle:
            if path.endswith(".parquet"):
                table = pq.read_table(handle)
            elif path.endswith(".csv"):
                table = pacsv.read_csv(handle)
            else:
                table = pajson.read_json(handle)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CapfiltError(f"{where}: cannot read this source file ({exc}). Fix or remove the file.") from exc
    return to_canonical(table, columns, where=where)


def plan_shards(source: str, shard_size: int, columns: SourceColumns) -> list[ShardSpec]:
    """Split every source file into shards of at most `shard_size` rows.

    Shard ids are '<file name>-<k>', so adding a file to a source adds shards without renaming
    the existing ones (which is what makes incremental runs possible).
    """
    specs = []
    for fs, path, name in list_source_files(source):
        if path.endswith(".parquet"):
            where = fs.unstrip_protocol(path)
            try:
                with fs.open(path, "rb") as handle:
                    parquet = pq.ParquetFile(handle)
                    rows, schema = parquet.metadata.num_rows, parquet.schema_arrow
                    # Column names and types are checked here, before any Ray task starts: on the
                    # footer's schema, and on the values of the (usually no) columns whose type
                    # differs from the canonical one, so 'wide' in WIDTH fails now, not as a shard.
                    to_canonical(schema.empty_table(), columns, where=where)
                    named = {getattr(columns, f.name): f.type for f in SOURCE.schema}
                    recast = [n for n, t in named.items() if n in schema.names and schema.field(n).type != t]
                    if recast:
                        values = parquet.read(columns=recast)
                        if columns.URL not in recast:
                            values = values.append_column(columns.URL, pa.nulls(values.num_rows, pa.string()))
                        to_canonical(values, columns, where=where)
            except (pa.ArrowInvalid, OSError) as exc:
                raise CapfiltError(f"{where}: not a readable Parquet file ({exc}). Fix or remove the file.") from exc
        else:
            rows = read_source_file(fs, path, columns, fs.unstrip_protocol(path)).num_rows
        file = SourceFile(path=fs.unstrip_protocol(path), name=name, rows=rows)
        for k, start in enumerate(range(0, rows, shard_size)):
            specs.append(ShardSpec(f"{_safe(name)}-{k:05d}", file, start, min(rows, start + shard_size)))
    return specs


def mark_cross_shard_duplicates(specs: list[ShardSpec], columns: SourceColumns) -> list[ShardSpec]:
    """`specs` with each shard's rows whose URL an earlier shard of the source already has.

    A shard finds its own repeated URLs; a URL repeated across shards (or files) of one source
    is only seen here, in the driver, before any download: the first row with the URL (in file
    and row order) stands for it, the later ones are dropped as duplicate_url naming that row.
    (Should the first row itself be refused for its caption, the URL is not downloaded: unlike
    within a shard, captions are not read here.) Only the URL column is read, and Arrow's hash
    grouping finds each URL's first row, so the driver's memory is about the URLs' bytes.
    """
    if len(specs) < 2:
        return specs
    files = list(dict.fromkeys(spec.file for spec in specs))
    urls, offset, base = [], 0, {}
    for file in files:
        fs, path = fsspec.core.url_to_fs(file.path)
        if path.endswith(".parquet"):
            with fs.open(path, "rb") as handle:
                column = pq.read_table(handle, columns=[columns.URL]).column(0).cast(pa.string())
        else:
            column = read_source_file(fs, path, columns, file.path).column("URL")
        urls.append(column)
        base[file] = offset
        offset += file.rows
    table = pa.table({"url": pa.chunked_array([c for u in urls for c in u.chunks], pa.string()),
                      "row": pa.array(np.arange(offset, dtype=np.int64))})
    table = table.filter(table.column("url").is_valid())
    first = table.group_by("url").aggregate([("row", "min")]).rename_columns(["url", "first"])
    repeated = table.join(first, "url")
    repeated = repeated.filter(pc.not_equal(repeated.column("row"), repeated.column("first")))
    if repeated.num_rows == 0:
        return specs
    starts = np.array([base[spec.file] + spec.start for spec in specs], dtype=np.int64)

    def locate(row: int) -> tuple[int, str]:
        k = int(np.searchsorted(starts, row, side="right")) - 1
        return k, f"{specs[k].file.name}/{row - base[specs[k].file]}"

    marks: dict[int, list[tuple[str, str]]] = {}
    for row, first_row in zip(repeated.column("row").to_pylist(), repeated.column("first").to_pylist()):
        (shard, sample_id), (first_shard, first_id) = locate(row), locate(first_row)
        if shard != first_shard:  # within a shard, download_shard finds it (after its own checks)
            marks.setdefault(shard, []).append((sample_id, first_id))
    return [replace(spec, duplicate_of=tuple(sorted(marks[k]))) if k in marks else spec
            for k, spec in enumerate(specs)]


def shard_rows(spec: ShardSpec, columns: SourceColumns) -> pa.Table:
    """The canonical source rows of a shard, with their sample_id ('<file name>/<row>')."""
    fs, path = fsspec.core.url_to_fs(spec.file.path)
    table = read_source_file(fs, path, columns, spec.file.path).slice(spec.start, spec.stop - spec.start)
    ids = pa.array([f"{spec.file.name}/{i}" for i in range(spec.start, spec.stop)], pa.string())
    table = table.append_column("sample_id", ids)
    if spec.rows is not None:
        wanted = set(spec.rows)
        mask = pa.array([sid in wanted for sid in ids.to_pylist()])
        table = table.filter(mask)
    return table


# -- checks before downloading --------------------------------------------------------------

def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
        or ip.is_reserved or ip.is_unspecified
        or (ip.version == 6 and ip.ipv4_mapped is not None and not _is_public(str(ip.ipv4_mapped)))
    )


class AddressPolicy:
    """Refuses URLs whose host is, or resolves to, a private, loopback or link-local address."""

    def __init__(self, allow_private: bool):
        self.allow_private = allow_private
        self._cache: dict[str, tuple[str, str] | None] = {}

    def check_host(self, host: str) -> tuple[str, str] | None:
        """None when the host may be fetched, else (reason, message)."""
        if self.allow_private:
            return None
        if host not in self._cache:
            try:
                infos = socket.getaddrinfo(host, None)
                addresses = sorted({info[4][0] for info in infos})
            except (socket.gaierror, UnicodeError) as exc:
                # Unresolvable hosts are left to the download, which reports them as errors.
                self._cache[host] = None if isinstance(exc, socket.gaierror) else ("invalid_url", str(exc))
                return self._cache[host]
            private = [a for a in addresses if not _is_public(a)]
            self._cache[host] = (
                ("private_address", f"host {host} resolves to non-public address(es) {private}; "
                 f"pass --allow-private-addresses to fetch such URLs")
                if private else None
            )
        return self._cache[host]


def precheck(url: str | None, policy: AddressPolicy, url_blocklist: frozenset[str]) -> tuple[str, str] | None:
    """None when the URL may be downloaded, else (reason, message)."""
    if not url or not url.strip():
        return "invalid_url", "empty URL"
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return "invalid_url", f"not an http(s) URL: {url[:200]}"
    host = parsed.hostname.lower()
    if url in url_blocklist or any(host == b or host.endswith("." + b) for b in url_blocklist if "/" not in b):
        return "blocklisted", "URL or host is on the URL blocklist"
    return policy.check_host(host)


class _NoPrivateRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to hosts the address policy allows (a public URL must not bounce
    the downloader into a private network)."""

    def __init__(self, policy: AddressPolicy):
        self.policy = policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        host = urllib.parse.urlsplit(newurl).hostname or ""
        verdict = self.policy.check_host(host.lower())
        if verdict is not None:
            raise urllib.error.HTTPError(newurl, code, f"redirect to private address: {verdict[1]}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


# -- img2dataset's error strings -> capfilt reasons -----------------------------------------

def classify_error(message: str) -> str:
    """A short, stable reason for an img2dataset error message."""
    text = (message or "").lower()
    if "x-robots-tag" in text:
        return "opt_out"
    if "redirect to private address" in text:
        return "private_address"
    if "infinite loop" in text or ("redirect" in text and "error" in text):
        return "redirect_loop"
    match = re.search(r"http error (\d{3})", text)
    if match:
        code = int(match.group(1))
        return f"http_{code}"
    if "timed out" in text or "timeout" in text:
        return "timeout"
    for marker, reason in (
        ("too many pixels", "too_many_pixels"),
        ("image area too large", "too_many_pixels"),
        ("truncated", "truncated_image"),
        ("html page", "html_page"),
        ("not an image", "not_an_image"),
        ("image decoding error", "not_an_image"),
        ("image too small", "image_too_small"),
        ("aspect ratio too large", "aspect_ratio_too_large"),
        ("name or service not known", "dns_error"),
        ("nodename nor servname", "dns_error"),
        ("temporary failure in name resolution", "dns_error"),
        ("connection refused", "connection_error"),
        ("connection reset", "connection_error"),
        ("remote end closed", "connection_error"),
        ("unknown url type", "invalid_url"),
    ):
        if marker in text:
            return reason
    return "download_error"


# What a user can do about a reason, shown when a run keeps nothing or loses most of its rows.
REASON_FIXES = {
    "private_address": "pass --allow-private-addresses to download from a local or private server",
    "invalid_url": "check that --url-col names the column holding http(s) URLs",
    "timeout": "raise --timeout, or rerun with --retry-failed when the server is back",
    "connection_error": "check that the server is up, then rerun with --retry-failed",
    "dns_error": "check the host names and this machine's network, then rerun with --retry-failed",
    "opt_out": "the servers opted out of AI use (X-Robots-Tag); capfilt honours it",
    "blocklisted": "the URLs, hosts or image hashes are on --url-blocklist / --hash-blocklist",
    "too_many_pixels": "raise --max-pixels if these images are wanted",
    "image_too_small": "lower --min-image-size",
    "aspect_ratio_too_large": "raise --max-aspect-ratio",
    "bad_caption": "fix the source's caption column: UTF-8 text without NUL bytes, at most 64 KiB",
    "duplicate_url": "nothing to do: the first row with each URL is downloaded (is the source listed twice?)",
}


def reason_fix(reason: str) -> str:
    if reason in REASON_FIXES:
        return REASON_FIXES[reason]
    if reason.startswith("http_5"):
        return "the server failed; rerun with --retry-failed when it is back"
    if reason.startswith("http_4"):
        return "the URLs are gone or refused; nothing to retry"
    return "see rejected/ingest/ for each row's error_message"


def is_retryable(reason: str) -> bool:
    return reason in RETRYABLE_REASONS or reason.startswith("http_5")


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


def caption_problems(column: pa.ChunkedArray) -> tuple[pa.Array, list[str | None]]:
    """(captions as valid UTF-8, per row None or why the caption is unusable).

    Read as bytes: Parquet does not guarantee its strings are UTF-8, and one bad caption must
    drop its row, not fail the shard. An unusable caption is kept in rejected/ shortened (a
    megabyte) or with U+FFFD for the bytes that are not UTF-8, so it can still be looked at.
    """
    texts, problems = [], []
    for value in column.cast(pa.binary()).to_pylist():
        problem = None
        if value is None:
            texts.append(None)
            problems.append(None)
            continue
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            text = value.decode("utf-8", errors="replace")
            problem = f"caption is not valid UTF-8 (byte {exc.start}: {value[exc.start:exc.start + 1]!r})"
        if len(value) > MAX_CAPTION_BYTES:
            problem = f"caption is {len(value):,} bytes, more than {MAX_CAPTION_BYTES:,} (kept here: its first 1,000 characters)"
            text = text[:1000]
        elif "\x00" in text:
            problem = f"caption holds {text.count(chr(0))} NUL byte(s)"
        texts.append(text)
        problems.append(problem)
    return pa.array(texts, pa.string()), problems


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
            urllib.request.install_opener(urllib.request.build_opener(_NoPrivateRedirects(policy)))
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


# -- the driver -----------------------------------------------------------------------------

@dataclass(frozen=True)
class IngestRequest:
    """What one ingest takes besides the run: a URL source downloaded with `config`, or another
    run whose downloads this run takes (`from_run`: nothing is downloaded again)."""

    source: str | None = None
    from_run: str | None = None
    config: IngestConfig = field(default_factory=IngestConfig)
    retry_failed: bool = False  # also download again the rows whose latest attempt failed transiently
    progress: bool = True

    def __post_init__(self):
        if bool(self.source) == bool(self.from_run):
            raise ConfigError("give either --source (download a URL source) or --from-run (reuse a run's downloads)")


@dataclass
class IngestSummary(StageSummary):  # rows: source rows; kept: images downloaded
    run_id: str = ""
    shards: int = 0  # planned (retry shards included); shards_skipped of them were already done
    images_per_s: float = 0.0
    failed_shards: list = field(default_factory=list)

    def problem(self, source: str) -> str | None:
        """What to tell a user whose run kept nothing (an error) or lost most of its rows (a warning)."""
        if self.rows_in == 0:
            return f"{source} has no rows: nothing to download (is it the right file or folder?)"
        if self.kept * 2 >= self.rows_in:
            return None
        lost = self.rows_in - self.kept
        top = sorted({**self.dropped, **self.failed}.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        causes = "; ".join(f"{n} of {self.rows_in} {reason}: {reason_fix(reason)}" for reason, n in top)
        return f"{'nothing' if self.kept == 0 else f'only {self.kept}'} of {self.rows_in} rows kept ({lost} lost): {causes}"

    def line(self) -> str:
        return (f"ingest {self.run_id}: {self.counts()}; {self.shards} shards ({self.shards_skipped} already "
                f"done, skipped); {self.images_per_s:.1f} images/s")


def _retry_specs(store: RunStore, specs: list[ShardSpec]) -> list[ShardSpec]:
    """One retry shard per shard whose latest attempt left rows with retryable errors."""
    final = final_rejected(store)
    by_shard: dict[str, list[str]] = {}
    attempts: dict[str, int] = {}
    for row in final.to_pylist():
        if is_retryable(row["reason"]):
            origin = row["shard"].split(".retry", 1)[0]
            by_shard.setdefault(origin, []).append(row["sample_id"])
            attempts[origin] = max(attempts.get(origin, 1), row["attempt"] or 1)
    out = []
    for spec in specs:
        if spec.shard in by_shard:
            attempt = attempts[spec.shard] + 1
            out.append(ShardSpec(f"{spec.shard}.retry{attempt}", spec.file, spec.start, spec.stop,
                                 attempt=attempt, rows=tuple(sorted(by_shard[spec.shard]))))
    return out


def final_rejected(store: RunStore) -> pa.Table:
    """Rejected ingest rows whose row was not retried later (a row's latest attempt decides)."""
    rejected = store.read_rejected(STAGE)
    if rejected.num_rows == 0:
        return rejected
    rows = rejected.to_pylist()
    latest: dict[str, int] = {}
    for r in rows:
        latest[r["sample_id"]] = max(latest.get(r["sample_id"], 0), r["attempt"] or 1)
    kept_later = set()
    for shard in store.shards("images"):
        if ".retry" in shard:
            kept_later.update(store.read_shard("images", shard).column("sample_id").to_pylist())
    return REJECTED.from_pylist([
        r for r in rows if (r["attempt"] or 1) == latest[r["sample_id"]] and r["sample_id"] not in kept_later
    ])


def run(store: RunStore, request: IngestRequest) -> IngestSummary:
    """Ingest into a run: a source's pending shards downloaded as Ray tasks, or another run's
    downloads taken (`request.from_run`); report/ingest_stats.json written."""
    if request.from_run:
        return reuse(store, request.from_run)
    return download(store, request.source, request.config, request.retry_failed, request.progress)


def download(store: RunStore, source: str, config: IngestConfig, retry_failed: bool = False,
             progress: bool = True) -> IngestSummary:
    """Ingest a source into a run: plan shards, download the pending ones as Ray tasks, report."""
    import ray
    from tqdm import tqdm

    from pipeline.ray_env import ensure_ray

    root, run_id = store.root, store.run_id
    specs = plan_shards(source, config.shard_size, config.columns)
    if not specs and not store.records(STAGE):  # refused before the run folder exists
        raise CapfiltError(f"ingest {run_id}: {IngestSummary(run_id=run_id).problem(source)}")
    cfg_hash = config_hash(config)
    if retry_failed:
        specs_to_run = [s for s in _retry_specs(store, specs) if not store.is_done(STAGE, s.shard, cfg_hash)]
        all_specs = specs + specs_to_run
    else:
        specs_to_run = [s for s in specs if not store.is_done(STAGE, s.shard, cfg_hash)]
        if specs_to_run:  # the source's URLs are read only when there is something to download
            marked = {s.shard: s for s in mark_cross_shard_duplicates(specs, config.columns)}
            specs_to_run = [marked[s.shard] for s in specs_to_run]
        all_specs = specs
    summary = IngestSummary(run_id=run_id, shards=len(all_specs), shards_skipped=len(all_specs) - len(specs_to_run))
    started = time.time()
    if specs_to_run:
        ensure_ray()
        started = time.time()  # images/s measures downloading, not Ray's start-up
        task = ray.remote(run_shard).options(
            num_cpus=1,
            # Retried only on system failures (a node or worker lost): a shard commit is atomic
            # and idempotent, so redoing it elsewhere is safe. Errors in the shard itself are
            # not retried here; they are reported and the rerun redoes the shard.
            max_retries=3,
            runtime_env={"env_vars": {"OPENCV_IO_MAX_IMAGE_PIXELS": str(config.max_pixels)}},
        )
        pending = {task.remote(root, run_id, spec, config, cfg_hash): spec for spec in specs_to_run}
        # disable=None: no bar when stderr is not a terminal (a log file gets the summary line)
        bar = tqdm(total=len(pending), desc=f"ingest {run_id}", unit="shard", disable=None if progress and not is_quiet() else True)
        kept_now = 0
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(done[0])
            try:
                kept_now += ray.get(done[0])["kept"]
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, Exception) else exc
                summary.failed_shards.append(f"{spec.shard}: {type(cause).__name__}: {cause}")
            bar.update(1)
            bar.set_postfix(images=kept_now, per_s=f"{kept_now / max(time.time() - started, 1e-9):.1f}")
        bar.close()
    summary.seconds = time.time() - started
    _summarize(store, summary, [s.shard for s in all_specs])
    summary.images_per_s = (
        sum(r.kept or 0 for r in store.records(STAGE) if r.shard in {s.shard for s in specs_to_run})
        / max(summary.seconds, 1e-9)
        if specs_to_run else 0.0
    )
    write_report(store, summary)
    if summary.failed_shards:
        raise CapfiltError(
            f"ingest {run_id}: {len(summary.failed_shards)} shard(s) failed: "
            + "; ".join(summary.failed_shards[:3])
            + ". Fix the cause and rerun the same command: finished shards are skipped."
        )
    return summary


def reuse(store: RunStore, from_run: str) -> IngestSummary:
    """Ingest by reusing another run's downloads: nothing is downloaded twice.

    A bootstrap round k >= 1 curates round 0's images again; every finished ingest shard of
    `from_run` (its images, its rejected rows and their counts) becomes this run's own, linked
    rather than copied on a local disk. Rerunning skips shards already taken with the same
    source shard; a shard `from_run` redid since is taken again.
    """
    root, run_id = store.root, store.run_id
    source = RunStore(root, from_run)
    done = [r for r in source.records(STAGE) if r.status == "done"]
    if not done:
        raise ConfigError(f"--from-run {from_run}: run '{from_run}' under {root} has no finished ingest shards; "
                          f"ingest it first (capfilt ingest --source ... --run {from_run}).")
    unfinished = [r.shard for r in source.records(STAGE) if r.status != "done"]
    if unfinished:
        raise ConfigError(f"--from-run {from_run}: ingest shard(s) {', '.join(unfinished[:3])} of run '{from_run}' "
                          "did not finish; rerun its ingest first so every source row is accounted for.")
    started = time.time()
    summary = IngestSummary(run_id=run_id, shards=len(done))
    for record in done:
        cfg_hash = config_hash({"from_run": from_run, "shard_config": record.config_hash})
        if store.is_done(STAGE, record.shard, cfg_hash):
            summary.shards_skipped += 1
            continue
        store.adopt_shard(source, STAGE, record.shard, ("images",), cfg_hash, extra={"images_from": from_run})
    summary.seconds = time.time() - started
    _summarize(store, summary, [r.shard for r in done])
    write_report(store, summary)
    return summary


def _summarize(store: RunStore, summary: IngestSummary, shards: list[str]) -> None:
    """Totals over the run's final outcomes (a retried row counts once, by its latest attempt)."""
    records = {r.shard: r for r in store.records(STAGE)}
    originals = [s for s in shards if ".retry" not in s]
    summary.rows_in = sum(records[s].rows_in or 0 for s in originals if s in records)
    summary.kept = sum(records[s].kept or 0 for s in shards if s in records)
    summary.shards_done = len(shards) - summary.shards_skipped
    final = final_rejected(store)
    summary.dropped, summary.failed = {}, {}
    summary.tally(zip(final.column("outcome").to_pylist(), final.column("reason").to_pylist()) if final.num_rows else ())


def write_report(store: RunStore, summary: IngestSummary) -> None:
    """report/ingest_stats.json: per-shard and total stats (success rate, errors, images/s)."""
    per_shard = []
    for record in store.records(STAGE):
        stats = (record.extra or {}).get("stats", {})
        per_shard.append({
            "shard": record.shard, "status": record.status, "attempt": record.attempt,
            "rows_in": record.rows_in, "kept": record.kept, "rejected": record.rejected,
            "failed": record.failed, "duration_s": record.duration_s,
            "images_per_s": stats.get("images_per_s"), "reasons": stats.get("reasons", {}),
            "error": record.error,
        })
    total = asdict(summary)
    total["success_rate"] = summary.kept / summary.rows_in if summary.rows_in else 0.0
    path = f"{store.report_dir()}/ingest_stats.json"
    with store.fs.open(path, "w") as handle:
        json.dump({"total": total, "shards": per_shard}, handle, indent=1, sort_keys=True)


__all__ = [
    "IngestConfig",
    "IngestRequest",
    "IngestSummary",
    "ShardSpec",
    "classify_error",
    "download_shard",
    "final_rejected",
    "plan_shards",
    "read_blocklist",
    "run",
]
