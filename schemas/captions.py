"""`captions`: the web caption and N synthetic captions of every captioned image."""

import pyarrow as pa

from ._spec import ArtifactSchema, field

CAPTION_SOURCES = ("web", "synthetic")
DEGENERATE_REASONS = ("empty", "punctuation_only", "repeated_token")

CAPTIONS = ArtifactSchema(
    name="captions",
    version=1,
    schema=pa.schema(
        [
            field("sample_id", pa.string(), "id of the image (see images.sample_id)", nullable=False),
            field("caption_id", pa.string(), "'<sample_id>#web' or '<sample_id>#syn<i>'", nullable=False),
            field("caption_source", pa.string(), "'web' or 'synthetic'", nullable=False),
            field("caption_index", pa.int32(), "0 for web, i for the i-th synthetic caption", nullable=False),
            field("caption", pa.string(), "caption text (web captions may be empty)"),
            field("captioner", pa.string(), "captioner id (hub id or folder) for synthetic captions"),
            field("decoding", pa.string(), "decoding parameters as JSON (top_p, max_length, ...)"),
            field("seed", pa.int64(), "seed that produced this synthetic caption"),
            field("degenerate", pa.string(), "null, or why the caption is degenerate: empty, punctuation_only, repeated_token"),
        ]
    ),
    fix_hint="captions/ shards are written by `capfilt caption`; re-run it for this run.",
)
