"""Bootstrap report: one page for a whole bootstrap, `runs/<run>/report/index.html`.

Shows the funnel of the last CapFilt round (rows in -> downloaded -> captioned -> kept), that
round's score histograms and sample grid (from its filter report), the training curves of every
model, and the evaluation table (raw vs curated vs oracle). Also returns the summary rows the
terminal prints.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.filter_report import _png  # noqa: E402
from pipeline.run_store import RunStore, stage_totals  # noqa: E402


def funnel(store: RunStore) -> list[tuple[str, int]]:
    """(step, count) from a curated run's manifest: source rows, downloaded images, captioned images, kept pairs."""
    totals = {row["stage"]: row for row in stage_totals(store)}
    steps = [("source rows", totals.get("ingest", {}).get("rows_in", 0)),
             ("downloaded images", totals.get("ingest", {}).get("kept", 0)),
             ("captioned images", totals.get("caption", {}).get("kept", 0)),
             ("caption pairs", totals.get("caption", {}).get("rows_out", 0)),
             ("kept pairs", totals.get("select", {}).get("kept", 0))]
    return steps


def read_metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def training_curves(models: dict[str, Path]) -> bytes | None:
    """One panel per loss, one line per model (Stage 1 and Stage 2 losses)."""
    curves: dict[str, dict[str, tuple[list, list]]] = {}
    for name, folder in models.items():
        for stage in ("stage1", "stage2"):
            for record in read_metrics(folder / stage):
                for key in ("itc", "itm", "itg", "lm", "loss"):
                    if key in record and not (stage == "stage1" and key == "loss"):
                        label = f"{stage} {key}" if key == "loss" else key
                        xs, ys = curves.setdefault(label, {}).setdefault(name, ([], []))
                        xs.append(record["step"])
                        ys.append(record[key])
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3), squeeze=False)
    for ax, (label, lines) in zip(axes[0], sorted(curves.items())):
        for name, (xs, ys) in lines.items():
            ax.plot(xs, ys, label=name)
        ax.set_title(label)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=8)
    return _png(fig)


def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def eval_table(evaluations: dict[str, dict]) -> tuple[list[str], list[dict]]:
    """Rows: metric; columns: models. Only numeric metrics."""
    flat = {name: flatten(ev) for name, ev in evaluations.items()}
    metrics = sorted({m for values in flat.values() for m in values})
    rows = [{"metric": m, **{name: flat[name].get(m) for name in flat}} for m in metrics]
    return list(flat), rows


# The numbers the terminal summary and the report's first table show (flattened eval.json keys).
HEADLINE = (
    ("retrieval.itm.text_to_image.r1", "text->image R@1 (ITM rerank)"),
    ("retrieval.itm.text_to_image.r5", "text->image R@5 (ITM rerank)"),
    ("retrieval.itc.text_to_image.r1", "text->image R@1 (ITC)"),
    ("retrieval.itm.image_to_text.r1", "image->text R@1 (ITM rerank)"),
    ("captioning.bleu4", "caption BLEU-4"),
    ("captioning.cider", "caption CIDEr"),
    ("attributes.attribute_accuracy", "caption attribute accuracy"),
    ("filter.all.precision", "kept-pair precision"),
    ("filter.all.recall", "kept-pair recall"),
    ("filter.auc_clean_vs_corrupted_web.itm_score.auc", "ITM ROC-AUC (corrupted web)"),
    ("filter.auc_clean_vs_corrupted_web.clip_score.auc", "CLIP ROC-AUC (corrupted web)"),
)


def headline_rows(evaluations: dict[str, dict]) -> list[dict]:
    """Rows {metric, <model>: value or None} of the HEADLINE metrics any model has."""
    flat = {name: flatten(ev) for name, ev in evaluations.items()}
    return [{"metric": label, **{name: values.get(key) for name, values in flat.items()}}
            for key, label in HEADLINE if any(key in values for values in flat.values())]


def _table(names: list[str], rows: list[dict]) -> list[str]:
    parts = ["<table border=1 cellpadding=4><tr><th>metric</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"]
    for row in rows:
        cells = "".join(f"<td align=right>{'' if row[n] is None else f'{row[n]:.3f}'}</td>" for n in names)
        parts.append(f"<tr><td>{html.escape(row['metric'])}</td>{cells}</tr>")
    return parts + ["</table>"]


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def write_bootstrap_report(root: str, run: str, curated_run: str, models: dict[str, str],
                           evaluations: dict[str, dict], notes: list[str] | None = None) -> Path:
    """Write runs/<run>/report/index.html (local roots); returns its path."""
    report = Path(root) / "runs" / run / "report"
    report.mkdir(parents=True, exist_ok=True)
    store = RunStore(root, curated_run)
    parts = [f"<h1>capfilt bootstrap <code>{html.escape(run)}</code></h1>"]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes or []]
    steps = funnel(store)
    parts.append(f"<h2>Funnel of <code>{html.escape(curated_run)}</code></h2><table border=1 cellpadding=4>")
    parts += [f"<tr><td>{html.escape(step)}</td><td align=right>{count}</td></tr>" for step, count in steps]
    parts.append("</table>")
    filter_report = Path(store.uri(store.report_dir()))
    for name, title in (("scores_hist.png", "Score histograms (web vs synthetic)"),
                        ("sample_grid.png", "Sample of kept and dropped pairs")):
        if (filter_report / name).exists():
            shutil.copyfile(filter_report / name, report / name)
            parts.append(f"<h2>{title}</h2><img alt='{title}' src='{name}' style='max-width:100%'>")
    if (filter_report / "filter.html").exists():
        parts.append(f"<p><a href='{(filter_report / 'filter.html').resolve().as_uri()}'>full filter report</a></p>")
    curves = training_curves({name: Path(path) for name, path in models.items()})
    if curves:
        (report / "training_curves.png").write_bytes(curves)
        parts.append("<h2>Training curves</h2><img alt='training curves' src='training_curves.png' style='max-width:100%'>")
    names, rows = eval_table(evaluations)
    if rows:
        parts.append("<h2>Evaluation</h2>")
        parts += _table(names, headline_rows(evaluations))
        parts.append("<details><summary>every metric</summary>")
        parts += _table(names, rows)
        parts.append("</details>")
    (report / "evaluation.json").write_text(json.dumps(evaluations, indent=1, sort_keys=True))
    page = "<!doctype html><html><head><meta charset='utf-8'><title>capfilt bootstrap report</title></head><body>"
    (report / "index.html").write_text(page + "\n".join(parts) + "</body></html>")
    return report / "index.html"
