"""Export a run's curated images as WebDataset tars that open_clip and LAVIS training read.

    curated_images/<shard>.parquet (in shard order) ──► <out>/<prefix>-000000.tar, -000001.tar, ...

Each curated image is one sample of three members sharing a key: `<key>.jpg` (the image),
`<key>.txt` (its best kept caption; open_clip's webdataset loader renames `jpg;png;jpeg;webp` to
image and `txt` to text, one text per sample) and `<key>.json` (`{"caption": <best>,
"captions": [every kept caption, best first], ...}` plus where the image came from and its
licence; LAVIS's LaionDataset reads `to_tuple("jpg", "json")` and `json["caption"]`, BLIP-style
loaders pick from `captions`). The image is stored once however many captions it kept. Keys are
the sample's position in the export, zero-padded as img2dataset numbers its samples, not ids:
webdataset cuts a member name at its first dot and treats '/' as a folder, both of which ids may
contain; the json keeps the ids.

JPEG bytes are copied unchanged (no second lossy encode); any other format is decoded and
re-encoded as JPEG, because `.jpg` is the one image extension every trainer's loader asks for.
Tars are written with the standard library's tarfile under a hidden temporary name and renamed,
so a tar that exists is complete; member mtimes are fixed so the same run exports the same bytes.
Images are read one record batch at a time, never a whole shard.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import fsspec

from capfilt.errors import ConfigError, SchemaError
from pipeline.run_store import RunStore
from pipeline.summary import StageSummary

JSON_FIELDS = ("sample_id", "caption_ids", "caption_sources", "url", "width", "height", "original_width",
               "original_height", "license", "punsafe", "pwatermark", "similarity", "sha256", "run_id")
BATCH_ROWS = 256  # images per record batch read: bounded memory whatever the shard size
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class ExportConfig:
    out: str  # folder (local path or fsspec URI) for the tars
    shard_size: int = 10_000  # samples per tar; open_clip's and img2dataset's usual size
    prefix: str = "curated"
    jpeg_quality: int = 95  # only for images that were not JPEG already
    overwrite: bool = False

    def __post_init__(self):
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size must be >= 1 (got {self.shard_size}).")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"--jpeg-quality must be in 1..100 (got {self.jpeg_quality}).")


@dataclass
class ExportSummary(StageSummary):  # rows: curated images; kept: samples written (one per image)
    out: str = ""
    tars: list[str] = field(default_factory=list)
    reencoded: int = 0

    def line(self) -> str:
        return (f"wrote {self.kept} sample(s) in {len(self.tars)} tar(s) to {self.out}"
                f" ({self.reencoded} image(s) re-encoded to JPEG)")


def as_jpeg(data: bytes, quality: int, where: str) -> tuple[bytes, bool]:
    """(JPEG bytes, whether they were re-encoded). JPEG input is returned as-is."""
    if data[:3] == _JPEG_MAGIC:
        return data, False
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                # JPEG has no alpha: composite on white, as a viewer shows a transparent image.
                rgba = img.convert("RGBA")
                rgb = Image.new("RGB", rgba.size, (255, 255, 255))
                rgb.paste(rgba, mask=rgba.getchannel("A"))
            else:
                rgb = img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder complaint names the row
        raise SchemaError(
            f"{where}: image bytes cannot be decoded ({type(exc).__name__}: {exc}); curated rows should only "
            f"hold images the score stage decoded. Re-run `capfilt filter` for this run."
        ) from exc
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), True


def curated_rows(store: RunStore) -> Iterator[tuple[str, dict]]:
    """(shard, row) for every curated image, shard by shard in shard order, one batch in memory."""
    from pipeline.curated import iter_batches

    columns = ["image", "captions", *JSON_FIELDS]
    for shard, batch in iter_batches(store, "curated_images", columns, BATCH_ROWS):
        for row in batch.to_pylist():
            yield shard, row


def sample_members(key: str, row: dict, quality: int, where: str) -> tuple[dict[str, bytes], bool]:
    image, reencoded = as_jpeg(row["image"]["bytes"], quality, where)
    captions = row["captions"]
    meta = {"caption": captions[0], "captions": captions, **{k: row[k] for k in JSON_FIELDS}}
    return {f"{key}.jpg": image, f"{key}.txt": captions[0].encode(),
            f"{key}.json": json.dumps(meta, ensure_ascii=False).encode()}, reencoded


def run(store: RunStore, config: ExportConfig) -> ExportSummary:
    """Write the run's curated pairs as tars of `config.shard_size` samples; returns what was written."""
    if not store.shards("curated_images"):
        raise ConfigError(f"run '{store.run_id}' under {store.root} has no curated/ shards (no curated_images/); "
                          f"run `capfilt filter` first.")
    fs, folder = fsspec.core.url_to_fs(config.out)
    folder = folder.rstrip("/")
    if fs.exists(folder) and not fs.isdir(folder):
        raise ConfigError(f"--out {config.out} is a file, not a folder; choose a folder for the tars.")
    created = not fs.exists(folder)
    fs.makedirs(folder, exist_ok=True)
    stale = sorted(p for p in fs.glob(f"{folder}/{config.prefix}-*.tar"))
    if stale and not config.overwrite:
        raise ConfigError(
            f"--out {config.out} already holds {len(stale)} {config.prefix}-*.tar file(s); choose an empty folder "
            f"or pass --overwrite to replace them."
        )
    for path in stale:
        fs.rm(path)

    started = time.time()
    summary = ExportSummary(out=config.out)
    shards_read: set[str] = set()
    writer: _TarWriter | None = None
    try:
        for shard, row in curated_rows(store):
            if summary.kept % config.shard_size == 0:
                if writer is not None:
                    summary.tars.append(writer.commit())
                writer = _TarWriter(fs, f"{folder}/{config.prefix}-{len(summary.tars):06d}.tar")
            where = f"curated_images/{shard}.parquet image {row['sample_id']}"
            members, reencoded = sample_members(f"{summary.kept:09d}", row, config.jpeg_quality, where)
            for name, data in members.items():
                writer.add(name, data)
            shards_read.add(shard)
            summary.rows_in += 1
            summary.kept += 1
            summary.reencoded += int(reencoded)
        if writer is not None:
            summary.tars.append(writer.commit())
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        if created and not fs.ls(folder):  # no empty --out left behind to look like an export
            fs.rmdir(folder)
        raise
    summary.shards_done, summary.seconds = len(shards_read), time.time() - started
    return summary


class _TarWriter:
    """One tar, written under a hidden temporary name and renamed into place by `commit`."""

    def __init__(self, fs, path: str):
        folder, name = path.rsplit("/", 1)
        self.fs, self.path = fs, path
        self.tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        self.handle = fs.open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.handle, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o444
        info.mtime = 0  # reproducible tars
        self.tar.addfile(info, io.BytesIO(data))

    def commit(self) -> str:
        self.tar.close()
        self.handle.close()
        self.fs.mv(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.tar.close()
        self.handle.close()
        self.fs.rm(self.tmp)
