"""A small bootstrap whose reports are written by the real code: images/ as ingest commits them,
scores/ in the real schema, the real select stage, filter report and bootstrap report.

Round 0 (`r0`) has CLIP scores only (no ITM scorer: its ITM column is NULL); round 1 (`r1`) has
both. Select keeps the top-1 caption per image, so drops include `not_top_k` and `empty_caption`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.bootstrap_report import write_bootstrap_report
from pipeline.filter_report import write_filter_report
from pipeline.run_store import RunStore, ShardCounts
from pipeline import select
from pipeline.select import SelectConfig
from schemas import IMAGES, SCORES
from tests.caption_helpers import commit_image_shards

EVALUATIONS = {
    "raw-r0": {"retrieval": {"itm": {"text_to_image": {"r1": 0.30, "r5": 0.70}}}, "captioning": {"bleu4": 0.12, "cider": 0.5}},
    "capfilt-r1": {"retrieval": {"itm": {"text_to_image": {"r1": 0.25, "r5": 0.66}}}, "captioning": {"bleu4": 0.10, "cider": 0.4},
                   "filter": {"all": {"precision": 0.4, "kept": 800, "kept_correct": 320, "pairs": 2000},
                              "web": {"precision": 0.8, "kept": 8, "kept_correct": 6},
                              "synthetic": {"precision": 7 / 792, "kept": 792, "kept_correct": 7}}},
    "oracle": {"retrieval": {"itm": {"text_to_image": {"r1": 0.50, "r5": 0.90}}}, "captioning": {"bleu4": 0.3, "cider": 1.2}},
}

# the captioner round 1 wrote its synthetic captions with, evaluated on its own
CAPTIONERS = {"captioner-of-r1": {"captioning": {"bleu4": 0.41, "cider": 2.2, "images": 600},
                                  "attributes": {"attribute_accuracy": 0.8125, "exact_match": 0.25}}}


def commit_scores(store: RunStore, with_itm: bool, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for shard in store.shards("images"):
        images = store.read_shard("images", shard, IMAGES)
        rows = []
        for sid, caption in zip(images.column("sample_id").to_pylist(), images.column("caption").to_pylist()):
            texts = [("web", caption), ("synthetic", caption), ("synthetic", "a thing"), ("synthetic", "")]
            for i, (source, text) in enumerate(texts):
                rows.append({"sample_id": sid, "caption_id": f"{sid}#{i}", "caption_source": source, "caption": text,
                             "clip_score": float(rng.uniform(0.1, 0.4)),
                             "itm_score": float(rng.uniform(0, 1)) if with_itm else None})
        store.commit_shard("score", shard, "test-score", outputs={"scores": (SCORES, pa.Table.from_pylist(rows))},
                           counts=ShardCounts(rows_in=len(rows), kept=len(rows)))


def make_round(root: Path, run: str, with_itm: bool) -> RunStore:
    store = RunStore(str(root), run)
    commit_image_shards(store, {"s0": 5, "s1": 4})
    commit_scores(store, with_itm)
    select.run(store, SelectConfig(policies=("blip2",), top_k=1))
    write_filter_report(store, samples=3)
    return store


def make_models(root: Path, arms: list[str]) -> dict[str, str]:
    models = {}
    for n, arm in enumerate(arms):
        folder = root / "models" / arm
        (folder / "stage1").mkdir(parents=True)
        records = [{"step": s, "itc": 2.0 / (s + 1) + n, "itm": 0.7 - s / 100, "itg": 3.0 - s / 10} for s in range(0, 20, 5)]
        (folder / "stage1" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
        models[arm] = str(folder)
    return models


def make_bootstrap(root: Path) -> dict:
    """The whole small bootstrap; returns the report pages and the stores."""
    r0 = make_round(root, "r0", with_itm=False)
    r1 = make_round(root, "r1", with_itm=True)
    models = make_models(root, list(EVALUATIONS))
    index = write_bootstrap_report(str(root), "boot", "r1", models, EVALUATIONS, notes=["a small test bootstrap"],
                                   captioners=CAPTIONERS)
    return {"index": index, "filter_r0": root / "runs" / "r0" / "report" / "filter.html",
            "filter_r1": root / "runs" / "r1" / "report" / "filter.html", "r0": r0, "r1": r1}
