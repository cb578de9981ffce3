"""The finetune step of a bootstrap round: read the annotated set, split it by image, finetune the
filter (then calibrate it on the held-out part) and the captioner, each from its own parent.

    run_finetune_filter(annotated, stage1, settings)     -> DIR: Stage 1 folder + calibration.json
                                                           (the ITM's, or the CLIP's where it does better)
    run_finetune_captioner(annotated, stage2, settings)  -> DIR: Stage 2 folder + heldout.json
Both use the same seeded split, so neither model ever learns from the calibration images. The
captioner is then measured on that held-out part as LAVIS's caption finetuning validates (BLEU-4
and CIDEr against each image's several human captions), before and after, so a user sees
whether finetuning helped on their annotated set, never assumes it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from model.finetune import FinetuneSettings, check_folds, finetune_captioner, finetune_filter, finetune_filter_folds
from pipeline.annotated import DEFAULT_HOLDOUT_FRACTION, read_annotated, split_annotated
from capfilt.errors import ConfigError
from pipeline.calibrate import (DEFAULT_MATCH_PRIOR, DEFAULT_TARGET_PRECISION, calibrate_clip, calibrate_itm,
                               check_filter_score, choose, write_calibration)

log = logging.getLogger(__name__)
HELDOUT_NAME = "heldout.json"


@dataclass(frozen=True)
class ClipSpec:
    """The frozen CLIP the filter stage scores with (`capfilt filter --clip ...`)."""

    name: str
    pretrained: str | None = None
    config: str | None = None  # open_clip model config(s) to register first

    def load(self, device: str = "auto"):
        from model.scorers import load_clip

        return load_clip(self.name, self.pretrained, device, self.config)


def run_finetune_filter(annotated: str, stage1: str, settings: FinetuneSettings,
                        holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
                        target_precision: float | None = DEFAULT_TARGET_PRECISION,
                        match_prior: float = DEFAULT_MATCH_PRIOR, vision: str | None = None,
                        clip: ClipSpec | None = None, filter_score: str = "best", folds: int = 1) -> dict:
    """Finetune the filter, then (target_precision not None) calibrate its ITM threshold, and with
    `clip` the CLIP's too, on the held-out part; DIR/calibration.json holds the one `filter_score`
    picks (`best`: the more recall at the target precision), calibration-itm.json and
    calibration-clip.json each scorer's. Returns {'step', 'checkpoint', 'metrics', 'lineage',
    'calibration' (a Calibration or None)}; raises ConfigError, after writing the curves, when the
    target precision is out of reach. With `folds` > 1 the filter is out of fold (model/folds.py):
    `folds` Stage 1s trained as `stage1` was, each without one fold of its run's images, each
    finetuned; DIR scores an image with the one that never trained on it, and is calibrated as one."""
    check_filter_score(filter_score, clip is not None)  # before any training
    check_folds(folds)
    data = read_annotated(annotated)
    split = split_annotated(data.images, holdout_fraction, settings.seed)
    if folds > 1:
        result = finetune_filter_folds(stage1, folds, split.finetune, settings, data.describe(), split.describe(), vision)
    else:
        result = finetune_filter(stage1, split.finetune, settings, data.describe(), split.describe(), vision)
    result["calibration"] = None
    if target_precision is not None:
        result["calibration"] = calibrate_out(settings.out, split, target_precision, match_prior, settings.seed,
                                              annotated=data.describe(), device=settings.device, clip=clip,
                                              filter_score=filter_score).check()
        # the parent's run (None: a Stage 1 pretrained on no curated run, which judges no pairs it learnt)
        parent = (result["lineage"]["parent"]["lineage"] or {}).get("run") if folds == 1 else None
        if result["calibration"].score == "itm" and parent:
            log.warning("the filter thresholds its ITM: on images its Stage 1 trained on (%s's; a bootstrap round "
                        "judges those) it remembers the pairs, noise included, and keeps more than the predicted "
                        "precision allows; --folds 2 judges each image with a model that never trained on it, and so "
                        "does a filter finetuned from a Stage 1 pretrained on other data", parent)
    return result


def calibrate_out(out: str, split, target_precision: float, match_prior: float, seed: int, annotated: dict,
                  device: str = "auto", clip: ClipSpec | None = None, filter_score: str = "itm"):
    """Calibrate the filter in folder `out` (a trainer folder or out-of-fold filters; and `clip`) on
    `split.calibration`; writes out/calibration-<score>.json for each and out/calibration.json for the
    one chosen."""
    from model.scorers import load_itm

    about = {"annotated": annotated, "split": split.describe()}
    # hard negatives are searched among every annotated caption, the finetuning part's too: in a
    # small held-out part the closest other caption rarely differs by one word, as the web's hardest
    # noise does (seed-0 demo: the CLIP's threshold 0.272 -> 0.394, kept web captions' precision
    # 0.84 -> 0.90 where the curve predicted 0.90)
    others = [caption for image in split.finetune for caption in image.captions]
    scorer = load_itm(out, device)
    found = {"itm": calibrate_itm(scorer, split.calibration, target_precision, match_prior, seed, others,
                                  scorer=str(Path(out).resolve()), **about)}
    if clip is not None:
        found["clip"] = calibrate_clip(clip.load(device), split.calibration, target_precision, match_prior, seed,
                                       others, scorer=clip.name + (f"@{clip.pretrained}" if clip.pretrained else ""),
                                       **about)
    for score, calibration in found.items():
        write_calibration(calibration, Path(out) / f"calibration-{score}.json")
    calibration = choose(found, filter_score)
    write_calibration(calibration, Path(out) / "calibration.json")
    log.info("filter calibrated on %d held-out annotated images: %s", len(split.calibration), "; ".join(
        f"{k} recall {c.predicted_recall if c.predicted_recall is not None else 'none'} at precision "
        f"{c.target_precision}" for k, c in found.items()) + f"; the filter uses {calibration.score}")
    return calibration


def run_finetune_captioner(annotated: str, stage2: str, settings: FinetuneSettings,
                           holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION) -> dict:
    """Finetune the captioner on the same finetuning part, then caption the held-out part with the
    parent and the finetuned model and keep the better by CIDEr, as LAVIS keeps the best checkpoint
    on its validation split: where finetuning lowered it, DIR loads as its parent (DIR/selected
    names the parent's checkpoint; the finetuned steps stay in DIR). Returns {'step',
    'checkpoint', 'metrics', 'lineage', 'heldout'} ('heldout' is None when the split holds no image
    out; else it says which was 'selected') and writes DIR/heldout.json."""
    from model.trainer import resolve_latest, select_checkpoint

    data = read_annotated(annotated)
    split = split_annotated(data.images, holdout_fraction, settings.seed)
    result = finetune_captioner(stage2, split.finetune, settings, data.describe(), split.describe())
    result["heldout"] = None
    select_checkpoint(settings.out, None)  # a rerun measures the finetuned steps again, never a pick
    if split.calibration:
        parent_step = resolve_latest(stage2)
        heldout = heldout_captioning({"parent": str(parent_step), "finetuned": result["checkpoint"]}, split.calibration,
                                     settings.seed, settings.device)
        parent, tuned = (heldout[k]["cider"] for k in ("parent", "finetuned"))
        heldout["selected"] = "finetuned" if tuned >= parent else "parent"
        if tuned < parent:
            select_checkpoint(settings.out, parent_step)
            heldout["selected_checkpoint"] = str(parent_step.resolve())
            log.warning("finetuning lowered the captioner's CIDEr on the %d held-out annotated images from %.3f "
                        "(parent %s) to %.3f: %s loads as the parent (a larger annotated set may let finetuning pay).",
                        len(split.calibration), parent, stage2, tuned, settings.out)
        (Path(settings.out) / HELDOUT_NAME).write_text(json.dumps(heldout, indent=1))
        result["heldout"] = heldout
    return result


def heldout_captioning(captioners: dict[str, str], images: list, seed: int, device: str = "auto") -> dict:
    """BLEU-4 and CIDEr of each named captioner on annotated `images` (their captions are the
    references), one beam-search caption per image, as `capfilt eval` decodes."""
    from model.captioners import Decoding, load_captioner
    from pipeline.evaluate import EvalConfig, generate_captions
    from pipeline.metrics import caption_scores

    decoding = Decoding(num_captions=1, num_beams=EvalConfig.num_beams, max_length=EvalConfig.max_length,
                        min_length=EvalConfig.min_length, seed=seed)
    references = [list(im.captions) for im in images]
    out = {"images": len(images), "decoding": json.loads(decoding.to_json())}
    for name, folder in captioners.items():
        captions = generate_captions(load_captioner(folder, device), [im.image for im in images], decoding, seed)
        out[name] = {"captioner": str(folder), **caption_scores(captions, references),
                     "samples": [{"image_id": im.image_id, "caption": c} for im, c in list(zip(images, captions))[:3]]}
    return out
