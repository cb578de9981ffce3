"""A synthetic LAION-like world on disk: images with known content, noisy web captions, bad URLs.

`make_world` renders scenes (scenes.py), writes a LAION-style source Parquet whose URLs point at
127.0.0.1:<port>, the image files and a routes table for `WorldServer` (server.py), and a
ground-truth sidecar saying what each image shows, which web captions were corrupted and how, and
what ingest should do with each bad URL. Everything is a function of the config: the same seed
gives the same bytes.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from capfilt.errors import ConfigError
from schemas import SOURCE

from .scenes import (
    ANNOTATION_TEMPLATES,
    ATTRIBUTE_VALUES,
    ATTRIBUTES,
    annotation_captions,
    render,
    true_caption,
    web_caption,
)

NOISE_KINDS = ("swap", "attribute", "junk", "empty")
# What ingest should record for each bad-URL kind (rejected.reason).
EXPECTED_INGEST_REASON = {
    "http_404": "http_404",
    "http_500": "http_500",
    "slow": "timeout",
    "truncated_jpeg": "truncated_image",
    "not_image": "not_an_image",
    "html_page": "html_page",
    "redirect_loop": "redirect_loop",
    "huge_image": "too_many_pixels",
    "opt_out": "opt_out",
}
BAD_URL_KINDS = (
    "http_404",
    "http_500",
    "slow",
    "truncated_jpeg",
    "not_image",
    "html_page",
    "redirect_loop",
    "huge_image",
    "opt_out",
)
JUNK_ALT_TEXTS = (
    "IMG_{n:04d}.jpg",
    "DSC{n:05d}.JPG",
    "click here",
    "image",
    "thumbnail",
    "untitled-{n}",
    "Buy now! Free shipping",
    "photo {n}",
)


def _jpeg_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _huge_png(side: int) -> bytes:
    """A valid grayscale PNG of side x side pixels that compresses to a few hundred KB.

    Written by hand, row by row, so making it never holds the decoded image in memory.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" + b"\x80" * side
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of a synthetic world. Validated on construction."""

    images: int = 200
    seed: int = 0
    image_size: int = 64
    noise: float = 0.4
    noise_kinds: tuple[str, ...] = NOISE_KINDS
    bad_urls_per_kind: int = 1
    bad_url_kinds: tuple[str, ...] = BAD_URL_KINDS
    duplicates: int = 4
    host: str = "127.0.0.1"
    port: int = 0
    slow_seconds: float = 30.0
    huge_side: int = 12000
    # The clean annotated set next to the world (COCO's role in BLIP): this fraction of `images`,
    # other images, `captions_per_image` clean captions each. 0 writes none.
    annotated: float = 0.1
    captions_per_image: int = 5

    def __post_init__(self):
        if self.images < 1:
            raise ConfigError(f"--images must be at least 1, got {self.images}.")
        if not 0.0 <= self.noise <= 1.0:
            raise ConfigError(f"--noise must be in [0, 1], got {self.noise}.")
        if not 16 <= self.image_size <= 1024:
            raise ConfigError(f"--image-size must be in [16, 1024], got {self.image_size}.")
        bad = sorted(set(self.noise_kinds) - set(NOISE_KINDS))
        if bad or not self.noise_kinds:
            raise ConfigError(f"unknown noise kind(s) {bad}; choose from {list(NOISE_KINDS)}.")
        bad = sorted(set(self.bad_url_kinds) - set(BAD_URL_KINDS))
        if bad:
            raise ConfigError(f"unknown bad-URL kind(s) {bad}; choose from {list(BAD_URL_KINDS)}.")
        if self.bad_urls_per_kind < 0 or self.duplicates < 0:
            raise ConfigError("--bad-urls-per-kind and --duplicates must be >= 0.")
        if self.duplicates > self.images:
            raise ConfigError(f"--duplicates ({self.duplicates}) cannot exceed --images ({self.images}).")
        if not 0.0 <= self.annotated <= 10.0:
            raise ConfigError(f"--annotated must be in [0, 10] (a fraction of --images), got {self.annotated}.")
        if not 1 <= self.captions_per_image <= len(ANNOTATION_TEMPLATES):
            raise ConfigError(f"--captions-per-image must be in [1, {len(ANNOTATION_TEMPLATES)}], "
                              f"got {self.captions_per_image}.")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in [0, 65535], got {self.port}.")


def _random_attrs(rng: np.random.Generator) -> dict[str, str]:
    return {name: str(values[rng.integers(len(values))]) for name, values in ATTRIBUTE_VALUES.items()}


def _corrupt(kind: str, attrs: dict[str, str], other: dict[str, str], rng: np.random.Generator) -> str:
    if kind == "swap":
        return web_caption(other, rng)
    if kind == "attribute":
        name = ATTRIBUTES[rng.integers(len(ATTRIBUTES))]
        choices = [v for v in ATTRIBUTE_VALUES[name] if v != attrs[name]]
        wrong = dict(attrs, **{name: choices[rng.integers(len(choices))]})
        return web_caption(wrong, rng)
    if kind == "junk":
        return JUNK_ALT_TEXTS[rng.integers(len(JUNK_ALT_TEXTS))].format(n=int(rng.integers(10000)))
    return ""


ANNOTATED_DIR = "annotated"


def write_annotated(out: str | Path, config: WorldConfig) -> dict | None:
    """Write the world's clean annotated set to `out`/annotated/ (None when config.annotated is 0).

    annotated.parquet: image_id (string, unique), image (JPEG bytes), captions (list<string>, each
    a correct caption); ground_truth.parquet: image_id, true_caption and the attribute columns.
    Its images are drawn from a random stream of their own, so they are neither the source's
    images nor a held-out world's, and adding the set leaves the world's own bytes unchanged.
    """
    n = int(round(config.annotated * config.images))
    if n < 1 and config.annotated > 0:
        n = 1
    if n < 1:
        return None
    rng = np.random.default_rng([config.seed, 0xA11])
    folder = Path(out) / ANNOTATED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    rows, truth = [], []
    for i in range(n):
        attrs = _random_attrs(rng)
        image_id = f"annotated-{i:06d}"
        rows.append({"image_id": image_id, "image": _jpeg_bytes(render(attrs, config.image_size, rng)),
                     "captions": annotation_captions(attrs, rng, config.captions_per_image)})
        truth.append({"image_id": image_id, "true_caption": true_caption(attrs), **attrs})
    schema = pa.schema([("image_id", pa.string()), ("image", pa.binary()), ("captions", pa.list_(pa.string()))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "annotated.parquet")
    pq.write_table(pa.Table.from_pylist(truth), folder / "ground_truth.parquet")
    return {"images": n, "captions": n * config.captions_per_image,
            "path": f"{ANNOTATED_DIR}/annotated.parquet", "ground_truth": f"{ANNOTATED_DIR}/ground_truth.parquet"}


def make_world(out: str | Path, config: WorldConfig) -> dict:
    """Write a world to `out`: source/, files/, routes.json, ground_truth.parquet, world.json, and
    the clean annotated set annotated/ (see `write_annotated`).

    Returns the world description (also in world.json).
    """
    out = Path(out)
    rng = np.random.default_rng(config.seed)
    port = config.port or free_port(config.host)
    base = f"http://{config.host}:{port}"
    (out / "files").mkdir(parents=True, exist_ok=True)
    (out / "source").mkdir(parents=True, exist_ok=True)

    scenes = [_random_attrs(rng) for _ in range(config.images)]
    # Exactly round(noise * images) corrupted captions, so the ratio is what was asked for.
    n_noisy = int(round(config.noise * config.images))
    noisy = set(rng.permutation(config.images)[:n_noisy].tolist())
    kinds = list(config.noise_kinds)

    routes: dict[str, dict] = {}
    rows: list[dict] = []
    truth: list[dict] = []
    for i, attrs in enumerate(scenes):
        data = _jpeg_bytes(render(attrs, config.image_size, rng))
        name = f"{i:06d}.jpg"
        (out / "files" / name).write_bytes(data)
        path = f"/img/{name}"
        routes[path] = {"kind": "file", "file": name, "content_type": "image/jpeg"}
        noise_kind = None
        if i in noisy:
            noise_kind = kinds[rng.integers(len(kinds))]
            other = scenes[(i + 1 + int(rng.integers(config.images - 1))) % config.images] if config.images > 1 else _random_attrs(rng)
            if noise_kind == "swap" and true_caption(other) == true_caption(attrs):
                noise_kind = "attribute"
            text = _corrupt(noise_kind, attrs, other, rng)
        else:
            text = web_caption(attrs, rng)
        rows.append({"URL": base + path, "TEXT": text})
        truth.append({
            "url": base + path, "kind": "image", "image_index": i, "true_caption": true_caption(attrs),
            "web_caption": text, "noise_kind": noise_kind, "corrupted": noise_kind is not None,
            "duplicate_of": None, "expected_reason": None, **attrs,
        })

    # Exact duplicates: the same bytes under another URL, with a fresh correct caption.
    for j, i in enumerate(sorted(rng.permutation(config.images)[: config.duplicates].tolist())):
        path = f"/dup/{j:06d}.jpg"
        routes[path] = {"kind": "file", "file": f"{i:06d}.jpg", "content_type": "image/jpeg"}
        text = web_caption(scenes[i], rng)
        rows.append({"URL": base + path, "TEXT": text})
        truth.append({
            "url": base + path, "kind": "duplicate", "image_index": i, "true_caption": true_caption(scenes[i]),
            "web_caption": text, "noise_kind": None, "corrupted": False,
            "duplicate_of": truth[i]["url"], "expected_reason": "duplicate", **scenes[i],
        })

    sample = _jpeg_bytes(render(_random_attrs(rng), config.image_size, rng))
    huge = _huge_png(config.huge_side) if "huge_image" in config.bad_url_kinds and config.bad_urls_per_kind else b""
    if huge:
        (out / "files" / "huge.png").write_bytes(huge)
    (out / "files" / "truncated.jpg").write_bytes(sample[: len(sample) // 2])
    (out / "files" / "opt_out.jpg").write_bytes(sample)
    (out / "files" / "not_image.jpg").write_bytes(rng.bytes(2048))
    (out / "files" / "page.html").write_bytes(b"<!doctype html><html><body><h1>Hello</h1></body></html>")
    bad_routes = {
        "http_404": lambda p: {"kind": "status", "code": 404},
        "http_500": lambda p: {"kind": "status", "code": 500},
        "slow": lambda p: {"kind": "slow", "seconds": config.slow_seconds, "file": "opt_out.jpg", "content_type": "image/jpeg"},
        "truncated_jpeg": lambda p: {"kind": "file", "file": "truncated.jpg", "content_type": "image/jpeg"},
        "not_image": lambda p: {"kind": "file", "file": "not_image.jpg", "content_type": "image/jpeg"},
        "html_page": lambda p: {"kind": "file", "file": "page.html", "content_type": "text/html"},
        "redirect_loop": lambda p: {"kind": "redirect", "location": p},
        "huge_image": lambda p: {"kind": "file", "file": "huge.png", "content_type": "image/png"},
        "opt_out": lambda p: {"kind": "file", "file": "opt_out.jpg", "content_type": "image/jpeg",
                              "headers": {"X-Robots-Tag": "noai, noimageai"}},
    }
    for kind in config.bad_url_kinds:
        for j in range(config.bad_urls_per_kind):
            path = f"/bad/{kind}/{j:03d}" + (".png" if kind == "huge_image" else ".jpg")
            routes[path] = bad_routes[kind](path)
            text = web_caption(_random_attrs(rng), rng)
            rows.append({"URL": base + path, "TEXT": text})
            truth.append({
                "url": base + path, "kind": kind, "image_index": None, "true_caption": None,
                "web_caption": text, "noise_kind": None, "corrupted": False, "duplicate_of": None,
                "expected_reason": EXPECTED_INGEST_REASON[kind], **{a: None for a in ATTRIBUTES},
            })

    order = rng.permutation(len(rows))
    source_rows = []
    for idx in order:
        row = rows[idx]
        source_rows.append({
            **row,
            "WIDTH": config.image_size,
            "HEIGHT": config.image_size,
            "similarity": float(np.round(rng.uniform(0.25, 0.4), 4)),
            "punsafe": float(np.round(rng.beta(1, 40), 5)),
            "pwatermark": float(np.round(rng.beta(1, 12), 5)),
            "LICENSE": "cc-by-4.0",
        })
    truth_rows = [truth[idx] for idx in order]
    for row_number, row in enumerate(truth_rows):
        row["source_row"] = row_number

    pq.write_table(SOURCE.from_pylist(source_rows), out / "source" / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(truth_rows), out / "ground_truth.parquet")
    (out / "routes.json").write_text(json.dumps(routes, indent=1, sort_keys=True))
    n_images = config.images
    world = {
        "config": {**asdict(config), "port": port},
        "host": config.host,
        "port": port,
        "base_url": base,
        "rows": len(source_rows),
        "images": n_images,
        "duplicates": config.duplicates,
        "bad_urls": len(source_rows) - n_images - config.duplicates,
        "corrupted_captions": n_noisy,
        "noise_ratio": n_noisy / n_images,
        "source": "source",
        "ground_truth": "ground_truth.parquet",
    }
    annotated = write_annotated(out, config)
    if annotated is not None:
        world["annotated"] = annotated["path"]
        world["annotated_ground_truth"] = annotated["ground_truth"]
        world["annotated_images"] = annotated["images"]
    # Paths are stored relative to the world folder (same seed -> same bytes, wherever it is).
    (out / "world.json").write_text(json.dumps(world, indent=1, sort_keys=True))
    return load_world(out)


def load_world(directory: str | Path) -> dict:
    path = Path(directory) / "world.json"
    if not path.exists():
        raise ConfigError(f"{directory}: no world.json here; create a world with `capfilt synth --out {directory}`.")
    world = json.loads(path.read_text())
    for key in ("source", "ground_truth", "annotated", "annotated_ground_truth"):
        if key in world:
            world[key] = str(Path(directory) / world[key])
    return world


def world_pairs(directory: str | Path, clean: bool = False) -> list[tuple[bytes, str]]:
    """(image bytes, web caption) of a world's distinct images with a non-empty caption, in image order:
    what an ingest of its source would give, read straight from its files (no server, no Ray). `clean`:
    only those whose web caption the world did not corrupt, the pairs a perfect filter would keep."""
    directory = Path(directory)
    truth = sorted((r for r in pq.read_table(directory / "ground_truth.parquet").to_pylist() if r["kind"] == "image"),
                   key=lambda r: r["image_index"])
    return [((directory / "files" / f"{r['image_index']:06d}.jpg").read_bytes(), r["web_caption"])
            for r in truth if (r["web_caption"] or "").strip() and not (clean and r["corrupted"])]


def pretraining_world(directory: str | Path, images: int, seed: int, noise: float = 0.4,
                      described: float = 0.1) -> Path:
    """A world only the toy preset's frozen pieces pretrain on (the stand-in for the other, larger
    web data real CLIPs and LLMs saw): made once, reused when already there. `described` of its
    size again are other images with clean captions in several wordings (a world's annotated set):
    real frozen models read far more than one source's alt-text, and a tokenizer, BERT and LM that
    never saw "backdrop" or "sits" cannot be finetuned on a human-written set that uses them."""
    directory = Path(directory)
    if not (directory / "world.json").exists():
        make_world(directory, WorldConfig(images=images, seed=seed, noise=noise, bad_urls_per_kind=0, duplicates=0,
                                          annotated=described))
    return directory


def described_pairs(directory: str | Path) -> list[tuple[bytes, list[str]]]:
    """(image bytes, its clean captions) of a world's annotated set; empty when it has none."""
    path = Path(directory) / ANNOTATED_DIR / "annotated.parquet"
    if not path.exists():
        return []
    return [(r["image"], list(r["captions"])) for r in pq.read_table(path, columns=["image", "captions"]).to_pylist()]


def noise_ratio(ground_truth: pa.Table) -> float:
    """Fraction of real (non-duplicate, non-bad-URL) images whose web caption was corrupted."""
    rows = [r for r in ground_truth.to_pylist() if r["kind"] == "image"]
    return sum(r["corrupted"] for r in rows) / max(1, len(rows))
