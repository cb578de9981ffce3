"""`source`: LAION-style URL rows, the input of ingest.

Column names default to LAION's (URL, TEXT, WIDTH, ...); `SourceColumns` maps another source's
names onto them. Only the URL column is required; every other column may be absent.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import pyarrow as pa

from capfilt.errors import SchemaError

from ._spec import ArtifactSchema, field

SOURCE = ArtifactSchema(
    name="source",
    version=1,
    schema=pa.schema(
        [
            field("URL", pa.string(), "image URL (http/https); rows without one are rejected by ingest"),
            field("TEXT", pa.string(), "web caption (alt-text); may be empty or null"),
            field("WIDTH", pa.int64(), "image width claimed by the source, if known"),
            field("HEIGHT", pa.int64(), "image height claimed by the source, if known"),
            field("similarity", pa.float64(), "source's CLIP similarity of URL image and TEXT"),
            field("punsafe", pa.float64(), "source's probability that the image is unsafe"),
            field("pwatermark", pa.float64(), "source's probability that the image is watermarked"),
            field("LICENSE", pa.string(), "license string from the source, if any"),
        ]
    ),
    fix_hint=(
        "A source needs at least a URL column; map other names with "
        "--url-col/--caption-col (SourceColumns)."
    ),
)


@dataclass(frozen=True)
class SourceColumns:
    """Which column of a source file holds each canonical `source` column."""

    URL: str = "URL"
    TEXT: str = "TEXT"
    WIDTH: str = "WIDTH"
    HEIGHT: str = "HEIGHT"
    similarity: str = "similarity"
    punsafe: str = "punsafe"
    pwatermark: str = "pwatermark"
    LICENSE: str = "LICENSE"

    @classmethod
    def from_mapping(cls, mapping: dict[str, str] | None) -> "SourceColumns":
        """Build from {canonical name: source column}; unknown canonical names are an error."""
        mapping = dict(mapping or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise SchemaError(
                f"unknown source column mapping key(s) {unknown}; valid keys are {sorted(known)}."
            )
        return cls(**mapping)


def to_canonical(table: pa.Table, columns: SourceColumns = SourceColumns(), where: str = "source") -> pa.Table:
    """Rename a source table's columns to the canonical ones, fill absent optional ones with nulls.

    Raises SchemaError (naming `where`) if the URL column is missing or a column cannot be cast.
    """
    out = []
    for target in SOURCE.schema:
        name = getattr(columns, target.name)
        if name in table.column_names:
            column = table.column(name)
            if pa.types.is_dictionary(column.type):
                column = column.cast(column.type.value_type)
            try:
                column = column.cast(target.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaError(
                    f"{where}: column '{name}' (used as {target.name}) has type {column.type}, "
                    f"which cannot be read as {target.type} ({exc}{_first_bad_row(column, target.type)}). "
                    f"Fix the column or map another one."
                ) from exc
        elif target.name == "URL":
            raise SchemaError(
                f"{where}: no URL column '{name}'; found columns {table.column_names}. "
                f"Pass the URL column's name with --url-col."
            )
        else:
            column = pa.nulls(table.num_rows, target.type)
        out.append(column)
    # Null or malformed URLs are not an error here: ingest rejects those rows with a reason.
    canonical = pa.Table.from_arrays(out, schema=SOURCE.arrow)
    return canonical


def _first_bad_row(column: pa.ChunkedArray, target: pa.DataType) -> str:
    """', first at row N' for the first value that does not cast, so a user can find it."""
    try:
        pa.array([], column.type).cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return ""  # the type itself never casts: no row is to blame
    offset = 0
    for chunk in column.chunks:  # only on the error path: one value at a time is fine
        for i in range(len(chunk)):
            try:
                chunk.slice(i, 1).cast(target)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                return f", first at row {offset + i}"
        offset += len(chunk)
    return ""
