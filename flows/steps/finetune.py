"""BLIP's finetuning steps on a clean annotated set: the filter (then its ITM threshold calibrated) and the captioner."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

from model.finetune import FinetuneSettings
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

    def check(self, will_exist: tuple[str, ...] = ()) -> None:
        pass  # FinetuneSettings checked its values; the annotated set is read when the step runs

    def execute(self, say=print) -> dict:
        from pipeline.finetune import run_finetune_filter

        result = run_finetune_filter(self.annotated, self.stage1, self.settings, self.holdout_fraction,
                                     self.target_precision if self.calibrate else None, self.match_prior, self.vision)
        say(f"finetuned filter: {result['step']} steps -> {result['checkpoint']}")
        cal = result["calibration"]
        if cal is not None:
            say(f"calibrated: keep ITM p >= {cal.threshold:.4f} (predicted precision {cal.predicted_precision:.3f}, "
                f"recall {cal.predicted_recall:.3f}, prior {cal.match_prior}) -> {self.settings.out}/calibration.json")
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
                f"-> {self.settings.out}/heldout.json")
        say(json.dumps(result["lineage"]["split"]))
        return result
