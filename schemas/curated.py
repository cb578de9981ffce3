"""`curated` and `curated_images`: what a run keeps, as users of Hugging Face, LAION and BLIP read it.

Two artifacts, written together by the select stage, shard by shard with the same shard ids:

  curated/<shard>.parquet         one row per kept caption, no image bytes: caption, its source
                                  and scores, and the image's metadata (URL, size, licence,
                                  safety and similarity from the source). What DuckDB queries,
                                  what lineage and reports read.
  curated_images/<shard>.parquet  one row per image with at least one kept caption: the image
                                  once (a Hugging Face `Image` column, so `datasets` decodes it to
                                  PIL), its kept captions as a list in rank order, the same
                                  metadata. What trainers and exports read.

A top-2 policy keeps two captions of most images; storing the bytes per caption would double
them. The join is on `sample_id`:

    SELECT c.caption, i.image.bytes FROM 'curated/*.parquet' c JOIN 'curated_images/*.parquet' i USING (sample_id)
"""

import json

import pyarrow as pa

from ._spec import ArtifactSchema, field

# Columns both tables carry for the image: what the source said about it, passed through.
_IMAGE_FIELDS = [
    field("url", pa.string(), "image URL"),
    field("sha256", pa.string(), "sha256 of the original image bytes"),
    field("width", pa.int32(), "stored image width"),
    field("height", pa.int32(), "stored image height"),
    field("original_width", pa.int32(), "width of the downloaded image, before img2dataset's resize"),
    field("original_height", pa.int32(), "height of the downloaded image, before img2dataset's resize"),
    field("license", pa.string(), "source's LICENSE (keep it with the image: it says how the image may be used)"),
    field("punsafe", pa.float64(), "source's punsafe (probability the image is unsafe)"),
    field("pwatermark", pa.float64(), "source's pwatermark (probability the image is watermarked)"),
    field("similarity", pa.float64(), "source's CLIP similarity of the web caption"),
]
IMAGE_METADATA = [f.name for f in _IMAGE_FIELDS]

CURATED = ArtifactSchema(
    name="curated",
    version=2,
    schema=pa.schema(
        [
            field("sample_id", pa.string(), "id of the image (joins curated_images.sample_id)", nullable=False),
            field("caption_id", pa.string(), "id of the caption", nullable=False),
            field("caption", pa.string(), "kept caption", nullable=False),
            field("caption_source", pa.string(), "'web', 'synthetic', or 'oracle' (true caption of a synthetic world)", nullable=False),
            field("clip_score", pa.float32(), "CLIP score of the pair"),
            field("itm_score", pa.float32(), "ITM match probability of the pair (null where no ITM scorer ran)"),
            field("rank", pa.int32(), "rank of this caption among its image's captions under the policy (0 = best)"),
            *_IMAGE_FIELDS,
            field("run_id", pa.string(), "run that curated this pair", nullable=False),
            field("provenance", pa.string(), "JSON: model ids, policy, thresholds, seeds, capfilt version"),
        ]
    ),
    fix_hint="curated/ shards are written by `capfilt filter`; re-run it for this run.",
)

# Hugging Face `datasets` reads its features from this schema metadata key: with it,
# `load_dataset("parquet", data_files=...)` turns the `image` struct into PIL images.
# The struct {bytes, path} is exactly the storage of `datasets.Image`; the field must be nullable
# for `datasets` to recognise it.
_HF_FEATURES = {"info": {"features": {"image": {"_type": "Image"}}}}
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

CURATED_IMAGES = ArtifactSchema(
    name="curated_images",
    version=1,
    schema=pa.schema(
        [
            field("sample_id", pa.string(), "id of the image", nullable=False),
            field("image", IMAGE_TYPE, "the image: encoded bytes as ingested (path: its file name in exports)"),
            field("image_format", pa.string(), "encoding of `image.bytes`: jpg, png or webp"),
            field("captions", pa.list_(pa.string()), "kept captions of the image, best first (curated/ has one row each)"),
            field("caption_ids", pa.list_(pa.string()), "ids of `captions`, same order"),
            field("caption_sources", pa.list_(pa.string()), "source of each of `captions`, same order"),
            *_IMAGE_FIELDS,
            field("run_id", pa.string(), "run that curated this image", nullable=False),
        ],
        metadata={b"huggingface": json.dumps(_HF_FEATURES).encode()},
    ),
    fix_hint="curated_images/ shards are written by `capfilt filter` with curated/; re-run it for this run.",
    # Trainers fetch one image at a time in a random order, and a row group is the smallest unit
    # Parquet reads: small groups keep a fetch cheap.
    row_group_rows=32,
)


def curated_outputs(pairs: pa.Table | list[dict]) -> dict[str, tuple[ArtifactSchema, pa.Table]]:
    """`commit_shard` outputs for kept pairs given one row per caption with its `image` bytes.

    Pure: splits the rows into curated/ (no bytes) and curated_images/ (one row per image,
    captions in rank order, then in the order given).
    """
    rows = pairs.to_pylist() if isinstance(pairs, pa.Table) else list(pairs)
    by_image: dict[str, list[dict]] = {}
    for row in rows:
        by_image.setdefault(row["sample_id"], []).append(row)
    images = []
    for sid, group in by_image.items():
        group = sorted(group, key=lambda r: r.get("rank") if r.get("rank") is not None else 0)  # stable
        first = group[0]
        images.append({
            "sample_id": sid,
            "image": {"bytes": first["image"], "path": None},
            "image_format": first.get("image_format"),
            "captions": [r["caption"] for r in group],
            "caption_ids": [r["caption_id"] for r in group],
            "caption_sources": [r["caption_source"] for r in group],
            **{k: first.get(k) for k in IMAGE_METADATA},
            "run_id": first["run_id"],
        })
    captions = [{k: v for k, v in r.items() if k not in ("image", "image_format")} for r in rows]
    return {
        "curated": (CURATED, pa.Table.from_pylist(captions) if captions else CURATED.empty()),
        "curated_images": (CURATED_IMAGES, pa.Table.from_pylist(images, schema=CURATED_IMAGES.arrow) if images else CURATED_IMAGES.empty()),
    }
