"""The filter step: score (CLIP + ITM), dedup and select a captioned run."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

from capfilt.errors import ConfigError
from flows.steps import require_paths, under
from pipeline.configs import Option, negate, shaped
from pipeline.dedup import DedupConfig
from pipeline.score import ScoreConfig
from pipeline.select import CALIBRATED, SelectConfig


@dataclass(frozen=True)
class FilterStep:
    COMMAND: ClassVar[str] = "filter"
    OPTIONS: ClassVar[dict] = {
        "run_id": Option("run"),
        "policy": Option("select.policies"),
        "keep_degenerate": Option("select.drop_degenerate", negate),
        "score_batch_size": Option("score.batch_size"),
        "score_actors": Option("score.actors"),
        "dedup_eps": Option("dedup.eps"),
        "dedup_cluster_size": Option("dedup.cluster_size"),
        "no_semantic_dedup": Option("dedup.semantic", negate),
        "stated_prior": Option("select.estimate_prior", negate),
    }

    root: str
    run: str
    score: ScoreConfig
    dedup: DedupConfig = field(default_factory=DedupConfig)
    # SelectConfig's fields but its calibration, which is read from `calibration` when the step runs
    # (a bootstrap's calibration is written by an earlier step of the same flow)
    select: dict = shaped(SelectConfig)
    calibration: str | None = None  # calibrated: calibration.json or a finetuned filter folder; default: --itm's
    target_precision: float | None = None  # calibrated: re-pick the threshold on the stored curve
    match_prior: float | None = None
    from_run: str | None = None  # take this run's captions and scores; only dedup and select (ablation arms)

    def check(self, will_exist: tuple[str, ...] = ()) -> None:
        require_paths({"--clip-config": self.score.clip_config})
        self.select_config(will_exist)

    def select_config(self, will_exist: tuple[str, ...] = ()) -> SelectConfig | None:
        """The SelectConfig, its calibration read; None when that calibration is yet to be written
        under one of `will_exist`."""
        policies = self.select.get("policies", SelectConfig.policies)
        calibration, alternatives = None, ()
        calibrated = [p for p in policies if p in CALIBRATED]
        if calibrated:
            if not self.score.itm:
                raise ConfigError(f"--policy {calibrated[0]} needs --itm (the finetuned filter)")
            from pipeline.calibrate import load_alternatives, load_calibration

            source = self.calibration or self.score.itm
            if not os.path.exists(source) and under(source, will_exist):
                return None
            calibration = load_calibration(source, "--calibration" if self.calibration else "--itm")
            # the other scorers' calibrations where the filter's was chosen by measurement (--filter-score best)
            alternatives = tuple(c.at(self.target_precision, self.match_prior) for c in load_alternatives(source, calibration))
            calibration = calibration.at(self.target_precision, self.match_prior)
        select = SelectConfig(**{**self.select, "calibration": calibration, "alternatives": alternatives})
        if "blip" in select.policies and not self.score.itm:
            raise ConfigError("--policy blip needs --itm (an ITM model)")
        if select.rank_by == "itm" and not self.score.itm:
            raise ConfigError("--rank-by itm needs --itm (an ITM model)")
        return select

    def execute(self, say=print):
        from pipeline import filtering
        from pipeline.run_store import RunStore

        config = filtering.FilterConfig(self.score, self.dedup, self.select_config(), from_run=self.from_run)
        return filtering.run(RunStore(self.root, self.run), config, say=say)
