"""Ingest's source: list a source's files, read them as canonical rows, plan them into shards and
find the URLs repeated across shards, all in the driver before any download.

A source is one Parquet/CSV/JSONL file or a folder of them, local or any fsspec URI. A shard is
at most `shard_size` rows of one file, named '<file name>-<k>', and a row's sample_id is
'<file name>/<row>': adding a file to a source adds shards and renames none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from capfilt.errors import CapfiltError
from pipeline.run_store import list_files
from schemas import SOURCE, SourceColumns, to_canonical

SOURCE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")


@dataclass(frozen=True)
class SourceFile:
    path: str  # fsspec path of the file
    name: str  # path relative to the source root, without suffix: the sample_id prefix
    rows: int


@dataclass(frozen=True)
class ShardSpec:
    shard: str
    file: SourceFile
    start: int
    stop: int
    attempt: int = 1
    rows: tuple[str, ...] | None = None  # sample_ids to redo, for --retry-failed shards
    # (sample_id, sample_id of the first row with the same URL) for rows of this shard whose URL
    # an earlier shard of the source already has: see mark_cross_shard_duplicates
    duplicate_of: tuple[tuple[str, str], ...] = ()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "part"


def list_source_files(source: str) -> list[tuple[fsspec.AbstractFileSystem, str, str]]:
    """(fs, path, name) of every source file under `source` (a file or a folder), sorted."""
    fs, root, paths = list_files(source, SOURCE_SUFFIXES, "--source", "a LAION-style Parquet/CSV/JSONL file or a folder of them")
    if paths == [root]:  # a file
        return [(fs, root, PurePosixPath(root).stem)]
    return [(fs, p, str(PurePosixPath(p).relative_to(root).with_suffix(""))) for p in paths]


def read_source_file(fs: fsspec.AbstractFileSystem, path: str, columns: SourceColumns, where: str) -> pa.Table:
    """One source file as a canonical `source` table (see schemas/source.py)."""
    try:
        with fs.open(path, "rb") as handle:
            if path.endswith(".parquet"):
                table = pq.read_table(handle)
            elif path.endswith(".csv"):
                table = pacsv.read_csv(handle)
            else:
                table = pajson.read_json(handle)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CapfiltError(f"{where}: cannot read this source file ({exc}). Fix or remove the file.") from exc
    return to_canonical(table, columns, where=where)


def plan_shards(source: str, shard_size: int, columns: SourceColumns) -> list[ShardSpec]:
    """Split every source file into shards of at most `shard_size` rows.

    Shard ids are '<file name>-<k>', so adding a file to a source adds shards without renaming
    the existing ones (which is what makes incremental runs possible).
    """
    specs = []
    for fs, path, name in list_source_files(source):
        if path.endswith(".parquet"):
            where = fs.unstrip_protocol(path)
            try:
                with fs.open(path, "rb") as handle:
                    parquet = pq.ParquetFile(handle)
                    rows, schema = parquet.metadata.num_rows, parquet.schema_arrow
                    # Column names and types are checked here, before any Ray task starts: on the
                    # footer's schema, and on the values of the (usually no) columns whose type
                    # differs from the canonical one, so 'wide' in WIDTH fails now, not as a shard.
                    to_canonical(schema.empty_table(), columns, where=where)
                    named = {getattr(columns, f.name): f.type for f in SOURCE.schema}
                    recast = [n for n, t in named.items() if n in schema.names and schema.field(n).type != t]
                    if recast:
                        values = parquet.read(columns=recast)
                        if columns.URL not in recast:
                            values = values.append_column(columns.URL, pa.nulls(values.num_rows, pa.string()))
                        to_canonical(values, columns, where=where)
            except (pa.ArrowInvalid, OSError) as exc:
                raise CapfiltError(f"{where}: not a readable Parquet file ({exc}). Fix or remove the file.") from exc
        else:
            rows = read_source_file(fs, path, columns, fs.unstrip_protocol(path)).num_rows
        file = SourceFile(path=fs.unstrip_protocol(path), name=name, rows=rows)
        for k, start in enumerate(range(0, rows, shard_size)):
            specs.append(ShardSpec(f"{_safe(name)}-{k:05d}", file, start, min(rows, start + shard_size)))
    return specs


def mark_cross_shard_duplicates(specs: list[ShardSpec], columns: SourceColumns) -> list[ShardSpec]:
    """`specs` with each shard's rows whose URL an earlier shard of the source already has.

    A shard finds its own repeated URLs; a URL repeated across shards (or files) of one source
    is only seen here, in the driver, before any download: the first row with the URL (in file
    and row order) stands for it, the later ones are dropped as duplicate_url naming that row.
    (Should the first row itself be refused for its caption, the URL is not downloaded: unlike
    within a shard, captions are not read here.) Only the URL column is read, and Arrow's hash
    grouping finds each URL's first row, so the driver's memory is about the URLs' bytes.
    """
    if len(specs) < 2:
        return specs
    files = list(dict.fromkeys(spec.file for spec in specs))
    urls, offset, base = [], 0, {}
    for file in files:
        fs, path = fsspec.core.url_to_fs(file.path)
        if path.endswith(".parquet"):
            with fs.open(path, "rb") as handle:
                column = pq.read_table(handle, columns=[columns.URL]).column(0).cast(pa.string())
        else:
            column = read_source_file(fs, path, columns, file.path).column("URL")
        urls.append(column)
        base[file] = offset
        offset += file.rows
    table = pa.table({"url": pa.chunked_array([c for u in urls for c in u.chunks], pa.string()),
                      "row": pa.array(np.arange(offset, dtype=np.int64))})
    table = table.filter(table.column("url").is_valid())
    first = table.group_by("url").aggregate([("row", "min")]).rename_columns(["url", "first"])
    repeated = table.join(first, "url")
    repeated = repeated.filter(pc.not_equal(repeated.column("row"), repeated.column("first")))
    if repeated.num_rows == 0:
        return specs
    starts = np.array([base[spec.file] + spec.start for spec in specs], dtype=np.int64)

    def locate(row: int) -> tuple[int, str]:
        k = int(np.searchsorted(starts, row, side="right")) - 1
        return k, f"{specs[k].file.name}/{row - base[specs[k].file]}"

    marks: dict[int, list[tuple[str, str]]] = {}
    for row, first_row in zip(repeated.column("row").to_pylist(), repeated.column("first").to_pylist()):
        (shard, sample_id), (first_shard, first_id) = locate(row), locate(first_row)
        if shard != first_shard:  # within a shard, download_shard finds it (after its own checks)
            marks.setdefault(shard, []).append((sample_id, first_id))
    return [replace(spec, duplicate_of=tuple(sorted(marks[k]))) if k in marks else spec
            for k, spec in enumerate(specs)]


def shard_rows(spec: ShardSpec, columns: SourceColumns) -> pa.Table:
    """The canonical source rows of a shard, with their sample_id ('<file name>/<row>')."""
    fs, path = fsspec.core.url_to_fs(spec.file.path)
    table = read_source_file(fs, path, columns, spec.file.path).slice(spec.start, spec.stop - spec.start)
    ids = pa.array([f"{spec.file.name}/{i}" for i in range(spec.start, spec.stop)], pa.string())
    table = table.append_column("sample_id", ids)
    if spec.rows is not None:
        wanted = set(spec.rows)
        mask = pa.array([sid in wanted for sid in ids.to_pylist()])
        table = table.filter(mask)
    return table


