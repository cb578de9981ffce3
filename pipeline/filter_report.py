"""Filter report: what the select stage kept and why it dropped the rest, one page per run.

Writes into the run's report folder `filter.html` (from pipeline/templates/filter.html),
`style.css`, `filter_reasons.json` (the numbers), `scores_hist.png` (CLIP and ITM scores, web vs
synthetic; a score no scorer produced gets a note, not an empty panel) and `samples/*.jpg`, the
thumbnails of pairs drawn at random (seeded) per outcome: kept, and each drop reason present.

Everything is streamed from the run's Parquet in record batches of the columns needed; only
the drawn samples' image bytes are kept, so the report's memory does not grow with the run.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc

from pipeline.curated import iter_batches
from pipeline.report_html import png, render, stylesheet
from pipeline.run_store import RunStore

SOURCES = ("web", "synthetic", "oracle")
SCORE_COLUMNS = (("clip_score", "CLIP score"), ("itm_score", "ITM match probability"))
THUMBNAIL = 192  # px, longest side of a sample's thumbnail


def rejected_files(store: RunStore, stage: str) -> list[str]:
    folder = f"{store.run_path}/rejected/{stage}"
    if not store.fs.exists(folder):
        return []
    return sorted(p for p in store.fs.ls(folder, detail=False)
                  if p.rsplit("/", 1)[-1].endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith("."))


def iter_rejected(store: RunStore, stage: str, columns: list[str], batch_rows: int = 4096):
    import pyarrow.parquet as pq

    for path in rejected_files(store, stage):
        with store.fs.open(path, "rb") as handle:
            yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_rows, columns=columns)


class Reservoir:
    """A uniform random sample of at most `size` items of a stream (Algorithm R), seeded."""

    def __init__(self, size: int, rng: random.Random):
        self.size, self.rng, self.seen, self.items = size, rng, 0, []

    def offer(self, item) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.size:
                self.items[j] = item


@dataclass
class Histogram:
    """Counts of a score per caption source on fixed bins, accumulated batch by batch."""

    edges: np.ndarray
    counts: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, source: str, values: np.ndarray) -> None:
        if len(values):
            counts, _ = np.histogram(np.clip(values, self.edges[0], self.edges[-1]), bins=self.edges)
            self.counts[source] = self.counts.get(source, 0) + counts


def _values(batch, column: str) -> np.ndarray:
    return batch.column(column).to_numpy(zero_copy_only=False).astype(float)


def score_histograms(store: RunStore, bins: int = 30) -> tuple[bytes | None, list[str]]:
    """(PNG of one panel per score column that has values, notes on the columns that have none).

    Two passes over scores/: the range of each column, then counts on fixed bins.
    """
    import matplotlib.pyplot as plt

    columns = [c for c, _ in SCORE_COLUMNS]
    low, high = {c: np.inf for c in columns}, {c: -np.inf for c in columns}
    for _, batch in iter_batches(store, "scores", columns):
        for c in columns:
            v = _values(batch, c)
            v = v[~np.isnan(v)]
            if len(v):
                low[c], high[c] = min(low[c], v.min()), max(high[c], v.max())
    present = [c for c in columns if np.isfinite(low[c])]
    notes = [f"No {label} in this run (no such scorer ran), so no {label} histogram." for c, label in SCORE_COLUMNS
             if c not in present]
    if not present:
        return None, notes
    hists = {c: Histogram(np.linspace(low[c], high[c] if high[c] > low[c] else low[c] + 1e-6, bins + 1)) for c in present}
    for _, batch in iter_batches(store, "scores", ["caption_source", *present]):
        sources = np.asarray(batch.column("caption_source").to_pylist(), dtype=object)
        for c in present:
            v = _values(batch, c)
            for source in set(sources.tolist()):
                chosen = v[(sources == source) & ~np.isnan(v)]
                hists[c].add(source, chosen)
    fig, axes = plt.subplots(1, len(present), figsize=(5.2 * len(present), 3.6), squeeze=False, layout="constrained")
    colors = {"web": "tab:blue", "synthetic": "tab:orange", "oracle": "tab:gray"}
    labels = dict(SCORE_COLUMNS)
    for ax, c in zip(axes[0], present):
        h = hists[c]
        width = h.edges[1] - h.edges[0]
        for source, counts in sorted(h.counts.items()):
            ax.bar(h.edges[:-1], counts, width=width, align="edge", alpha=0.55, color=colors.get(source),
                   label=f"{source} ({int(counts.sum()):,} captions)")
        ax.set_title(labels[c])
        ax.set_xlabel(labels[c])
        ax.set_ylabel("captions")
        ax.legend(title="caption source", fontsize=8)
    return png(fig), notes


def thumbnail(data: bytes) -> bytes | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            scale = THUMBNAIL / max(img.size)
            if scale < 1:
                img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
            buffer = io.BytesIO()
            img.save(buffer, format="JPEG", quality=88)
            return buffer.getvalue()
    except Exception:  # noqa: BLE001 - an undecodable image is shown as "not available", not a crash
        return None


def _image_bytes(store: RunStore, wanted: set[str]) -> dict[str, bytes]:
    """Bytes of the `wanted` images only, from images/ (or curated_images/ for runs never ingested)."""
    found: dict[str, bytes] = {}
    artifact = "images" if store.shards("images") else "curated_images"
    for _, batch in iter_batches(store, artifact, ["sample_id", "image"], batch_rows=256):
        ids = batch.column("sample_id").to_pylist()
        hits = [i for i, sid in enumerate(ids) if sid in wanted and sid not in found]
        if not hits:
            continue
        images = batch.column("image")
        if artifact == "curated_images":
            images = pc.struct_field(images, "bytes")
        for i in hits:
            found[ids[i]] = images[i].as_py()
        if len(found) == len(wanted):
            break
    return found


def write_filter_report(store: RunStore, samples: int = 6, seed: int = 0) -> dict:
    """Write the filter report files for a run; returns the numbers (filter_reasons.json)."""
    rng = random.Random(seed)
    scored, kept = Counter(), Counter()
    sums = {source: {"clip_score": [0.0, 0], "itm_score": [0.0, 0]} for source in SOURCES}
    score_of: dict[str, dict] = {}
    for _, batch in iter_batches(store, "scores", ["caption_source"]):
        scored.update(batch.column("caption_source").to_pylist())
    kept_pool = Reservoir(samples, rng)
    columns = ["sample_id", "caption_id", "caption", "caption_source", "clip_score", "itm_score"]
    for _, batch in iter_batches(store, "curated", columns):
        for row in batch.to_pylist():
            kept[row["caption_source"]] += 1
            for c in ("clip_score", "itm_score"):
                if row[c] is not None:
                    acc = sums.setdefault(row["caption_source"], {}).setdefault(c, [0.0, 0])
                    acc[0] += row[c]
                    acc[1] += 1
            kept_pool.offer({**row, "outcome": "kept", "reason": None, "message": None})
    reasons: Counter = Counter()
    dropped_pools: dict[str, Reservoir] = {}
    for batch in iter_rejected(store, "select", ["sample_id", "caption_id", "caption", "reason", "error_message"]):
        for row in batch.to_pylist():
            reasons[row["reason"]] += 1
            pool = dropped_pools.setdefault(row["reason"], Reservoir(samples, random.Random(f"{seed}/{row['reason']}")))
            message = row.pop("error_message")
            pool.offer({**row, "outcome": "dropped", "message": message})
    # Scores and sources of the drawn dropped pairs (rejected/ keeps neither).
    wanted = {s["caption_id"] for pool in dropped_pools.values() for s in pool.items}
    if wanted:
        for _, batch in iter_batches(store, "scores", ["caption_id", "caption_source", "clip_score", "itm_score"]):
            for row in batch.to_pylist():
                if row["caption_id"] in wanted:
                    score_of[row["caption_id"]] = row
    total = sum(scored.values())
    dropped_total = sum(reasons.values())
    kept_total = sum(kept.values())
    by_source = []
    for source in [s for s in SOURCES if scored.get(s) or kept.get(s)] + ["all"]:
        n, k = (total, kept_total) if source == "all" else (scored.get(source, 0), kept.get(source, 0))
        means = {}
        for c in ("clip_score", "itm_score"):
            parts = [sums[s][c] for s in SOURCES if s in sums] if source == "all" else [sums.get(source, {}).get(c, [0.0, 0])]
            s_, n_ = sum(p[0] for p in parts), sum(p[1] for p in parts)
            means[c] = s_ / n_ if n_ else None
        by_source.append({"source": source, "scored": n, "kept": k, "keep_rate": k / n if n else None,
                          "clip": means["clip_score"], "itm": means["itm_score"]})
    reason_rows = [{"reason": r, "count": c, "rate": c / total if total else None,
                    "share": c / dropped_total if dropped_total else None} for r, c in reasons.most_common()]
    table = {"captions": total, "kept": kept_total, "dropped": dropped_total,
             "keep_rate": kept_total / total if total else None,
             "kept_by_source": {r["source"]: {k: r[k] for k in ("scored", "kept", "keep_rate")} for r in by_source if r["source"] != "all"},
             "dropped_by_reason": {r["reason"]: {"count": r["count"], "rate": r["rate"]} for r in reason_rows}}

    report = store.report_dir()
    groups = [("Kept", "kept", kept_pool, kept_total)]
    groups += [(f"Dropped: {reason}", reason, dropped_pools[reason], count) for reason, count in reasons.most_common()]
    drawn = [s for _, _, pool, _ in groups for s in pool.items]
    images = _image_bytes(store, {s["sample_id"] for s in drawn})
    if store.fs.exists(f"{report}/samples"):
        store.fs.rm(f"{report}/samples", recursive=True)  # thumbnails of an earlier draw would linger
    store.fs.makedirs(f"{report}/samples", exist_ok=True)
    sample_groups = []
    for n, (title, key, pool, count) in enumerate(groups):
        items = []
        for i, s in enumerate(pool.items):
            s = {**s, **{k: v for k, v in score_of.get(s["caption_id"], {}).items() if k != "caption_id"}}
            s.setdefault("caption_source", "unknown")
            s.setdefault("clip_score", None)
            s.setdefault("itm_score", None)
            thumb = thumbnail(images[s["sample_id"]]) if s["sample_id"] in images else None
            s["image"] = None
            if thumb:
                name = f"samples/{n:02d}-{i:02d}.jpg"
                with store.fs.open(f"{report}/{name}", "wb") as handle:
                    handle.write(thumb)
                s["image"] = name
            items.append(s)
        sample_groups.append({"title": title, "key": key, "cards": items, "shown": len(items), "total": count})

    hist, notes = score_histograms(store)
    if hist is not None:
        with store.fs.open(f"{report}/scores_hist.png", "wb") as handle:
            handle.write(hist)
    elif store.fs.exists(f"{report}/scores_hist.png"):
        store.fs.rm(f"{report}/scores_hist.png")  # a stale plot from an earlier run would mislead
    histograms = {"file": "scores_hist.png" if hist is not None else None,
                  "alt": "histograms of CLIP and ITM scores, web vs synthetic captions", "notes": notes}
    with store.fs.open(f"{report}/filter_reasons.json", "w") as handle:
        json.dump(table, handle, indent=1)
    top = reason_rows[0] if reason_rows else None
    verdict = (f"Kept {kept_total:,} of {total:,} scored captions ({_pct(table['keep_rate'])}); "
               + ", ".join(f"{r['source']} {r['kept']:,} of {r['scored']:,} ({_pct(r['keep_rate'])})"
                           for r in by_source if r["source"] != "all")
               + (f". Most drops: {top['reason']} ({top['count']:,}, {_pct(top['share'])} of dropped)." if top else "."))
    page = render("filter.html", run=store.run_id, verdict=verdict, by_source=by_source, reasons=reason_rows,
                  histograms=histograms, samples=sample_groups, seed=seed, per_group=samples)
    with store.fs.open(f"{report}/filter.html", "w") as handle:
        handle.write(page)
    with store.fs.open(f"{report}/style.css", "w") as handle:
        handle.write(stylesheet())
    return table


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"
