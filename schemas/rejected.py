"""`rejected`: every row a stage did not keep, with the reason (dropped) or the error (failed)."""

import pyarrow as pa

from ._spec import ArtifactSchema, field

OUTCOMES = ("dropped", "failed")

REJECTED = ArtifactSchema(
    name="rejected",
    version=1,
    schema=pa.schema(
        [
            field("stage", pa.string(), "stage that rejected the row: ingest, caption, score, select, dedup", nullable=False),
            field("shard", pa.string(), "shard the row belonged to", nullable=False),
            field("sample_id", pa.string(), "id of the source row / image", nullable=False),
            field("caption_id", pa.string(), "id of the caption, for caption-level rejections"),
            field("url", pa.string(), "image URL"),
            field("caption", pa.string(), "caption text"),
            field("outcome", pa.string(), "'dropped' (a decision, with a reason) or 'failed' (an error)", nullable=False),
            field("reason", pa.string(), "short machine-readable reason, e.g. http_404, private_address, duplicate", nullable=False),
            field("error_message", pa.string(), "the error or the detail behind the reason"),
            field("duplicate_of", pa.string(), "for duplicates: the sample_id that was kept instead"),
            field("attempt", pa.int32(), "download attempt number (1 = first; --retry-failed adds attempts)"),
        ]
    ),
    fix_hint="rejected/ shards are written by the stages; re-run the stage for this run.",
)
