"""BLIP's finetuning steps on a clean annotated set: the filter (then its ITM threshold, and its CLIP's, calibrated) and
the captioner (kept where it beats its parent on the held-out part)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

from model.finetune import FinetuneSettings, check_folds
from pipeline.configs import Option, negate


@dataclass(frozen=True)
class FinetuneFilterStep:
    COMMAND: ClassVar[str] = "finetune filter"
    OPTIONS: ClassVar[dict] = {"no_calibrate": Option("calibrate", negate)}

    annotated: str
    stage1: str  # the Stage 1 checkpoint it starts from
    settings: FinetuneSettings
    holdout_fraction: float = 0.2  # share of the annotated images held out for calibration
    calibrate: bool = True
    target_precision: float = 0.9
    match_prior: float = 0.5
    vision: str | None = None  # default: the one the Stage 1 checkpoint names
    clip: str | None = None  # the filter stage's CLIP (open_clip name), calibrated beside the ITM
    clip_pretrained: str | None = None
    clip_config: str | None = None
    filter_score: str = "best"  # itm, clip, or the one reaching the precision with more recall
    folds: int = 1  # > 1: out of fold, each image judged by a filter that never trained on it (model/folds.py)

    def check(self, will_exist: tuple[str, ...] = ()) -> None:
        from pipeline.calibrate import check_filter_score

        # FinetuneSettings checked its values; the annotated set is read when the step runs
        check_filter_score(self.filter_score, bool(self.clip))
        check_folds(self.folds)

    def execute(self, say=print) -> dict:
        from pipeline.finetune import ClipSpec, run_finetune_filter

        clip = ClipSpec(self.clip, self.clip_pretrained, self.clip_config) if self.clip else None
        result = run_finetune_filter(self.annotated, self.stage1, self.settings, self.holdout_fraction,
                                     self.target_precision if self.calibrate else None, self.match_prior, self.vision,
                                     clip, self.filter_score, self.folds)
        say(f"finetuned filter: {result['step']} steps -> {result['checkpoint']}")
        cal = result["calibration"]
        if cal is not None:
            say(f"calibrated: keep {cal.score.upper()} >= {cal.threshold:.4f} (predicted precision "
                f"{cal.predicted_precision:.3f}, recall {cal.predicted_recall:.3f}, prior {cal.match_prior}) -> "
                f"{self.settings.out}/calibration.json")
        return result


@dataclass(frozen=True)
class FinetuneCaptionerStep:
    COMMAND: ClassVar[str] = "finetune captioner"
    OPTIONS: ClassVar[dict] = {}

    annotated: str
    stage2: str  # the Stage 2 checkpoint it starts from
    settings: FinetuneSettings
    holdout_fraction: float = 0.2

    def check(self, will_exist: tuple[str, ...] = ()) -> None:
        pass

    def execute(self, say=print) -> dict:
        from pipeline.finetune import run_finetune_captioner

        result = run_finetune_captioner(self.annotated, self.stage2, self.settings, self.holdout_fraction)
        say(f"finetuned captioner: {result['step']} steps -> {result['checkpoint']}")
        if result["heldout"]:
            h = result["heldout"]
            say(f"held-out annotated images ({h['images']}): CIDEr {h['parent']['cider']:.3f} (parent) -> "
                f"{h['finetuned']['cider']:.3f}, BLEU-4 {h['parent']['bleu4']:.3f} -> {h['finetuned']['bleu4']:.3f} "
                f"-> {self.settings.out}/heldout.json; {self.settings.out} loads as the {h['selected']} captioner")
        say(json.dumps(result["lineage"]["split"]))
        return result
