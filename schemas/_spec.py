"""The machinery shared by every artifact schema: versioned metadata and validation."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.errors import SchemaError

SCHEMA_NAME_KEY = b"capfilt.schema"
SCHEMA_VERSION_KEY = b"capfilt.schema_version"


def _types_compatible(expected: pa.DataType, found: pa.DataType) -> bool:
    """Equal types, or the same logical type in another physical width/encoding.

    Parquet readers (DuckDB, pandas, other writers) turn string into large_string and
    dictionary-encode columns; such a column still holds what the schema means.
    """
    if expected.equals(found) or pa.types.is_null(found):
        return True  # an all-null column (type inferred as null) fits any type; nulls are checked apart
    if pa.types.is_dictionary(found):
        return _types_compatible(expected, found.value_type)
    families = (
        (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view),
        (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view),
    )
    for family in families:
        if any(check(expected) for check in family) and any(check(found) for check in family):
            return True
    if pa.types.is_integer(expected) and pa.types.is_integer(found):
        return True  # width differences are checked value by value when the table is conformed
    if pa.types.is_floating(expected) and (pa.types.is_floating(found) or pa.types.is_integer(found)):
        return True
    if pa.types.is_list(expected) or pa.types.is_large_list(expected) or pa.types.is_fixed_size_list(expected):
        if pa.types.is_list(found) or pa.types.is_large_list(found) or pa.types.is_fixed_size_list(found):
            return _types_compatible(expected.value_type, found.value_type)
        return False
    if pa.types.is_timestamp(expected) and pa.types.is_timestamp(found):
        return True
    return False


@dataclass(frozen=True)
class ArtifactSchema:
    """One capfilt artifact: its name, version and Arrow schema (fields carry docs in metadata)."""

    name: str
    version: int
    schema: pa.Schema
    fix_hint: str
    row_group_rows: int | None = None  # rows per Parquet row group when written; None: the writer's default

    @property
    def arrow(self) -> pa.Schema:
        """The Arrow schema with the capfilt name and version stamped into its metadata."""
        meta = dict(self.schema.metadata or {})
        meta[SCHEMA_NAME_KEY] = self.name.encode()
        meta[SCHEMA_VERSION_KEY] = str(self.version).encode()
        return self.schema.with_metadata(meta)

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    def describe(self) -> dict[str, str]:
        """Column name -> its documentation, for readers and the README."""
        return {
            f.name: (f.metadata or {}).get(b"doc", b"").decode() for f in self.schema
        }

    def empty(self) -> pa.Table:
        return self.arrow.empty_table()

    def conform(self, table: pa.Table, where: str = "table") -> pa.Table:
        """Validate, then cast to exactly this schema (column order, types, metadata).

        Absent optional (nullable) columns are filled with nulls; extra columns are dropped.
        """
        self.validate(table, where=where)
        columns = []
        for f in self.schema:
            if f.name not in table.column_names:
                columns.append(pa.nulls(table.num_rows, f.type))
                continue
            column = table.column(f.name)
            try:
                columns.append(column.cast(f.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaError(
                    f"{where}: column '{f.name}' ({column.type}) does not fit {f.type}: {exc}. "
                    f"{self.fix_hint}"
                ) from exc
        return pa.Table.from_arrays(columns, schema=self.arrow)

    def from_pylist(self, rows: list[dict]) -> pa.Table:
        return pa.Table.from_pylist(rows, schema=self.arrow)

    def validate(self, table_or_path: pa.Table | str, where: str | None = None) -> pa.Schema:
        """Check a table, a Parquet file or a folder of Parquet files against this schema.

        Raises SchemaError naming the file, the column, the expected and the found type, and
        what to do. Returns the found schema when it fits.
        """
        if isinstance(table_or_path, (pa.Table, pa.RecordBatch)):
            found = table_or_path.schema
            where = where or "table"
            table = table_or_path
        else:
            where = where or str(table_or_path)
            found = read_parquet_schema(str(table_or_path))
            table = None
        version = (found.metadata or {}).get(SCHEMA_VERSION_KEY)
        name = (found.metadata or {}).get(SCHEMA_NAME_KEY)
        # In-memory tables derived from another artifact carry its stamp; only files are checked.
        if table is None and name is not None and name.decode() != self.name:
            raise SchemaError(
                f"{where}: this is a '{name.decode()}' artifact, expected '{self.name}'. "
                f"Point the command at the '{self.name}' folder."
            )
        if version is not None and int(version) > self.version:
            raise SchemaError(
                f"{where}: written with '{self.name}' schema v{int(version)}, newer than this "
                f"capfilt's v{self.version}. Upgrade capfilt to read it."
            )
        for field in self.schema:
            if field.name not in found.names:
                if field.nullable:
                    continue  # optional columns may be absent; conform() fills them with nulls
                raise SchemaError(
                    f"{where}: missing column '{field.name}' ({field.type}) of the "
                    f"'{self.name}' schema v{self.version}; found columns {found.names}. "
                    f"{self.fix_hint}"
                )
            found_type = found.field(field.name).type
            if not _types_compatible(field.type, found_type):
                raise SchemaError(
                    f"{where}: column '{field.name}' has type {found_type}, expected "
                    f"{field.type} ('{self.name}' schema v{self.version}). {self.fix_hint}"
                )
            if table is not None and not field.nullable:
                nulls = table.column(field.name).null_count
                if nulls:
                    first = table.column(field.name).is_null().index(True).as_py()
                    raise SchemaError(
                        f"{where}: column '{field.name}' must not be null but has {nulls} "
                        f"null value(s), first at row {first}. {self.fix_hint}"
                    )
        return found


def field(name: str, type_: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
    """A schema field whose documentation travels in its metadata."""
    return pa.field(name, type_, nullable=nullable, metadata={b"doc": doc.encode()})


def read_parquet_schema(path: str) -> pa.Schema:
    """The schema of a Parquet file, or of the first Parquet file in a folder (any fsspec URI)."""
    import fsspec

    try:
        fs, fs_path = fsspec.core.url_to_fs(path)
    except (ValueError, ImportError) as exc:
        raise SchemaError(f"{path}: cannot open this location ({exc}).") from exc
    if not fs.exists(fs_path):
        raise SchemaError(f"{path}: no such file or folder.")
    if fs.isdir(fs_path):
        files = sorted(p for p in fs.find(fs_path) if p.endswith(".parquet") and "/." not in p)
        if not files:
            raise SchemaError(f"{path}: folder holds no .parquet files.")
        fs_path = files[0]
        path = files[0]
    try:
        with fs.open(fs_path, "rb") as handle:
            return pq.read_schema(handle)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SchemaError(
            f"{path}: not a readable Parquet file ({exc}). Re-create it or remove it."
        ) from exc
