"""The finetune step of a bootstrap round: read the annotated set, split it by image, finetune the
filter (then calibrate it on the held-out part) and the captioner, each from its own parent.

    run_finetune_filter(annotated, stage1, settings)     -> DIR: Stage 1 folder + calibration.json
    run_finetune_captioner(annotated, stage2, settings)  -> DIR: Stage 2 folder + heldout.json
Both use the same seeded split, so neither model ever learns from the calibration images. The
captioner is then measured on that held-out part as LAVIS's caption finetuning validates (BLEU-4
and CIDEr against each image's several human captions), before and after, so a user sees
whether finetuning helped on their annotated set, never assumes it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from model.finetune import FinetuneSettings, finetune_captioner, finetune_filter
from pipeline.annotated import DEFAULT_HOLDOUT_FRACTION, read_annotated, split_annotated
from pipeline.calibrate import DEFAULT_MATCH_PRIOR, DEFAULT_TARGET_PRECISION, calibrate_itm, write_calibration

log = logging.getLogger(__name__)
HELDOUT_NAME = "heldout.json"


def run_finetune_filter(annotated: str, stage1: str, settings: FinetuneSettings,
                        holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
                        target_precision: float | None = DEFAULT_TARGET_PRECISION,
                        match_prior: float = DEFAULT_MATCH_PRIOR, vision: str | None = None) -> dict:
    """Finetune the filter, then (target_precision not None) calibrate its ITM threshold on the
    held-out part and write DIR/calibration.json. Returns {'step', 'checkpoint', 'metrics',
    'lineage', 'calibration' (a Calibration or None)}; raises ConfigError, after writing the
    curve, when the target precision is out of reach."""
    data = read_annotated(annotated)
    split = split_annotated(data.images, holdout_fraction, settings.seed)
    result = finetune_filter(stage1, split.finetune, settings, data.describe(), split.describe(), vision)
    result["calibration"] = None
    if target_precision is not None:
        result["calibration"] = calibrate_out(settings.out, split, target_precision, match_prior, settings.seed,
                                              annotated=data.describe(), device=settings.device).check()
    return result


def calibrate_out(out: str, split, target_precision: float, match_prior: float, seed: int, annotated: dict,
                  device: str = "auto"):
    """Calibrate the filter in trainer folder `out` on `split.calibration`; writes out/calibration.json."""
    from model.stage1_inference import Stage1Scorer

    scorer = Stage1Scorer.from_checkpoint(out, device=device)
    calibration = calibrate_itm(scorer, split.calibration, target_precision, match_prior, seed,
                                scorer=str(Path(out).resolve()), annotated=annotated, split=split.describe())
    write_calibration(calibration, Path(out) / "calibration.json")
    return calibration


def run_finetune_captioner(annotated: str, stage2: str, settings: FinetuneSettings,
                           holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION) -> dict:
    """Finetune the captioner on the same finetuning part, then caption the held-out part with the
    parent and the finetuned model; returns {'step', 'checkpoint', 'metrics', 'lineage', 'heldout'}
    ('heldout' is None when the split holds no image out) and writes DIR/heldout.json."""
    data = read_annotated(annotated)
    split = split_annotated(data.images, holdout_fraction, settings.seed)
    result = finetune_captioner(stage2, split.finetune, settings, data.describe(), split.describe())
    result["heldout"] = None
    if split.calibration:
        result["heldout"] = heldout_captioning({"parent": stage2, "finetuned": settings.out}, split.calibration,
                                               settings.seed, settings.device)
        (Path(settings.out) / HELDOUT_NAME).write_text(json.dumps(result["heldout"], indent=1))
        parent, tuned = (result["heldout"][k]["cider"] for k in ("parent", "finetuned"))
        if tuned < parent:
            log.warning("finetuning lowered the captioner's CIDEr on the %d held-out annotated images from %.3f "
                        "(parent %s) to %.3f: the parent may caption this source better (--captioner PARENT), or "
                        "give a larger annotated set.", len(split.calibration), parent, stage2, tuned)
    return result


def heldout_captioning(captioners: dict[str, str], images: list, seed: int, device: str = "auto") -> dict:
    """BLEU-4 and CIDEr of each named captioner on annotated `images` (their captions are the
    references), one beam-search caption per image, as `capfilt eval` decodes."""
    from model.captioners import Decoding, load_captioner
    from pipeline.evaluate import EvalConfig, caption_scores, generate_captions

    decoding = Decoding(num_captions=1, num_beams=EvalConfig.num_beams, max_length=EvalConfig.max_length,
                        min_length=EvalConfig.min_length, seed=seed)
    references = [list(im.captions) for im in images]
    out = {"images": len(images), "decoding": json.loads(decoding.to_json())}
    for name, folder in captioners.items():
        captions = generate_captions(load_captioner(folder, device), [im.image for im in images], decoding, seed)
        out[name] = {"captioner": str(folder), **caption_scores(captions, references),
                     "samples": [{"image_id": im.image_id, "caption": c} for im, c in list(zip(images, captions))[:3]]}
    return out
