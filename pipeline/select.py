"""Select stage: keep the good (image, caption) pairs, drop the rest with a reason.

Per caption, checks run in this order and the first that fails is the reason it is dropped:
  duplicate                      the image is a duplicate of another (see pipeline/dedup.py)
  caption_source_excluded        the caption's source (web / synthetic) is not in caption_sources
  image_too_small / aspect_ratio / unsafe / watermarked     metadata filters on the image
  empty_caption / degenerate_<why> / caption_too_short / caption_too_long   caption filters
  then the policies, in the order given:
  blip               ITM match probability >= itm_threshold (a fixed number)   -> itm_below_threshold
  calibrated         the calibration's score (ITM match probability, or CLIP similarity where it
                     measured better) >= the threshold calibrated on a held-out clean set to a target
                     precision (BLIP's filter, pipeline/calibrate.py) -> <itm|clip>_below_calibrated_threshold
                     (itm-calibrated: the same policy's earlier name)
  clip-threshold     CLIP score >= clip_threshold (DataComp)                   -> clip_below_threshold
  clip-top-fraction  CLIP score within the run's top fraction (DataComp)       -> clip_not_top_fraction
  blip2              per image, the top_k remaining captions by CLIP score     -> not_top_k
  none               no model judges: every caption that passed the checks above is kept (BLIP's
                     "+captioner, no filter" ablation arm)
Kept pairs go to curated/ with their rank (by CLIP score among the image's kept captions), the
image's source metadata and provenance, and their images, once each, to curated_images/; dropped ones to rejected/select/. Accounting is per caption row of scores/, and the
manifest also records images in and images with at least one kept caption.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

import capfilt
from capfilt.errors import ConfigError
from pipeline.run_store import RunStore, ShardCounts, config_hash
from pipeline.summary import StageSummary
from schemas import DEDUP, IMAGES, SCORES, curated_outputs
from schemas.curated import IMAGE_METADATA

STAGE = "select"
POLICIES = ("blip", "calibrated", "itm-calibrated", "blip2", "clip-threshold", "clip-top-fraction", "none")
CAPTION_SOURCES = ("web", "synthetic")  # schemas/captions.py caption_source
CALIBRATED = {"calibrated", "itm-calibrated"}
RANK_BY = ("clip", "itm")  # blip2's per-image ranking: CLIP similarity (the paper) or ITM probability


@dataclass(frozen=True)
class SelectConfig:
    policies: tuple[str, ...] = ("blip2",)
    top_k: int = 2
    rank_by: str = "clip"
    itm_threshold: float = 0.5
    clip_threshold: float = 0.3
    clip_top_fraction: float = 0.3
    min_image_size: int = 0
    max_aspect_ratio: float = float("inf")
    max_punsafe: float | None = None
    max_pwatermark: float | None = None
    min_caption_words: int = 1
    max_caption_words: int = 1000
    drop_degenerate: bool = True
    calibration: object | None = None  # pipeline.calibrate.Calibration, for calibrated
    # calibrated with estimate_prior: the other scorers' Calibrations (`load_alternatives`); a caption
    # source goes to one of them only where it keeps clearly more of it at the target precision (for_source_best)
    alternatives: tuple = ()
    caption_sources: tuple[str, ...] = CAPTION_SOURCES  # captions of other sources are dropped (ablation arms)
    # calibrated: per caption source, the share of its captions that match is estimated from the
    # run's own scores, and a source with fewer than the stated prior gets a stricter threshold
    # (pipeline/calibrate.py for_source); off: the calibration's stated prior for every source
    estimate_prior: bool = True

    def __post_init__(self):
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or not self.policies:
            raise ConfigError(f"--policy {','.join(self.policies)!r}: choose from {', '.join(POLICIES)} (comma-separated to combine).")
        if "none" in self.policies and len(self.policies) > 1:
            raise ConfigError(f"--policy {','.join(self.policies)!r}: 'none' keeps every caption; it combines with no other policy.")
        unknown_sources = [c for c in self.caption_sources if c not in CAPTION_SOURCES]
        if unknown_sources or not self.caption_sources:
            raise ConfigError(f"--caption-sources {','.join(self.caption_sources)!r}: choose from "
                              f"{', '.join(CAPTION_SOURCES)} (comma-separated).")
        if self.rank_by not in RANK_BY:
            raise ConfigError(f"--rank-by {self.rank_by!r}: choose from {', '.join(RANK_BY)}.")
        if self.top_k < 1:
            raise ConfigError(f"--top-k must be >= 1 (got {self.top_k}).")
        if not 0.0 <= self.itm_threshold <= 1.0:
            raise ConfigError(f"--itm-threshold must be in [0, 1] (got {self.itm_threshold}).")
        if not 0.0 < self.clip_top_fraction <= 1.0:
            raise ConfigError(f"--clip-top-fraction must be in (0, 1] (got {self.clip_top_fraction}).")
        if CALIBRATED & set(self.policies):
            if self.calibration is None:
                raise ConfigError("--policy calibrated needs a calibration: --calibration PATH, or an --itm folder "
                                  "written by `capfilt finetune filter` (it holds calibration.json).")
            self.calibration.check()


# -- per-caption policies: small objects that keep (None) or drop with (reason, message) -----------

@dataclass(frozen=True)
class CaptionPolicy:
    """One per-caption decision, DataTrove style: `decide(row)` is None (keep) or (reason, message)."""

    name: str
    reason: str
    test: Callable[[dict], bool]  # True = keep
    message: Callable[[dict], str]
    reason_of: Callable[[dict], str] | None = None  # a reason that depends on the row (else `reason`)

    def decide(self, row: dict) -> tuple[str, str] | None:
        if self.test(row):
            return None
        return (self.reason_of(row) if self.reason_of else self.reason), self.message(row)


def _at_least(value, bound) -> bool:
    return value is not None and value >= bound


def caption_policies(cfg: SelectConfig, top_fraction_cut: float | None = None,
                     per_source: dict | None = None) -> list[CaptionPolicy]:
    """The per-caption policies of `cfg`, in order (blip2's per-image top-k is applied after them).
    `per_source`: {caption source: (Calibration or None, estimate)} from `source_calibrations`."""
    out = []
    for policy in cfg.policies:
        if policy == "blip":
            out.append(CaptionPolicy(policy, "itm_below_threshold", lambda r: _at_least(r["itm_score"], cfg.itm_threshold),
                                     lambda r: f"ITM {r['itm_score']} < --itm-threshold {cfg.itm_threshold}"))
        elif policy in CALIBRATED:
            judged = {source: found for source, (found, _) in (per_source or {}).items()}

            def calibration_of(row, judged=judged):  # None: the row's source keeps no caption
                return judged.get(row.get("caption_source"), cfg.calibration)

            def reason_of(row):  # the scorer that judged the row's source
                return f"{(calibration_of(row) or cfg.calibration).score}_below_calibrated_threshold"

            def message(row):
                c = calibration_of(row)
                if c is None:
                    estimate = per_source[row["caption_source"]][1]
                    scorers = " and ".join(s.upper() for s in (estimate.get("by_score") or [cfg.calibration.score]))
                    return (f"{row['caption_source']} captions: an estimated {estimate['prior']:.3f} of them match (their "
                            f"{scorers} scores against the held-out annotated pairs'), too few for "
                            f"any threshold to reach precision {cfg.calibration.target_precision} (lower --target-precision, or "
                            f"--stated-prior to judge them at the stated --match-prior)")
                return (f"{c.score.upper()} {row[f'{c.score}_score']} < {c.threshold:.4f}, the threshold calibrated for "
                        f"precision {c.target_precision} (predicted {c.predicted_precision:.3f}, prior {c.match_prior:.3f})")

            out.append(CaptionPolicy(
                policy, f"{cfg.calibration.score}_below_calibrated_threshold",
                lambda r: (c := calibration_of(r)) is not None and _at_least(r[f"{c.score}_score"], c.threshold),
                message, reason_of))
        elif policy == "clip-threshold":
            out.append(CaptionPolicy(policy, "clip_below_threshold", lambda r: _at_least(r["clip_score"], cfg.clip_threshold),
                                     lambda r: f"CLIP {r['clip_score']:.4f} < --clip-threshold {cfg.clip_threshold}"))
        elif policy == "clip-top-fraction":
            cut = top_fraction_cut if top_fraction_cut is not None else float("inf")
            out.append(CaptionPolicy(policy, "clip_not_top_fraction", lambda r: _at_least(r["clip_score"], cut),
                                     lambda r: (f"CLIP {r['clip_score']:.4f} below the run's top-{cfg.clip_top_fraction:.0%} "
                                                f"cut {cut:.4f}")))
    return out


def source_calibrations(tables, cfg: SelectConfig) -> dict | None:
    """{caption source: (its Calibration or None, the estimate)} over a whole run's scores (`tables`,
    an iterable of scores shards, read only when needed), for the calibrated policy with
    `estimate_prior` (pipeline/calibrate.py for_source_best: the filter's scorer or, where it keeps
    more of the source at the target precision, one of `cfg.alternatives`); else None."""
    if not (CALIBRATED & set(cfg.policies)) or not cfg.estimate_prior:
        return None
    from pipeline.calibrate import for_source_best

    candidates = (cfg.calibration, *cfg.alternatives)
    names = list(dict.fromkeys(f"{c.score}_score" for c in candidates))
    scores = pa.concat_tables(table.select(["caption_source", *names]) for table in tables)  # a few columns, not whole shards
    sources = scores.column("caption_source").to_pylist()
    columns = {name[:-len("_score")]: scores.column(name).to_pylist() for name in names}
    return {source: for_source_best(candidates, {score: [v for v, s in zip(values, sources) if s == source]
                                                 for score, values in columns.items()})
            for source in sorted(set(sources))}


def source_summary(per_source: dict) -> dict:
    """What provenance and the report say of `source_calibrations`: per source, the estimate and the
    threshold it is judged at (None: none kept)."""
    return {source: {"estimate": estimate, "score": found.score if found is not None else None,
                     "threshold": found.threshold if found is not None else None,
                     "match_prior": found.match_prior if found is not None else None,
                     "predicted_precision": found.predicted_precision if found is not None else None,
                     "predicted_recall": found.predicted_recall if found is not None else None}
            for source, (found, estimate) in per_source.items()}


def clip_cut(scores: list[float], fraction: float) -> float:
    """The CLIP score above which the top `fraction` of captions lie (over the whole run)."""
    values = np.asarray([s for s in scores if s is not None], dtype=np.float64)
    return float(np.quantile(values, 1.0 - fraction)) if len(values) else float("inf")


def _duplicate_reason(sample_id: str, duplicate_of: dict[str, str]) -> tuple[str, str] | None:
    if sample_id in duplicate_of:
        return "duplicate", f"image is a duplicate of {duplicate_of[sample_id]}"
    return None


def _source_reason(row: dict, cfg: SelectConfig) -> tuple[str, str] | None:
    if row["caption_source"] not in cfg.caption_sources:
        return "caption_source_excluded", f"{row['caption_source']} caption; --caption-sources {','.join(cfg.caption_sources)}"
    return None


def _metadata_reason(image: dict, cfg: SelectConfig) -> tuple[str, str] | None:
    w, h = image.get("original_width") or image.get("width"), image.get("original_height") or image.get("height")
    if w and h:
        if min(w, h) < cfg.min_image_size:
            return "image_too_small", f"{w}x{h} < --min-image-size {cfg.min_image_size}"
        if max(w, h) / min(w, h) > cfg.max_aspect_ratio:
            return "aspect_ratio", f"{w}x{h} exceeds --max-aspect-ratio {cfg.max_aspect_ratio}"
    if cfg.max_punsafe is not None and image.get("punsafe") is not None and image["punsafe"] > cfg.max_punsafe:
        return "unsafe", f"punsafe {image['punsafe']:.3f} > {cfg.max_punsafe}"
    if cfg.max_pwatermark is not None and image.get("pwatermark") is not None and image["pwatermark"] > cfg.max_pwatermark:
        return "watermarked", f"pwatermark {image['pwatermark']:.3f} > {cfg.max_pwatermark}"
    return None


def _caption_reason(row: dict, cfg: SelectConfig) -> tuple[str, str] | None:
    text = (row["caption"] or "").strip()
    if not text:
        return "empty_caption", "caption is empty"
    if cfg.drop_degenerate and row.get("degenerate"):
        return f"degenerate_{row['degenerate']}", f"generated caption is degenerate ({row['degenerate']})"
    words = len(text.split())
    if words < cfg.min_caption_words:
        return "caption_too_short", f"{words} word(s) < --min-caption-words {cfg.min_caption_words}"
    if words > cfg.max_caption_words:
        return "caption_too_long", f"{words} words > --max-caption-words {cfg.max_caption_words}"
    return None


def select_pairs(scores: pa.Table, images: pa.Table, duplicate_of: dict[str, str], cfg: SelectConfig,
                 top_fraction_cut: float | None = None, per_source: dict | None = None) -> tuple[list[dict], list[dict]]:
    """Decide every caption row of `scores`: (kept rows with rank, dropped rows with reason).

    Pure: no I/O. `top_fraction_cut` is the run-wide CLIP cut for clip-top-fraction; `per_source`
    the run-wide calibration of each caption source (`source_calibrations`).
    """
    image_of = {r["sample_id"]: r for r in images.to_pylist()}
    # each check: row -> None (keep) or (reason, message); the first that drops a caption names why
    checks = [
        lambda row: _duplicate_reason(row["sample_id"], duplicate_of),
        lambda row: _source_reason(row, cfg),
        lambda row: _metadata_reason(image_of.get(row["sample_id"], {}), cfg),
        lambda row: _caption_reason(row, cfg),
        *(policy.decide for policy in caption_policies(cfg, top_fraction_cut, per_source)),
    ]
    kept_by_image: dict[str, list[dict]] = {}
    dropped: list[dict] = []

    def drop(row, reason, message):
        dropped.append({**row, "reason": reason, "error_message": message,
                        "duplicate_of": duplicate_of.get(row["sample_id"]) if reason == "duplicate" else None})

    for row in scores.to_pylist():
        verdict = next(filter(None, (check(row) for check in checks)), None)
        if verdict:
            drop(row, *verdict)
        else:
            kept_by_image.setdefault(row["sample_id"], []).append(row)

    kept: list[dict] = []
    top_k = TopK(cfg.top_k, cfg.rank_by) if "blip2" in cfg.policies else None
    for rows in kept_by_image.values():
        rows = TopK.ranked(rows, cfg.rank_by)  # a kept caption's rank: its place among the image's kept ones
        verdicts = top_k.decide(rows) if top_k else [None] * len(rows)
        for rank, (row, verdict) in enumerate(zip(rows, verdicts)):
            if verdict:
                drop(row, *verdict)
            else:
                kept.append({**row, "rank": rank})
    return kept, dropped


@dataclass(frozen=True)
class TopK:
    """blip2's per-image policy: of an image's captions that passed every per-caption policy, keep
    the `k` best by `rank_by` score; `decide(ranked rows)` is None (keep) or (reason, message) each."""

    k: int
    rank_by: str = "clip"
    reason: str = "not_top_k"

    @staticmethod
    def ranked(rows: list[dict], rank_by: str) -> list[dict]:
        """Best first; a missing score last; ties by caption_id, so the order is the same every run."""
        column = f"{rank_by}_score"
        return sorted(rows, key=lambda r: (-(r[column] if r[column] is not None else -np.inf), r["caption_id"]))

    def decide(self, ranked: list[dict]) -> list[tuple[str, str] | None]:
        return [None if rank < self.k else
                (self.reason, f"{self.rank_by.upper()} rank {rank} of the image's captions (--top-k {self.k})")
                for rank in range(len(ranked))]


def provenance(store: RunStore, cfg: SelectConfig, score_hashes: list[str]) -> str:
    score_record = next((r for r in store.records("score") if r.status == "done"), None)
    caption_record = next((r for r in store.records("caption") if r.status == "done"), None)
    return json.dumps({
        "run_id": store.run_id,
        "capfilt_version": capfilt.__version__,
        "select": {k: v for k, v in asdict(cfg).items() if v not in (float("inf"),)
                   and k not in ("calibration", "alternatives")},
        # the threshold, how it was calibrated and a sampled curve (the full one is report/calibration.json)
        "calibration": cfg.calibration.summary() if cfg.calibration is not None else None,
        "score_config_hashes": sorted(set(score_hashes)),
        "caption_config_hash": caption_record.config_hash if caption_record else None,
        "score_config_hash": score_record.config_hash if score_record else None,
    }, sort_keys=True)


def _located(value):
    """Provenance that still points at the right files when read elsewhere: local paths made absolute
    (a model folder given as ./data/models/...), URIs and model names left as they are."""
    import os

    if isinstance(value, dict):
        return {k: _located(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_located(v) for v in value]
    if isinstance(value, str) and "://" not in value and (value.startswith(("./", "../", "~")) or ("/" in value and os.path.exists(value))):
        return os.path.abspath(os.path.expanduser(value))
    return value


@dataclass
class SelectSummary(StageSummary):  # rows: caption rows of scores/; kept: pairs curated
    images: int = 0
    images_kept: int = 0
    sources: dict | None = None  # calibrated: each caption source's estimate and threshold (source_summary)

    def line(self) -> str:
        line = (f"selected {self.shards_done} shard(s), skipped {self.shards_skipped}: {self.counts('captions')}; "
                f"{self.images_kept} of {self.images} images keep a caption")
        for source, s in (self.sources or {}).items():
            share = f"an estimated {s['estimate']['prior']:.2f} match" if s["estimate"] else "share not estimated"
            others = {k: v for k, v in ((s["estimate"] or {}).get("by_score") or {}).items()
                      if k != (s["estimate"] or {}).get("score")}
            if others:  # what the other scorers estimated for the source
                share += " (" + "; ".join(f"{k.upper()}: " + ("no estimate" if v["prior"] is None else f"{v['prior']:.2f}")
                                          for k, v in others.items()) + ")"
            judged = (f"{s['score'].upper()} threshold {s['threshold']:.4f} (prior {s['match_prior']:.2f})"
                      if s["threshold"] is not None
                      else "no threshold reaches the target precision: none kept")
            line += f"\n  {source} captions: {share}; {judged}"
        return line


def run(store: RunStore, cfg: SelectConfig, upstream: dict | None = None) -> SelectSummary:
    """Select every scored shard of a run (after dedup); writes curated/ and rejected/select/.
    `upstream`: what the score and dedup stages ran with, recorded in each curated row's provenance
    (and part of the config hash)."""
    scored = sorted(r.shard for r in store.records("score") if r.status == "done")
    if not scored:
        raise ConfigError(f"run '{store.run_id}' has no scored shards; run the score step first.")
    dedup = store.record("dedup", "all")
    score_hashes = [store.record("score", s).config_hash for s in scored]
    cfg_hash = config_hash({"select": cfg, "dedup": dedup.config_hash if dedup else None, "extra": upstream})
    cut = None
    if "clip-top-fraction" in cfg.policies:
        cut = clip_cut(store.read("scores", SCORES, scored).column("clip_score").to_pylist(), cfg.clip_top_fraction)
        cfg_hash = config_hash({"hash": cfg_hash, "cut": cut})
    per_source = source_calibrations((store.read_shard("scores", s, SCORES) for s in scored), cfg)
    sources = source_summary(per_source) if per_source is not None else None
    if sources is not None:
        cfg_hash = config_hash({"hash": cfg_hash, "sources": sources})
    duplicate_of = {}
    if dedup is not None and dedup.status == "done":
        table = store.read_shard("dedup", "all", DEDUP)
        duplicate_of = dict(zip(table.column("sample_id").to_pylist(), table.column("duplicate_of").to_pylist()))
    prov = json.loads(provenance(store, cfg, score_hashes))
    prov.update(upstream or {})
    if sources is not None:
        prov["calibration_per_source"] = sources
    prov["root"] = store.root
    prov = _located(prov)
    prov_json = json.dumps(prov, sort_keys=True)
    if cfg.calibration is not None:  # the full curve, for the report and for anyone re-checking the threshold
        with store.fs.open(f"{store.report_dir()}/calibration.json", "w") as handle:
            handle.write(cfg.calibration.to_json())
    if sources is not None:
        with store.fs.open(f"{store.report_dir()}/calibration-per-source.json", "w") as handle:
            handle.write(json.dumps(sources, indent=1))
    summary = SelectSummary(sources=sources)
    for shard in scored:
        if store.is_done(STAGE, shard, cfg_hash):
            summary.shards_skipped += 1
            continue
        store.start_shard(STAGE, shard, cfg_hash)
        scores = store.read_shard("scores", shard, SCORES)
        images = store.read_shard("images", shard, IMAGES)
        kept, dropped = select_pairs(scores, images.drop_columns(["image"]), duplicate_of, cfg, cut, per_source)
        image_of = {r["sample_id"]: r for r in images.to_pylist()}
        # Each kept caption keeps its image's source metadata (licence, safety, size); the bytes
        # go once per image to curated_images/ (see schemas/curated.py).
        curated = [{
            **{k: row[k] for k in ("sample_id", "caption_id", "caption", "caption_source", "clip_score", "itm_score", "rank")},
            **{k: image_of[row["sample_id"]].get(k) for k in ("image", "image_format", *IMAGE_METADATA)},
            "run_id": store.run_id, "provenance": prov_json,
        } for row in kept]
        rejected = [{
            "stage": STAGE, "shard": shard, "sample_id": r["sample_id"], "caption_id": r["caption_id"],
            "url": image_of.get(r["sample_id"], {}).get("url"), "caption": r["caption"], "outcome": "dropped",
            "reason": r["reason"], "error_message": r["error_message"], "duplicate_of": r["duplicate_of"],
        } for r in dropped]
        images_in = len(set(scores.column("sample_id").to_pylist()))
        images_kept = len({r["sample_id"] for r in kept})
        counts = ShardCounts(rows_in=scores.num_rows, kept=len(kept), rejected=len(dropped))
        store.commit_shard(STAGE, shard, cfg_hash, outputs=curated_outputs(curated),
                           counts=counts, rejected=pa.Table.from_pylist(rejected) if rejected else None,
                           extra={"images_in": images_in, "images_kept": images_kept})
        summary.add(counts)
        summary.tally(("dropped", r["reason"]) for r in dropped)
        summary.images += images_in
        summary.images_kept += images_kept
    return summary
