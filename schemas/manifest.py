"""`manifest`: one record per (stage, shard) saying whether it is done, how, and with what counts.

Records are stored as one JSON file per (stage, shard) (so Ray tasks never write the same file)
and read back as a table with this schema.
"""

import pyarrow as pa

from ._spec import ArtifactSchema, field

STATUSES = ("running", "done", "failed")

MANIFEST = ArtifactSchema(
    name="manifest",
    version=1,
    schema=pa.schema(
        [
            field("stage", pa.string(), "stage name", nullable=False),
            field("shard", pa.string(), "shard id", nullable=False),
            field("status", pa.string(), "running, done or failed", nullable=False),
            field("config_hash", pa.string(), "hash of the stage config that produced the shard", nullable=False),
            field("rows_in", pa.int64(), "rows the stage read for this shard"),
            field("kept", pa.int64(), "rows kept (written to the stage's output)"),
            field("rejected", pa.int64(), "rows dropped with a reason"),
            field("failed", pa.int64(), "rows that failed with an error"),
            field("rows_out", pa.int64(), "rows written to the stage's output (may exceed kept: N captions per image)"),
            field("attempt", pa.int64(), "how many times this shard was started"),
            field("started_at", pa.float64(), "unix time the last attempt started"),
            field("finished_at", pa.float64(), "unix time the last attempt finished"),
            field("duration_s", pa.float64(), "seconds the last attempt took"),
            field("error", pa.string(), "error of a failed attempt"),
            field("capfilt_version", pa.string(), "capfilt version that wrote the shard"),
        ]
    ),
    fix_hint="The manifest is written by the run store; do not edit it by hand.",
)
