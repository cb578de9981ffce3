"""The run store: where a run's shards live, which are done, and the row-accounting invariant.

Layout under a root (a local path or any fsspec URI such as s3://bucket/prefix):

    <root>/runs/<run_id>/<artifact>/<shard>.parquet        stage outputs (images, captions, ...)
    <root>/runs/<run_id>/rejected/<stage>/<shard>.parquet  dropped and failed rows of a stage
    <root>/runs/<run_id>/manifest/<stage>/<shard>.json     one record per (stage, shard)
    <root>/runs/<run_id>/report/                           stats, plots

A shard is the unit of work, retry and resume. Outputs are written under a hidden temporary
name and renamed when complete; the manifest record, written last, is the commit marker. A
shard whose record says `done` with the same config hash is skipped on rerun; anything else is
redone and its files replaced (never appended to).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

import capfilt
from capfilt.errors import AccountingError, ConfigError
from schemas import MANIFEST, REJECTED, ArtifactSchema

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def config_hash(config: Any) -> str:
    """A short stable hash of a stage config (dataclass, pydantic model, dict or scalar)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
        if hasattr(value, "model_dump"):
            return plain(value.model_dump())
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        return repr(value)

    blob = json.dumps(plain(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def new_run_id() -> str:
    """A fresh, sortable run id: UTC time plus a short random suffix."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


@dataclass
class ShardCounts:
    """Row accounting of one (stage, shard): rows_in must equal kept + rejected + failed."""

    rows_in: int
    kept: int
    rejected: int = 0
    failed: int = 0
    rows_out: int | None = None

    def check(self, stage: str, shard: str) -> None:
        total = self.kept + self.rejected + self.failed
        if total != self.rows_in:
            raise AccountingError(
                f"stage '{stage}' shard '{shard}': rows in = {self.rows_in} but kept "
                f"{self.kept} + rejected {self.rejected} + failed {self.failed} = {total}; "
                f"{'rows were lost' if total < self.rows_in else 'rows were counted twice'}. "
                f"This is a capfilt bug: please report it with the run folder."
            )


@dataclass
class ManifestRecord:
    stage: str
    shard: str
    status: str
    config_hash: str
    rows_in: int | None = None
    kept: int | None = None
    rejected: int | None = None
    failed: int | None = None
    rows_out: int | None = None
    attempt: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    duration_s: float | None = None
    error: str | None = None
    capfilt_version: str = capfilt.__version__
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


RUN_ID_RULE = "use letters, digits, '.', '_' and '-' (at most 128, starting with a letter or digit)"


def check_run_id(run_id: str) -> str:
    """The one rule for run ids (they name folders on any filesystem); ConfigError otherwise."""
    if not _RUN_ID.match(run_id or ""):
        raise ConfigError(f"run id {run_id!r} is not valid: {RUN_ID_RULE}.")
    return run_id


def open_location(location: str, option: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) of a local path or fsspec URI given as `option`; one line if it cannot be opened."""
    try:
        return fsspec.core.url_to_fs(location)
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"{option} {location!r}: cannot open this location ({exc}); give a local path or an "
                          f"fsspec URI.") from exc


def list_files(location: str, suffixes: tuple[str, ...], option: str, what: str
               ) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    """(filesystem, path of `location`, the files): `location` itself when it is a file, else every file
    under it ending in one of `suffixes` (hidden and `_` files left out), sorted. A missing location, an
    empty folder or another kind of file is one line naming `option`, with `what` to give instead."""
    fs, root = open_location(location, option)
    kinds = ", ".join(suffixes)
    if not fs.exists(root):
        raise ConfigError(f"{option} {location}: no such file or folder; give {what}.")
    if not fs.isdir(root):
        if not root.endswith(suffixes):
            raise ConfigError(f"{option} {location}: expected a {kinds} file or a folder of them.")
        return fs, root, [root]
    files = sorted(p for p in fs.find(root) if p.endswith(suffixes) and not p.rsplit("/", 1)[-1].startswith((".", "_")))
    if not files:
        raise ConfigError(f"{option} {location}: the folder holds no {kinds} files; give {what}.")
    return fs, root, files


class RunStore:
    """Reads and writes the shards and manifest of one run under a root."""

    def __init__(self, root: str, run_id: str):
        check_run_id(run_id)
        self.root = str(root)
        self.run_id = run_id
        self.fs, root_path = open_location(self.root, "--root")
        self.run_path = f"{root_path.rstrip('/')}/runs/{run_id}"

    # -- paths -----------------------------------------------------------------------------
    def uri(self, path: str) -> str:
        """A path of this store's filesystem as a URI other libraries (Ray, DuckDB) accept."""
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        return path if {"file", "local"} & set(protocols) else self.fs.unstrip_protocol(path)

    def artifact_dir(self, artifact: str) -> str:
        return f"{self.run_path}/{artifact}"

    def shard_path(self, artifact: str, shard: str) -> str:
        return f"{self.run_path}/{artifact}/{shard}.parquet"

    def rejected_path(self, stage: str, shard: str) -> str:
        return f"{self.run_path}/rejected/{stage}/{shard}.parquet"

    def manifest_path(self, stage: str, shard: str) -> str:
        return f"{self.run_path}/manifest/{stage}/{shard}.json"

    def report_dir(self) -> str:
        path = f"{self.run_path}/report"
        self.fs.makedirs(path, exist_ok=True)
        return path

    # -- manifest --------------------------------------------------------------------------
    def record(self, stage: str, shard: str) -> ManifestRecord | None:
        path = self.manifest_path(stage, shard)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as handle:
            data = json.load(handle)
        known = {f.name for f in dataclasses.fields(ManifestRecord)}
        return ManifestRecord(**{k: v for k, v in data.items() if k in known})

    def records(self, stage: str | None = None) -> list[ManifestRecord]:
        base = f"{self.run_path}/manifest"
        if not self.fs.exists(base):
            return []
        stages = [stage] if stage else sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False))
        out = []
        for name in stages:
            folder = f"{base}/{name}"
            if not self.fs.exists(folder):
                continue
            for path in sorted(self.fs.ls(folder, detail=False)):
                leaf = path.rsplit("/", 1)[-1]
                if leaf.endswith(".json") and not leaf.startswith("."):
                    record = self.record(name, leaf[: -len(".json")])
                    if record is not None:
                        out.append(record)
        return out

    def manifest_table(self, stage: str | None = None) -> pa.Table:
        rows = []
        for record in self.records(stage):
            row = dataclasses.asdict(record)
            row.pop("extra", None)
            rows.append(row)
        return MANIFEST.from_pylist(rows)

    def is_done(self, stage: str, shard: str, config_hash: str) -> bool:
        record = self.record(stage, shard)
        return record is not None and record.status == "done" and record.config_hash == config_hash

    def _write_record(self, record: ManifestRecord) -> None:
        self._write_atomic(self.manifest_path(record.stage, record.shard), record.to_json().encode())

    def start_shard(self, stage: str, shard: str, config_hash: str) -> ManifestRecord:
        previous = self.record(stage, shard)
        record = ManifestRecord(
            stage=stage,
            shard=shard,
            status="running",
            config_hash=config_hash,
            attempt=(previous.attempt if previous else 0) + 1,
            started_at=time.time(),
        )
        self._write_record(record)
        return record

    def commit_shard(
        self,
        stage: str,
        shard: str,
        config_hash: str,
        outputs: dict[str, tuple[ArtifactSchema, pa.Table]],
        counts: ShardCounts,
        rejected: pa.Table | None = None,
        extra: dict | None = None,
    ) -> ManifestRecord:
        """Check accounting, write outputs and rejected rows atomically, then mark the shard done.

        `outputs` maps an artifact folder name to (schema, table); each table is validated and
        conformed to its schema before it is written.
        """
        counts.check(stage, shard)
        for artifact, (schema, table) in outputs.items():
            conformed = schema.conform(table, where=f"stage '{stage}' shard '{shard}' output '{artifact}'")
            self.write_table(self.shard_path(artifact, shard), conformed, schema.row_group_rows)
        if rejected is None:
            rejected = REJECTED.empty()
        rejected = REJECTED.conform(rejected, where=f"stage '{stage}' shard '{shard}' rejected rows")
        self.write_table(self.rejected_path(stage, shard), rejected)
        previous = self.record(stage, shard)
        started = previous.started_at if previous and previous.status == "running" else None
        finished = time.time()
        record = ManifestRecord(
            stage=stage,
            shard=shard,
            status="done",
            config_hash=config_hash,
            rows_in=counts.rows_in,
            kept=counts.kept,
            rejected=counts.rejected,
            failed=counts.failed,
            rows_out=counts.rows_out if counts.rows_out is not None else counts.kept,
            attempt=previous.attempt if previous else 1,
            started_at=started,
            finished_at=finished,
            duration_s=(finished - started) if started else None,
            extra=extra or {},
        )
        self._write_record(record)
        return record

    def adopt_shard(self, other: "RunStore", stage: str, shard: str, artifacts: tuple[str, ...],
                    config_hash: str, extra: dict | None = None) -> ManifestRecord:
        """Take a done (stage, shard) of another run of the same root as this run's own: its output
        files and rejected rows are linked (a hard link on a local disk, a server-side copy on
        object storage), then its manifest record is written here, counts and all."""
        source = other.record(stage, shard)
        if source is None or source.status != "done":
            raise ConfigError(f"run '{other.run_id}' has no finished '{stage}' shard '{shard}' to reuse.")
        paths = [(other.shard_path(a, shard), self.shard_path(a, shard)) for a in artifacts]
        paths.append((other.rejected_path(stage, shard), self.rejected_path(stage, shard)))
        for src, dst in paths:
            if self.fs.exists(src):
                self._link_atomic(src, dst)
        record = dataclasses.replace(source, config_hash=config_hash, extra={**(source.extra or {}), **(extra or {})})
        self._write_record(record)
        return record

    def _link_atomic(self, src: str, dst: str) -> None:
        folder, name = dst.rsplit("/", 1)
        self.fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        if "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)):
            try:
                os.link(src, tmp)  # no second copy of the bytes on a local disk
            except OSError:
                self.fs.copy(src, tmp)
        else:
            self.fs.copy(src, tmp)
        self.fs.mv(tmp, dst)

    def fail_shard(self, stage: str, shard: str, config_hash: str, error: str) -> ManifestRecord:
        previous = self.record(stage, shard)
        record = ManifestRecord(
            stage=stage,
            shard=shard,
            status="failed",
            config_hash=config_hash,
            attempt=previous.attempt if previous else 1,
            started_at=previous.started_at if previous else None,
            finished_at=time.time(),
            error=error,
        )
        self._write_record(record)
        return record

    # -- tables ----------------------------------------------------------------------------
    def write_table(self, path: str, table: pa.Table, row_group_rows: int | None = None) -> None:
        """Write a Parquet file under a hidden temporary name, then rename it into place."""
        folder, name = path.rsplit("/", 1)
        self.fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "wb") as handle:
            pq.write_table(table, handle, compression="zstd", row_group_size=row_group_rows)
        self.fs.mv(tmp, path)

    def _write_atomic(self, path: str, data: bytes) -> None:
        folder, name = path.rsplit("/", 1)
        self.fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "wb") as handle:
            handle.write(data)
        self.fs.mv(tmp, path)

    def shards(self, artifact: str) -> list[str]:
        """Shard ids present in an artifact folder (complete files only)."""
        folder = self.artifact_dir(artifact)
        if not self.fs.exists(folder):
            return []
        names = []
        for path in self.fs.ls(folder, detail=False):
            leaf = path.rsplit("/", 1)[-1]
            if leaf.endswith(".parquet") and not leaf.startswith("."):
                names.append(leaf[: -len(".parquet")])
        return sorted(names)

    def read_shard(self, artifact: str, shard: str, schema: ArtifactSchema | None = None) -> pa.Table:
        path = self.shard_path(artifact, shard)
        with self.fs.open(path, "rb") as handle:
            table = pq.read_table(handle)
        if schema is not None:
            table = schema.conform(table, where=self.uri(path))
        return table

    def read(self, artifact: str, schema: ArtifactSchema | None = None, shards: Iterable[str] | None = None) -> pa.Table:
        """All shards of an artifact as one table (empty table of `schema` when none)."""
        wanted = list(shards) if shards is not None else self.shards(artifact)
        tables = [self.read_shard(artifact, s, schema) for s in wanted]
        if not tables:
            return schema.empty() if schema is not None else pa.table({})
        return pa.concat_tables(tables)

    def read_rejected(self, stage: str | None = None) -> pa.Table:
        base = f"{self.run_path}/rejected"
        stages = [stage] if stage else (
            sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)) if self.fs.exists(base) else []
        )
        tables = []
        for name in stages:
            folder = f"{base}/{name}"
            if not self.fs.exists(folder):
                continue
            for path in sorted(self.fs.ls(folder, detail=False)):
                leaf = path.rsplit("/", 1)[-1]
                if leaf.endswith(".parquet") and not leaf.startswith("."):
                    with self.fs.open(path, "rb") as handle:
                        tables.append(REJECTED.conform(pq.read_table(handle), where=path))
        return pa.concat_tables(tables) if tables else REJECTED.empty()


def stage_totals(store: RunStore) -> list[dict]:
    """Per stage: shards done/total and summed row counts from the manifest, with the keep rate."""
    totals: dict[str, dict] = {}
    for record in store.records():
        row = totals.setdefault(record.stage, {
            "stage": record.stage, "shards": 0, "done": 0, "rows_in": 0, "kept": 0,
            "rejected": 0, "failed": 0, "rows_out": 0,
        })
        row["shards"] += 1
        if record.status == "done":
            row["done"] += 1
            for key in ("rows_in", "kept", "rejected", "failed", "rows_out"):
                row[key] += getattr(record, key) or 0
    for row in totals.values():
        row["keep_rate"] = round(row["kept"] / row["rows_in"], 4) if row["rows_in"] else 0.0
    return list(totals.values())
