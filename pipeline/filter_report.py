"""Filter report: score histograms (web vs synthetic), keep rate per reason, a sample grid.

Writes into the run's report folder: `scores_hist.png`, `filter_reasons.json`,
`sample_grid.png` and `filter.html` (the grid and the tables, pairs shown with their captions).
"""

from __future__ import annotations

import base64
import html
import io
import json
import textwrap
from collections import Counter

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.run_store import RunStore  # noqa: E402
from schemas import CURATED, IMAGES, SCORES  # noqa: E402


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def score_histograms(scores) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    sources = np.array(scores.column("caption_source").to_pylist())
    for ax, column in zip(axes, ("clip_score", "itm_score")):
        values = np.array([np.nan if v is None else v for v in scores.column(column).to_pylist()], dtype=float)
        for source, color in (("web", "tab:blue"), ("synthetic", "tab:orange")):
            chosen = values[(sources == source) & ~np.isnan(values)]
            if len(chosen):
                ax.hist(chosen, bins=30, alpha=0.6, label=f"{source} ({len(chosen)})", color=color)
        ax.set_title(column)
        ax.legend()
    return _png(fig)


def sample_grid(pairs: list[dict], images: dict[str, bytes], columns: int = 4) -> bytes:
    rows = max(1, -(-len(pairs) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.8 * rows))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, pair in zip(np.atleast_1d(axes).ravel(), pairs):
        data = images.get(pair["sample_id"])
        if data:
            ax.imshow(Image.open(io.BytesIO(data)).convert("RGB"))
        verdict = "KEPT" if pair["reason"] is None else f"DROP: {pair['reason']}"
        caption = "\n".join(textwrap.wrap((pair["caption"] or "")[:90], 32)) or "(empty)"
        ax.set_title(f"{verdict}\n{caption}\nclip {pair['clip_score'] or 0:.2f} itm {pair['itm_score'] or 0:.2f}",
                     fontsize=7, color="green" if pair["reason"] is None else "red")
    return _png(fig)


def write_filter_report(store: RunStore, samples: int = 8) -> dict:
    """Write the filter report files for a run; returns the reason table."""
    scores = store.read("scores", SCORES)
    curated = store.read("curated", CURATED)
    rejected = store.read_rejected("select")
    reasons = Counter(rejected.column("reason").to_pylist())
    total = scores.num_rows
    table = {"captions": total, "kept": curated.num_rows, "keep_rate": curated.num_rows / total if total else 0.0,
             "dropped_by_reason": {k: {"count": v, "rate": v / total} for k, v in sorted(reasons.items())}}
    report = store.report_dir()
    hist = score_histograms(scores)
    # A sample of kept and dropped pairs, with their scores.
    score_of = {r["caption_id"]: r for r in scores.select(["caption_id", "clip_score", "itm_score"]).to_pylist()}
    kept = [{**r, "reason": None} for r in curated.select(["sample_id", "caption_id", "caption"]).to_pylist()[:samples]]
    dropped = [r for r in rejected.select(["sample_id", "caption_id", "caption", "reason"]).to_pylist()[:samples]]
    pairs = [{**p, **{k: score_of.get(p["caption_id"], {}).get(k) for k in ("clip_score", "itm_score")}} for p in kept + dropped]
    wanted = {p["sample_id"] for p in pairs}
    images = {}
    for shard in store.shards("images"):
        part = store.read_shard("images", shard, IMAGES).select(["sample_id", "image"])
        for sid, data in zip(part.column("sample_id").to_pylist(), part.column("image").to_pylist()):
            if sid in wanted:
                images[sid] = data
    grid = sample_grid(pairs, images)
    for name, data in (("scores_hist.png", hist), ("sample_grid.png", grid)):
        with store.fs.open(f"{report}/{name}", "wb") as handle:
            handle.write(data)
    with store.fs.open(f"{report}/filter_reasons.json", "w") as handle:
        json.dump(table, handle, indent=1)
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v['count']}</td><td>{v['rate']:.1%}</td></tr>"
                   for k, v in table["dropped_by_reason"].items())
    cards = "".join(
        f"<figure><img src='data:image/jpeg;base64,{base64.b64encode(images.get(p['sample_id'], b'')).decode()}' width=128>"
        f"<figcaption><b>{'kept' if p['reason'] is None else 'dropped: ' + html.escape(p['reason'])}</b><br>"
        f"{html.escape(p['caption'] or '')}<br>clip {p['clip_score'] or 0:.3f} itm {p['itm_score'] or 0:.3f}</figcaption></figure>"
        for p in pairs)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>capfilt filter report {html.escape(store.run_id)}</title>
<style>body{{font-family:sans-serif}} figure{{display:inline-block;width:180px;vertical-align:top}} td{{padding:2px 8px}}</style></head>
<body><h1>Filter report: run {html.escape(store.run_id)}</h1>
<p>{table['captions']} captions, {table['kept']} kept ({table['keep_rate']:.1%}).</p>
<h2>Dropped, by reason</h2><table><tr><th>reason</th><th>captions</th><th>share of all</th></tr>{rows}</table>
<h2>Scores, web vs synthetic</h2><img src="scores_hist.png">
<h2>Sample of kept and dropped pairs</h2>{cards}
<h2>Sample grid</h2><img src="sample_grid.png"></body></html>"""
    with store.fs.open(f"{report}/filter.html", "w") as handle:
        handle.write(page)
    return table
