"""The clean annotated set (`--annotated PATH`): read, validate, split.

    Parquet / JSONL (a file, a folder of them, any fsspec URI)
      one row per image:   image_id, image | image_path | url, captions: list<string>
      or one per caption:  image_id, image | image_path | url, caption: string
    ──► AnnotatedSet (images in image_id order, each with its captions)
    ──► split by image, seeded: finetuning part + held-out calibration part (default 20%)

The set is supervision, not data to curate: a row that cannot be used (no image, no caption,
an image that does not decode, two different images under one id) is an error naming the file,
the row and the fix, not a row to drop, because a silently smaller clean set changes what the
filter is calibrated to.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import dataclass, field

from capfilt.errors import ConfigError
from schemas.annotated import ANNOTATED, CAPTION_COLUMNS, IMAGE_COLUMNS

SUFFIXES = (".parquet", ".jsonl", ".json", ".ndjson")
DEFAULT_HOLDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class AnnotatedImage:
    image_id: str
    image: bytes
    captions: tuple[str, ...]


@dataclass
class AnnotatedSet:
    source: str
    images: list[AnnotatedImage]
    files: list[str] = field(default_factory=list)

    @property
    def pairs(self) -> int:
        return sum(len(im.captions) for im in self.images)

    def fingerprint(self) -> str:
        """sha256 over ids, image bytes and captions: names this exact set in lineage."""
        return fingerprint(self.images)

    def describe(self) -> dict:
        return {"source": self.source, "files": self.files, "images": len(self.images), "pairs": self.pairs,
                "sha256": self.fingerprint()}


def fingerprint(images: list[AnnotatedImage]) -> str:
    digest = hashlib.sha256()
    for im in sorted(images, key=lambda im: im.image_id):
        digest.update(im.image_id.encode() + b"\0" + hashlib.sha256(im.image).digest())
        for caption in im.captions:
            digest.update(b"\1" + caption.encode())
    return digest.hexdigest()


# -- reading -------------------------------------------------------------------------------------

def _rows(fs, file: str) -> list[dict]:
    if file.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(file, filesystem=fs).to_pylist()
        except Exception as exc:  # noqa: BLE001 - any reader complaint is the file's fault
            raise ConfigError(f"{file}: not a readable Parquet file ({type(exc).__name__}: {exc}).") from exc
    rows = []
    with fs.open(file, "r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{file} line {number}: not JSON ({exc.msg}); write one JSON object per line.") from exc
            if not isinstance(row, dict):
                raise ConfigError(f"{file} line {number}: a JSON {type(row).__name__}, expected an object per line.")
            rows.append(row)
    return rows


def _load_image(fs, file: str, row: dict, where: str, column: str) -> bytes:
    value = row.get(column)
    if column == "image":
        if isinstance(value, str):  # JSONL cannot hold bytes: base64 text
            try:
                return base64.b64decode(value, validate=True)
            except ValueError as exc:
                raise ConfigError(f"{where}: `image` is text but not base64; in JSONL give base64 bytes, or `image_path` / `url`.") from exc
        if isinstance(value, dict) and "bytes" in value:  # Hugging Face datasets' Image feature
            value = value["bytes"]
        return bytes(value) if value else b""
    if not value:
        return b""
    if column == "image_path":
        path = value if "://" in value or value.startswith("/") else f"{file.rsplit('/', 1)[0]}/{value}"
        try:
            with fs.open(path, "rb") as handle:
                return handle.read()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where}: cannot read image_path {value!r} ({exc}); paths are relative to the file's folder.") from exc
    import urllib.request

    try:
        with urllib.request.urlopen(value, timeout=30) as response:  # noqa: S310 - the user's own URLs
            return response.read()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot download url {value!r} ({exc}); the annotated set must be complete: fix or drop the row.") from exc


def _captions(row: dict, column: str, where: str) -> list[str]:
    value = row.get(column)
    if column == "caption":
        value = [value] if isinstance(value, str) else value
    if not isinstance(value, (list, tuple)) or any(not isinstance(c, str) for c in value):
        raise ConfigError(f"{where}: `{column}` must be {'a string' if column == 'caption' else 'a list of strings'}, "
                          f"got {type(value).__name__}.")
    captions = [c.strip() for c in value if c and c.strip()]
    if not captions:
        raise ConfigError(f"{where}: no caption (`{column}` is empty); every image of the annotated set needs at least one.")
    return captions


def _check_decodes(data: bytes, where: str) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as exc:  # noqa: BLE001 - any decoder complaint is the row's fault
        raise ConfigError(f"{where}: the image does not decode ({type(exc).__name__}: {exc}); give JPEG/PNG bytes.") from exc


def read_annotated(path: str) -> AnnotatedSet:
    """Read and validate an annotated set; ConfigError (one line: file, row, fix) on bad input."""
    from pipeline.run_store import list_files

    fs, _, files = list_files(str(path), SUFFIXES, "--annotated", "the annotated Parquet/JSONL file or its folder")
    order: list[str] = []
    images: dict[str, tuple[bytes, list[str], str]] = {}
    for file in files:
        rows = _rows(fs, file)
        if not rows:
            continue
        columns = set().union(*(r.keys() for r in rows))
        found = ", ".join(sorted(columns)) or "none"
        if "image_id" not in columns:
            raise ConfigError(f"{file}: no `image_id` column (found: {found}); add one naming each image "
                              f"(rows with the same id are one image). {ANNOTATED.fix_hint}")
        image_column = next((c for c in IMAGE_COLUMNS if c in columns), None)
        if image_column is None:
            raise ConfigError(f"{file}: no image column (found: {found}); add `image` (encoded bytes), "
                              f"`image_path` or `url`.")
        caption_column = next((c for c in CAPTION_COLUMNS if c in columns), None)
        if caption_column is None:
            raise ConfigError(f"{file}: no caption column (found: {found}); add `captions` (list of strings) "
                              f"or one `caption` string per row.")
        for number, row in enumerate(rows):
            image_id = row.get("image_id")
            where = f"{file} row {number}" + (f" (image_id {image_id})" if image_id is not None else "")
            if image_id is None or str(image_id).strip() == "":
                raise ConfigError(f"{where}: `image_id` is empty; give every row the id of its image.")
            image_id = str(image_id)
            captions = _captions(row, caption_column, where)
            if image_id in images:
                data, known, first = images[image_id]
                other = _load_image(fs, file, row, where, image_column)
                if other and other != data:
                    raise ConfigError(f"{where}: image_id {image_id} already names a different image ({first}); "
                                      f"give each image its own id.")
                known.extend(c for c in captions if c not in known)
                continue
            data = _load_image(fs, file, row, where, image_column)
            if not data:
                raise ConfigError(f"{where}: `{image_column}` is empty; every row needs its image.")
            _check_decodes(data, where)
            images[image_id] = (data, list(dict.fromkeys(captions)), where)
            order.append(image_id)
    if not images:
        raise ConfigError(f"--annotated {path}: no rows; the annotated set is empty.")
    ordered = [AnnotatedImage(i, images[i][0], tuple(images[i][1])) for i in sorted(order)]
    return AnnotatedSet(str(path), ordered, [fs.unstrip_protocol(f) if "://" in str(path) else f for f in files])


def write_annotated(images: list[AnnotatedImage], path: str) -> str:
    """The canonical Parquet form (image_id, image, captions)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = ANNOTATED.from_pylist([{"image_id": im.image_id, "image": im.image, "captions": list(im.captions)}
                                   for im in images])
    pq.write_table(table, path)
    return path


# -- the split -----------------------------------------------------------------------------------

@dataclass
class AnnotatedSplit:
    finetune: list[AnnotatedImage]
    calibration: list[AnnotatedImage]
    holdout_fraction: float
    seed: int

    def describe(self) -> dict:
        """What lineage records: enough to rebuild the split from the same set."""
        return {"holdout_fraction": self.holdout_fraction, "seed": self.seed, "by": "image",
                "finetune_images": len(self.finetune), "finetune_pairs": sum(len(i.captions) for i in self.finetune),
                "calibration_images": len(self.calibration),
                "calibration_pairs": sum(len(i.captions) for i in self.calibration),
                "calibration_sha256": fingerprint(self.calibration)}


def split_annotated(images: list[AnnotatedImage], holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
                    seed: int = 0) -> AnnotatedSplit:
    """Split by image: an image's rank is sha256(seed, image_id), so the split depends only on the
    seed and the ids (not on file order), and adding images never moves an existing one."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ConfigError(f"--holdout-fraction must be in [0, 1), got {holdout_fraction}.")
    ranked = sorted(images, key=lambda im: hashlib.sha256(f"{seed}\0{im.image_id}".encode()).hexdigest())
    held = round(holdout_fraction * len(images))
    if holdout_fraction > 0 and held == 0:
        held = 1
    if held >= len(images):
        raise ConfigError(f"--holdout-fraction {holdout_fraction} of {len(images)} images leaves none to finetune on; "
                          f"lower it or give a larger annotated set.")
    calibration = {im.image_id for im in ranked[:held]}
    return AnnotatedSplit([im for im in images if im.image_id not in calibration],
                          [im for im in images if im.image_id in calibration], holdout_fraction, seed)
