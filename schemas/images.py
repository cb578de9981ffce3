"""`images`: downloaded images, one row per successfully ingested source row.

img2dataset's parquet output columns (key, url, caption, width, height, original_width,
original_height, sha256, exif, the image bytes) plus capfilt's id and the LAION extras.
Rows that did not download live in `rejected`, never here.
"""

import pyarrow as pa

from ._spec import ArtifactSchema, field

IMAGES = ArtifactSchema(
    name="images",
    version=1,
    schema=pa.schema(
        [
            field("sample_id", pa.string(), "capfilt's stable id of the source row: '<source file stem>/<row>'", nullable=False),
            field("key", pa.string(), "img2dataset's key of the sample within its shard"),
            field("url", pa.string(), "image URL", nullable=False),
            field("caption", pa.string(), "web caption (source TEXT)"),
            field("image", pa.binary(), "encoded image bytes as stored (after img2dataset's resize)", nullable=False),
            field("image_format", pa.string(), "encoding of `image`: jpg, png or webp"),
            field("width", pa.int32(), "stored image width"),
            field("height", pa.int32(), "stored image height"),
            field("original_width", pa.int32(), "width of the downloaded image"),
            field("original_height", pa.int32(), "height of the downloaded image"),
            field("sha256", pa.string(), "sha256 of the downloaded (original) bytes"),
            field("exif", pa.string(), "EXIF as JSON, when img2dataset extracted it"),
            field("similarity", pa.float64(), "source's CLIP similarity, passed through"),
            field("punsafe", pa.float64(), "source's punsafe, passed through"),
            field("pwatermark", pa.float64(), "source's pwatermark, passed through"),
            field("license", pa.string(), "source's LICENSE, passed through"),
        ]
    ),
    fix_hint="images/ shards are written by `capfilt ingest`; re-run it for this run.",
)
