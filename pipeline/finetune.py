"""The finetune step of a bootstrap round: read the annotated set, split it by image, finetune the
filter (then calibrate it on the held-out part) and the captioner, each from its own parent.

    run_finetune_filter(annotated, stage1, settings)     -> DIR: Stage 1 folder + calibration.json
    run_finetune_captioner(annotated, stage2, settings)  -> DIR: Stage 2 folder
Both use the same seeded split, so neither model ever learns from the calibration images.
"""

from __future__ import annotations

from pathlib import Path

from model.finetune import FinetuneSettings, finetune_captioner, finetune_filter
from pipeline.annotated import DEFAULT_HOLDOUT_FRACTION, read_annotated, split_annotated
from pipeline.calibrate import DEFAULT_MATCH_PRIOR, DEFAULT_TARGET_PRECISION, calibrate_itm, write_calibration


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
    """Finetune the captioner on the same finetuning part; returns {'step', 'checkpoint', 'metrics', 'lineage'}."""
    data = read_annotated(annotated)
    split = split_annotated(data.images, holdout_fraction, settings.seed)
    return finetune_captioner(stage2, split.finetune, settings, data.describe(), split.describe())
