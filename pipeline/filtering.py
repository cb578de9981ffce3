"""The filter step of a run: score (CLIP + ITM), dedup, select, report - the four stages `capfilt
filter` runs, in order, each skipping work already done with the same settings.

    run(store, FilterConfig(score, dedup, select))                 scores/, dedup/, curated/, rejected/, report/
    run(store, FilterConfig(..., from_run=RUN))                    RUN's captions and scores taken first (ablation arms)

The score and dedup settings that decide what is kept are recorded in every curated row's
provenance (and in select's config hash), beside select's own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from pipeline import dedup as dedup_stage
from pipeline import score as score_stage
from pipeline import select as select_stage
from pipeline.dedup import DedupConfig, DedupSummary
from pipeline.filter_report import write_filter_report
from pipeline.run_store import RunStore
from pipeline.score import ScoreConfig, ScoreSummary
from pipeline.select import SelectConfig, SelectSummary
from pipeline.summary import StageSummary


@dataclass(frozen=True)
class FilterConfig:
    score: ScoreConfig
    dedup: DedupConfig = field(default_factory=DedupConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    from_run: str | None = None  # take this run's captions and scores first (same images): only dedup and select run

    def provenance(self) -> dict:
        """The score and dedup settings a curated row's selection depended on."""
        return {"clip": self.score.clip, "clip_pretrained": self.score.clip_pretrained, "itm": self.score.itm,
                "dedup": {"semantic": self.dedup.semantic, "eps": self.dedup.eps if self.dedup.semantic else None}}


@dataclass
class FilterSummary(StageSummary):
    """Caption rows through the filter this time: failed at scoring, else dropped (with select's
    reason, `duplicate` among them) or kept by select; shards are select's. Plus each stage's own
    summary (a stage that skipped its shards, done before with the same settings, counts none)."""

    taken: int = 0  # caption/score shards taken from `from_run`
    score: ScoreSummary | None = None
    dedup: DedupSummary | None = None
    select: SelectSummary | None = None
    report: str = ""  # report/filter.html

    def line(self) -> str:
        return f"filter: {self.counts('captions')}"


def run(store: RunStore, config: FilterConfig, say: Callable[[str], None] = print) -> FilterSummary:
    """Filter a captioned run; `say` gets one line per stage."""
    started = time.time()
    summary = FilterSummary()
    if config.from_run:
        summary.taken = score_stage.adopt_scores(store, config.from_run)
        say(f"took {summary.taken} caption/score shard(s) of run {config.from_run} (same images, captions and scores)")
    summary.score = score_stage.run(store, config.score)
    say(summary.score.line())
    summary.dedup = dedup_stage.run(store, config.dedup)
    say(summary.dedup.line())
    summary.select = select_stage.run(store, config.select, upstream=config.provenance())
    say(summary.select.line())
    write_filter_report(store)  # also report/filter_reasons.json: the numbers behind the page
    summary.report = f"{store.uri(store.report_dir())}/filter.html"
    say(f"report: {summary.report}")
    summary.shards_done, summary.shards_skipped = summary.select.shards_done, summary.select.shards_skipped
    summary.rows_in = summary.select.rows_in + summary.score.rows_failed
    summary.kept, summary.dropped, summary.failed = summary.select.kept, summary.select.dropped, summary.score.failed
    summary.seconds = time.time() - started
    return summary
