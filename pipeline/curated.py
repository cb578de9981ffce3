"""Reading a run's curated data without holding it: batches with column projection, images on demand.

At LAION scale curated/ and curated_images/ do not fit in one process. Readers here stream
record batches of the columns asked for, shard by shard, and a trainer's random access to an
image reads only the Parquet row group that holds it (curated_images/ is written in small row
groups for this), so memory does not grow with the data.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.run_store import RunStore

BATCH_ROWS = 4096


def iter_batches(store: RunStore, artifact: str, columns: list[str], batch_rows: int = BATCH_ROWS,
                 shards: list[str] | None = None) -> Iterator[tuple[str, pa.RecordBatch]]:
    """(shard, batch) of `columns` for every shard of `artifact`, in shard order; columns a shard
    lacks (older files, optional columns) come back as nulls."""
    for shard in shards if shards is not None else store.shards(artifact):
        with store.fs.open(store.shard_path(artifact, shard), "rb") as handle:
            parquet = pq.ParquetFile(handle)
            present = [c for c in columns if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=present):
                if len(present) < len(columns):
                    arrays = [batch.column(c) if c in present else pa.nulls(batch.num_rows) for c in columns]
                    batch = pa.RecordBatch.from_arrays(arrays, names=columns)
                yield shard, batch


def read_columns(store: RunStore, artifact: str, columns: list[str]) -> pa.Table:
    """Only `columns` of every shard of `artifact`, as one table (small columns only: no image bytes)."""
    batches = [b for _, b in iter_batches(store, artifact, columns)]
    if not batches:
        return pa.table({c: pa.array([], pa.null()) for c in columns})
    return pa.Table.from_batches(batches)


@dataclass(frozen=True)
class ImageRef:
    """Where one curated image's bytes live: a curated_images/ file, its row group and row."""

    uri: str
    row_group: int
    row: int

    def read(self) -> bytes:
        return _SHELF.row_group(self.uri, self.row_group)[self.row]


class _RowGroupShelf:
    """The last few row groups read, per process (file handles must not be shared across a fork)."""

    def __init__(self, keep: int = 8):
        self.keep, self.pid = keep, None
        self.groups: OrderedDict[tuple[str, int], list[bytes]] = OrderedDict()
        self.files: dict[str, pq.ParquetFile] = {}

    def row_group(self, uri: str, index: int) -> list[bytes]:
        if self.pid != os.getpid():
            self.pid, self.groups, self.files = os.getpid(), OrderedDict(), {}
        key = (uri, index)
        if key in self.groups:
            self.groups.move_to_end(key)
            return self.groups[key]
        if uri not in self.files:
            import fsspec

            fs, path = fsspec.core.url_to_fs(uri)
            self.files[uri] = pq.ParquetFile(fs.open(path, "rb"))
        column = self.files[uri].read_row_group(index, columns=["image"]).column("image")
        data = column.combine_chunks().field("bytes").to_pylist()
        self.groups[key] = data
        while len(self.groups) > self.keep:
            self.groups.popitem(last=False)
        return data


_SHELF = _RowGroupShelf()


def image_index(store: RunStore, columns: list[str]) -> Iterator[tuple[dict, ImageRef]]:
    """(row of `columns`, where its image is) for every curated image, without reading image bytes."""
    for shard in store.shards("curated_images"):
        uri = store.uri(store.shard_path("curated_images", shard))
        with store.fs.open(store.shard_path("curated_images", shard), "rb") as handle:
            parquet = pq.ParquetFile(handle)
            for group in range(parquet.num_row_groups):
                rows = parquet.read_row_group(group, columns=columns).to_pylist()
                for i, row in enumerate(rows):
                    yield row, ImageRef(uri, group, i)
