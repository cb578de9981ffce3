"""Lineage: which run, thresholds and models produced a curated dataset.

A trainer resolves the curated data of a run (`capfilt train ... --from-run RUN`, the `train`
flow) through `curated_lineage`, and records the result in its checkpoint, so a model can always
say what data made it: the run, how many pairs, the captioners and their decoding, the CLIP and
ITM models, the selection policy and its thresholds, and the capfilt version of each stage.
"""

from __future__ import annotations

import json

import pyarrow.compute as pc

from capfilt.errors import ConfigError
from pipeline.run_store import RunStore
from schemas import CURATED


def _distinct(values: list) -> list:
    seen: list = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


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
    table = store.read("curated", CURATED).select(["sample_id", "caption_source", "provenance"])
    provenance = [json.loads(p) for p in _distinct(table.column("provenance").drop_null().to_pylist())]
    sources = table.column("caption_source").value_counts().to_pylist()
    captions = [r.extra for r in store.records("caption") if r.status == "done"]
    return {
        "root": root,
        "run": run,
        "curated_pairs": table.num_rows,
        "curated_images": len(pc.unique(table.column("sample_id"))),
        "caption_sources": {row["values"]: row["counts"] for row in sources},
        "captioners": _distinct([{"captioner": c.get("captioner"), "decoding": c.get("decoding")} for c in captions]),
        "filter": provenance,
        "select_config_hashes": sorted({r.config_hash for r in selected}),
        "ingested_rows": sum(r.rows_in for r in store.records("ingest") if r.status == "done"),
    }
