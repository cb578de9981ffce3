"""Bootstrap report: one page for a whole bootstrap, `runs/<run>/report/index.html`.

It leads with the answer: a verdict line saying whether CapFilt paid on the headline metric
and a table of every arm with its deltas against the raw baseline and the oracle, with the
kept-pair precision per caption source (what explains a result). Then the headline metrics of
every arm, the funnel of the last CapFilt round, its score histograms (a link to its filter
report for samples), the training curves of every model and, folded, every metric.

Arms are whatever `evaluations` holds (raw-r0, capfilt-r1, oracle; or raw, captioner, filter,
capfilt, oracle): the baseline is the arm named raw*, the oracle the arm named oracle*, the
candidate the last arm named capfilt* (else the last other arm). HTML comes from
pipeline/templates/bootstrap.html with style.css; links and images are relative.
"""

from __future__ import annotations

import json
import posixpath
import shutil
from pathlib import Path

from pipeline.report_html import MISSING, number, png, render, signed, stylesheet
from pipeline.run_store import RunStore, stage_totals

def funnel(store: RunStore) -> list[tuple[str, int | None]]:
    """(step, count) from a curated run's manifest: source rows, downloaded images, captioned images,
    caption pairs, kept pairs. A step whose stage never ran is None (shown "—"), not 0."""
    totals = {row["stage"]: row for row in stage_totals(store)}

    def get(stage: str, key: str):
        return totals[stage][key] if stage in totals else None

    return [("source rows", get("ingest", "rows_in")),
            ("downloaded images", get("ingest", "kept")),
            ("captioned images", get("caption", "kept")),
            ("caption pairs", get("caption", "rows_out")),
            ("kept pairs", get("select", "kept"))]


def read_metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def training_curves(models: dict[str, Path]) -> bytes | None:
    """One panel per loss, one line per model (Stage 1 and Stage 2 losses); None when no model logged any."""
    import matplotlib.pyplot as plt

    curves: dict[str, dict[str, tuple[list, list]]] = {}
    for name, folder in models.items():
        for stage in ("stage1", "stage2"):
            for record in read_metrics(folder / stage):
                for key in ("itc", "itm", "itg", "lm", "loss"):
                    if record.get(key) is not None and not (stage == "stage1" and key == "loss"):
                        label = f"{stage} {key}" if key == "loss" else key
                        xs, ys = curves.setdefault(label, {}).setdefault(name, ([], []))
                        xs.append(record["step"])
                        ys.append(record[key])
    if not curves:
        return None
    titles = {"itc": "Stage 1 ITC loss", "itm": "Stage 1 ITM loss", "itg": "Stage 1 ITG loss",
              "lm": "Stage 2 LM loss", "stage2 loss": "Stage 2 loss"}
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), squeeze=False, layout="constrained")
    for ax, (label, lines) in zip(axes[0], sorted(curves.items())):
        for name, (xs, ys) in lines.items():
            ax.plot(xs, ys, label=name)
        ax.set_title(titles.get(label, label))
        ax.set_xlabel("training step")
        ax.set_ylabel("loss")
        ax.legend(title="model", fontsize=8)
    return png(fig)


# The bar chart under the comparison: one panel per metric, one bar per arm (all in [0, 1]).
BARS = (("retrieval.itm.text_to_image.r1", "text->image R@1"), ("retrieval.itm.image_to_text.r1", "image->text R@1"),
        ("retrieval.itm.text_to_image.r5", "text->image R@5"), ("attributes.attribute_accuracy", "attribute accuracy"))


def arm_bars(evaluations: dict[str, dict]) -> bytes | None:
    """BLIP Table 1 as bars: every arm on the held-out metrics; None when no arm has any of them."""
    import matplotlib.pyplot as plt

    flat = {name: flatten(ev) for name, ev in evaluations.items()}
    panels = [(key, label) for key, label in BARS if any(values.get(key) is not None for values in flat.values())]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.0), squeeze=False, layout="constrained")
    arms = list(flat)
    for ax, (key, label) in zip(axes[0], panels):
        values = [flat[a].get(key) for a in arms]
        bars = ax.bar(range(len(arms)), [v or 0.0 for v in values], color=[f"C{i}" for i in range(len(arms))])
        for bar, v in zip(bars, values):
            ax.annotate("—" if v is None else f"{v:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, max(0.05, max((v or 0.0) for v in values) * 1.25))
    return png(fig)


def flatten(metrics: dict, prefix: str = "") -> dict[str, float | int]:
    """Numeric leaves of a nested metrics dict, keyed by dotted path; ints stay ints (counts)."""
    flat: dict[str, float | int] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


def eval_table(evaluations: dict[str, dict]) -> tuple[list[str], list[dict]]:
    """Rows: metric; columns: models. Only numeric metrics."""
    flat = {name: flatten(ev) for name, ev in evaluations.items()}
    metrics = sorted({m for values in flat.values() for m in values})
    rows = [{"metric": m, **{name: flat[name].get(m) for name in flat}} for m in metrics]
    return list(flat), rows


# The numbers the terminal summary and the report's tables show (flattened eval.json keys), best
# first: the verdict uses the first one both the candidate and the baseline have. All are
# higher-is-better.
HEADLINE = (
    ("retrieval.itm.text_to_image.r1", "text->image R@1 (ITM rerank)"),
    ("retrieval.itm.text_to_image.r5", "text->image R@5 (ITM rerank)"),
    ("retrieval.itc.text_to_image.r1", "text->image R@1 (ITC)"),
    ("retrieval.itm.image_to_text.r1", "image->text R@1 (ITM rerank)"),
    ("retrieval.itm.image_to_text.r5", "image->text R@5 (ITM rerank)"),
    ("captioning.bleu4", "caption BLEU-4"),
    ("captioning.cider", "caption CIDEr"),
    ("attributes.attribute_accuracy", "caption attribute accuracy"),
    ("filter.all.precision", "kept-pair precision"),
    ("filter.web.precision", "kept-pair precision, web captions"),
    ("filter.synthetic.precision", "kept-pair precision, synthetic captions"),
    ("filter.all.recall", "kept-pair recall"),
    ("filter.web.recall", "kept-pair recall, web captions"),
    ("filter.synthetic.recall", "kept-pair recall, synthetic captions"),
    ("filter.auc_clean_vs_corrupted_web.itm_score.auc", "ITM ROC-AUC (corrupted web)"),
    ("filter.auc_clean_vs_corrupted_web.clip_score.auc", "CLIP ROC-AUC (corrupted web)"),
)
_VERDICT_EXCLUDES = ("filter.",)  # filter quality is not what training gains; it explains it


def headline_rows(evaluations: dict[str, dict]) -> list[dict]:
    """Rows {metric, <model>: value or None} of the HEADLINE metrics any model has."""
    flat = {name: flatten(ev) for name, ev in evaluations.items()}
    return [{"metric": label, **{name: values.get(key) for name, values in flat.items()}}
            for key, label in HEADLINE if any(values.get(key) is not None for values in flat.values())]


def arm_roles(arms: list[str]) -> dict[str, str | None]:
    """Which arm is the baseline (raw*), the oracle (oracle*) and the candidate (last capfilt*, else
    the last other arm). Names decide, so new arms need no code."""
    oracle = next((a for a in arms if a.lower().startswith("oracle")), None)
    baseline = next((a for a in arms if a.lower().startswith("raw")), None)
    others = [a for a in arms if a not in (oracle, baseline)]
    candidate = next((a for a in reversed(others) if a.lower().startswith("capfilt")), others[-1] if others else None)
    return {"baseline": baseline, "oracle": oracle, "candidate": candidate}


def headline_metric(evaluations: dict[str, dict], roles: dict) -> tuple[str, str] | None:
    flat = {name: flatten(ev) for name, ev in evaluations.items()}
    for key, label in HEADLINE:
        if key.startswith(_VERDICT_EXCLUDES):
            continue
        if all(roles[r] and flat[roles[r]].get(key) is not None for r in ("candidate", "baseline")):
            return key, label
    return None


def _precision(flat: dict, source: str) -> str:
    p = flat.get(f"filter.{source}.precision")
    if p is None:
        return MISSING
    return f"{number(p)} ({number(flat.get(f'filter.{source}.kept_correct'))} / {number(flat.get(f'filter.{source}.kept'))})"


def verdict(evaluations: dict[str, dict]) -> dict:
    """{text, css}: did the candidate arm beat the baseline on the headline metric, and by how much."""
    roles = arm_roles(list(evaluations))
    chosen = headline_metric(evaluations, roles)
    if chosen is None:
        return {"css": "none", "text": "No verdict: no evaluated metric is shared by a CapFilt arm and the raw "
                                       f"baseline (arms: {', '.join(evaluations) or 'none'})."}
    key, label = chosen
    flat = {name: flatten(ev) for name, ev in evaluations.items()}
    cand, base, oracle = roles["candidate"], roles["baseline"], roles["oracle"]
    c, b = flat[cand][key], flat[base][key]
    delta = c - b
    paid = delta > 0
    text = (f"CapFilt {'paid' if paid else 'did not pay'}: {label} {number(c)} for {cand} vs {number(b)} for {base} "
            f"({signed(delta)}).")
    o = flat[oracle].get(key) if oracle else None
    if o is not None:
        gap = o - b
        closed = f", so {cand} closes {100 * delta / gap:.0f}% of the gap from {base} to {oracle}" if gap > 0 and paid else ""
        text += f" The {oracle} arm reaches {number(o)}{closed}."
    synthetic = flat[cand].get("filter.synthetic.kept")
    if synthetic:
        text += (f" Of the synthetic captions {cand} kept, {number(flat[cand].get('filter.synthetic.kept_correct'))} of "
                 f"{number(synthetic)} were correct (precision {number(flat[cand].get('filter.synthetic.precision'))}).")
    return {"css": "paid" if paid else "not-paid", "text": text, "metric": key, "label": label, **roles}


def comparison(evaluations: dict[str, dict], chosen: dict) -> dict | None:
    """The table under the verdict: every arm, the headline metric, its deltas, per-source precision."""
    if "metric" not in chosen:
        return None
    key, label, base, oracle = chosen["metric"], chosen["label"], chosen["baseline"], chosen["oracle"]
    flat = {name: flatten(ev) for name, ev in evaluations.items()}
    columns = [label, f"Δ vs {base}"] + ([f"Δ vs {oracle}"] if oracle else []) + [
        "kept-pair precision", "precision, web captions", "precision, synthetic captions"]
    rows = []
    for arm, values in flat.items():
        v = values.get(key)
        cells = [{"text": number(v), "css": ""}]
        for ref_arm in [base] + ([oracle] if oracle else []):
            ref = flat[ref_arm].get(key)
            d = None if v is None or ref is None else v - ref
            text = "(reference)" if arm == ref_arm else signed(d)
            cells.append({"text": text, "css": "" if d is None or d == 0 else ("pos" if d > 0 else "neg")})
        cells.append({"text": number(values.get("filter.all.precision")), "css": ""})
        cells += [{"text": _precision(values, source), "css": ""} for source in ("web", "synthetic")]
        rows.append({"arm": arm, "cells": cells, "headline": arm == chosen["candidate"]})
    note = (f"Δ: this arm minus the reference arm on {label}. Precision: of the pairs the arm's filter kept, the share "
            f"whose caption is correct (correct / kept), from the synthetic world's ground truth; — where the arm "
            f"has no filter or no ground truth.")
    return {"columns": columns, "rows": rows, "note": note}


# The captioners' table: what the captions a CapFilt round wrote are worth (flattened eval.json keys).
CAPTIONER_COLUMNS = (("captioning.cider", "CIDEr"), ("captioning.bleu4", "BLEU-4"),
                     ("attributes.attribute_accuracy", "attribute accuracy"), ("attributes.exact_match", "all attributes right"))


def captioner_figures(evaluation: dict) -> dict[str, float | None]:
    """{column: value} of one captioner's eval.json, in CAPTIONER_COLUMNS' order (None: not measured)."""
    flat = flatten(evaluation)
    return {label: flat.get(key) for key, label in CAPTIONER_COLUMNS}


def captioner_rows(captioners: dict[str, dict]) -> list[dict]:
    """One row per captioner a round wrote its synthetic captions with: {captioner, images, cells}."""
    return [{"captioner": name, "images": flatten(ev).get("captioning.images"),
             "cells": [number(v) for v in captioner_figures(ev).values()]} for name, ev in captioners.items()]


def _relative(target: str, start: str) -> str:
    return posixpath.relpath(target, start)


def write_bootstrap_report(root: str, run: str, curated_run: str, models: dict[str, str],
                           evaluations: dict[str, dict], notes: list[str] | None = None,
                           captioners: dict[str, dict] | None = None) -> Path:
    """Write runs/<run>/report/index.html (local roots); returns its path. `captioners`: the evaluations
    of the captioners the CapFilt rounds wrote their synthetic captions with (captioners.json)."""
    report = Path(root) / "runs" / run / "report"
    report.mkdir(parents=True, exist_ok=True)
    store = RunStore(root, curated_run)
    arms = list(evaluations)
    chosen = verdict(evaluations)
    metrics = [{"metric": row["metric"], "cells": [number(row[a]) for a in arms]} for row in headline_rows(evaluations)]
    _, every = eval_table(evaluations)
    every_metric = [{"metric": row["metric"], "cells": [number(row[a]) for a in arms]} for row in every]

    steps = funnel(store)
    rows, previous = [], None
    for step, count in steps:
        rate = count / previous if count is not None and previous else None
        rows.append({"step": step, "count": count, "rate": rate})
        previous = count if count is not None else previous

    filter_dir = Path(store.uri(store.report_dir()))
    histograms = {"file": None, "alt": "histograms of CLIP and ITM scores, web vs synthetic captions", "notes": []}
    if (filter_dir / "scores_hist.png").exists():
        shutil.copyfile(filter_dir / "scores_hist.png", report / "scores_hist.png")
        histograms["file"] = "scores_hist.png"
    else:
        histograms["notes"].append(f"No score histograms: {curated_run} has no filter report (scores_hist.png).")
    filter_report = None
    if (filter_dir / "filter.html").exists():
        filter_report = _relative(str((filter_dir / "filter.html").resolve()), str(report.resolve()))

    curves = {"file": None, "alt": "training loss curves of every model", "notes": []}
    data = training_curves({name: Path(path) for name, path in models.items()})
    if data:
        (report / "training_curves.png").write_bytes(data)
        curves["file"] = "training_curves.png"
    else:
        curves["notes"].append("No training curves: no model folder holds a stage1/ or stage2/ metrics.jsonl.")
    if data:
        silent = [name for name, path in models.items()
                  if not any((Path(path) / stage / "metrics.jsonl").exists() for stage in ("stage1", "stage2"))]
        if silent:
            curves["notes"].append(f"No training metrics for: {', '.join(silent)}.")

    bars = {"file": None, "alt": "every arm on the held-out metrics (bar chart)", "notes": []}
    bar_png = arm_bars(evaluations)
    if bar_png:
        (report / "arms.png").write_bytes(bar_png)
        bars["file"] = "arms.png"
    else:
        bars["notes"].append("No bar chart: no arm was evaluated on retrieval or attributes.")
    page = render("bootstrap.html", bars=bars, run=run, curated_run=curated_run, notes=notes or [], verdict=chosen,
                  comparison=comparison(evaluations, chosen), arms=arms, metrics=metrics, every_metric=every_metric,
                  funnel=rows, histograms=histograms, filter_report=filter_report, curves=curves,
                  captioners=captioner_rows(captioners or {}),
                  captioner_columns=[label for _, label in CAPTIONER_COLUMNS])
    (report / "evaluation.json").write_text(json.dumps(evaluations, indent=1, sort_keys=True))
    if captioners:
        (report / "captioners.json").write_text(json.dumps(captioners, indent=1, sort_keys=True))
    (report / "style.css").write_text(stylesheet())
    (report / "index.html").write_text(page)
    return report / "index.html"
