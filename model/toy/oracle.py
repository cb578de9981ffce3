"""The oracle: what training would get with perfect captions (a world's true captions)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from capfilt.errors import ConfigError


def write_oracle_run(ground_truth: str | Path, root: str, from_run: str, run: str) -> dict:
    """Curate `run` from `from_run`'s ingested images with their TRUE captions (synthetic worlds).

    One curated row per image whose URL the ground truth knows (caption_source 'oracle'); an
    image it does not know is dropped with reason `no_ground_truth`. Returns the counts.
    """
    from pipeline.run_store import RunStore, ShardCounts
    from schemas import IMAGES, REJECTED, curated_outputs
    from schemas.curated import IMAGE_METADATA

    try:
        truth = pq.read_table(ground_truth, columns=["url", "true_caption", "kind"])
    except (OSError, KeyError, ValueError) as exc:  # missing file, not Parquet, or without these columns
        raise ConfigError(f"ground truth {ground_truth}: cannot be read as a world's ground_truth.parquet with url, "
                          f"true_caption and kind ({type(exc).__name__}: {exc}); give the ground_truth.parquet "
                          f"that `capfilt synth` wrote next to the world.") from exc
    caption_of = {u: c for u, c, k in zip(*(truth.column(n).to_pylist() for n in ("url", "true_caption", "kind")))
                  if k == "image" and c}
    source, target = RunStore(root, from_run), RunStore(root, run)
    shards = [r.shard for r in source.records("ingest") if r.status == "done"]
    if not shards:
        raise ConfigError(f"run '{from_run}' under {root} has no ingested images; run `capfilt ingest` first.")
    provenance = json.dumps({"run_id": run, "oracle": True, "ground_truth": str(ground_truth), "images_from": from_run})
    totals = {"images": 0, "kept": 0, "dropped": 0}
    for shard in shards:
        images = source.read_shard("images", shard, IMAGES)
        kept, dropped = [], []
        for row in images.select(["sample_id", "image", "image_format", *IMAGE_METADATA]).to_pylist():
            caption = caption_of.get(row["url"])
            if caption is None:
                dropped.append(dict(stage="select", shard=shard, sample_id=row["sample_id"], url=row["url"],
                                    outcome="dropped", reason="no_ground_truth",
                                    error_message=f"{ground_truth} has no true caption for this URL"))
                continue
            kept.append({**row, "caption_id": f"{row['sample_id']}#oracle", "caption": caption,
                         "caption_source": "oracle", "rank": 0, "run_id": run, "provenance": provenance})
        target.commit_shard(
            "select", shard, "oracle", outputs=curated_outputs(kept),
            counts=ShardCounts(rows_in=images.num_rows, kept=len(kept), rejected=len(dropped), rows_out=len(kept)),
            rejected=REJECTED.from_pylist(dropped) if dropped else None,
        )
        totals["images"] += images.num_rows
        totals["kept"] += len(kept)
        totals["dropped"] += len(dropped)
    return totals
