"""Every Arrow schema capfilt reads or writes, defined once.

Each artifact is an `ArtifactSchema` with a name, a version stamped into the Parquet metadata,
documented columns and `validate(table_or_path)`.
"""

from ._spec import ArtifactSchema, read_parquet_schema
from .captions import CAPTION_SOURCES, CAPTIONS, DEGENERATE_REASONS
from .curated import CURATED, CURATED_IMAGES, curated_outputs
from .dedup import DEDUP
from .images import IMAGES
from .manifest import MANIFEST, STATUSES
from .rejected import OUTCOMES, REJECTED
from .scores import SCORES
from .source import SOURCE, SourceColumns, to_canonical

ALL = {s.name: s for s in (SOURCE, IMAGES, CAPTIONS, SCORES, DEDUP, CURATED, CURATED_IMAGES, REJECTED, MANIFEST)}

__all__ = [
    "ALL",
    "ArtifactSchema",
    "CAPTIONS",
    "CAPTION_SOURCES",
    "CURATED",
    "CURATED_IMAGES",
    "DEDUP",
    "DEGENERATE_REASONS",
    "IMAGES",
    "MANIFEST",
    "OUTCOMES",
    "REJECTED",
    "SCORES",
    "SOURCE",
    "STATUSES",
    "SourceColumns",
    "curated_outputs",
    "read_parquet_schema",
    "to_canonical",
]
