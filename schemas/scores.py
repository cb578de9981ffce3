"""`scores`: one row per (image, caption) with its CLIP and ITM scores."""

import pyarrow as pa

from ._spec import ArtifactSchema, field

SCORES = ArtifactSchema(
    name="scores",
    version=1,
    schema=pa.schema(
        [
            field("sample_id", pa.string(), "id of the image", nullable=False),
            field("caption_id", pa.string(), "id of the caption (see captions.caption_id)", nullable=False),
            field("caption_source", pa.string(), "'web' or 'synthetic'", nullable=False),
            field("caption", pa.string(), "caption text"),
            field("clip_score", pa.float32(), "cosine similarity of CLIP image and text embeddings"),
            field("itm_score", pa.float32(), "ITM match probability in [0, 1]"),
            field("degenerate", pa.string(), "copied from captions.degenerate"),
            field("image_embedding", pa.list_(pa.float16()), "L2-normalised CLIP image embedding"),
        ]
    ),
    fix_hint="scores/ shards are written by `capfilt filter`; re-run it for this run.",
)
