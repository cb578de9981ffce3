"""`dedup`: one row per duplicate image of a run, naming the image kept in its place."""

import pyarrow as pa

from ._spec import ArtifactSchema, field

DEDUP = ArtifactSchema(
    name="dedup",
    version=1,
    schema=pa.schema(
        [
            field("sample_id", pa.string(), "the duplicate image (dropped)", nullable=False),
            field("duplicate_of", pa.string(), "the image kept instead", nullable=False),
            field("kind", pa.string(), "'exact' (same sha256) or 'semantic' (CLIP embeddings within 1 - eps)", nullable=False),
            field("similarity", pa.float32(), "cosine similarity of the two images' CLIP embeddings (1 for exact)"),
        ]
    ),
    fix_hint="dedup/ is written by `capfilt filter`; re-run it for this run.",
)
