"""`curated`: the kept (image, caption) pairs that training reads."""

import pyarrow as pa

from ._spec import ArtifactSchema, field

CURATED = ArtifactSchema(
    name="curated",
    version=1,
    schema=pa.schema(
        [
            field("sample_id", pa.string(), "id of the image", nullable=False),
            field("caption_id", pa.string(), "id of the caption", nullable=False),
            field("image", pa.binary(), "encoded image bytes", nullable=False),
            field("image_format", pa.string(), "encoding of `image`"),
            field("caption", pa.string(), "kept caption", nullable=False),
            field("caption_source", pa.string(), "'web', 'synthetic', or 'oracle' (true caption of a synthetic world)", nullable=False),
            field("clip_score", pa.float32(), "CLIP score of the pair"),
            field("itm_score", pa.float32(), "ITM match probability of the pair"),
            field("rank", pa.int32(), "rank of this caption among its image's captions under the policy (0 = best)"),
            field("sha256", pa.string(), "sha256 of the original image bytes"),
            field("url", pa.string(), "image URL"),
            field("width", pa.int32(), "image width"),
            field("height", pa.int32(), "image height"),
            field("run_id", pa.string(), "run that curated this pair", nullable=False),
            field("provenance", pa.string(), "JSON: model ids, policy, thresholds, seeds, capfilt version"),
        ]
    ),
    fix_hint="curated/ shards are written by `capfilt filter`; re-run it for this run.",
)
