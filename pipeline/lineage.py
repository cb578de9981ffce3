"""Lineage: which run, thresholds and models produced a curated dataset.

A trainer resolves the curated data of a run (`capfilt train ... --from-run RUN`, the `train`
flow) through `curated_lineage`, and records the result in its checkpoint, so a model can always
say what data made it: the run, how many pairs, the captioners and their decoding, the CLIP and
ITM models, the selection policy and its thresholds, and the capfilt version of each stage.
"""

from __future__ import annotations

import json

import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt.errors import ConfigError
from pipeline.curated import iter_batches
from pipeline.run_store import RunStore


def _distinct(values: list) -> list:
    seen: list = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


def _absolute(root: str) -> str:
    """A root other processes and machines can resolve: a URI as given, a local path made absolute."""
    import os

    return root if "://" in root else os.path.abspath(root)


def _rows(store: RunStore, artifact: str) -> int:
    total = 0
    for shard in store.shards(artifact):
        with store.fs.open(store.shard_path(artifact, shard), "rb") as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def curated_lineage(root: str, run: str) -> dict:
    """The lineage of `run`'s curated/ data; ConfigError when the run has none to train on."""
    store = RunStore(root, run)
    selected = [r for r in store.records("select") if r.status == "done"]
    if not store.shards("curated"):
        hint = "its filter stage has not finished" if store.records() else "no such run"
        raise ConfigError(
            f"run '{run}' under {root} has no curated/ data ({hint}); run `capfilt filter` or "
            f"`capfilt curate` for it first, or check --root and --run/--from-run."
        )
    # Streamed, three small columns: lineage must not hold a LAION-scale table in memory.
    pairs, provenance_json, sources = 0, [], {}
    for _, batch in iter_batches(store, "curated", ["caption_source", "provenance"]):
        pairs += batch.num_rows
        for p in pc.unique(batch.column("provenance").drop_null()).to_pylist():
            if p not in provenance_json:
                provenance_json.append(p)
        for row in batch.column("caption_source").value_counts().to_pylist():
            sources[row["values"]] = sources.get(row["values"], 0) + row["counts"]
    provenance = [json.loads(p) for p in provenance_json]
    captions = [r.extra for r in store.records("caption") if r.status == "done"]
    return {
        "root": _absolute(root),
        "run": run,
        "curated_pairs": pairs,
        "curated_images": _rows(store, "curated_images"),  # one row per image: the files' footers say it
        "caption_sources": sources,
        "captioners": _distinct([{"captioner": c.get("captioner"), "decoding": c.get("decoding")} for c in captions]),
        "filter": provenance,
        "select_config_hashes": sorted({r.config_hash for r in selected}),
        "ingested_rows": sum(r.rows_in for r in store.records("ingest") if r.status == "done"),
    }
