"""The filter step of a run: score (CLIP + ITM), dedup, select, report - the four stages `capfilt
filter` runs, in order, each skipping work already done with the same settings.

    run_filter(store, score, dedup, select)          scores/, dedup/, curated/, rejected/, report/
    run_filter(..., from_run=RUN)                    RUN's captions and scores taken first (ablation arms)
"""

from __future__ import annotations

from typing import Callable

from pipeline.dedup import DedupConfig, run_dedup
from pipeline.filter_report import write_filter_report
from pipeline.run_store import RunStore
from pipeline.score import ScoreConfig, adopt_scores, run_score
from pipeline.select import SelectConfig, run_select


def run_filter(store: RunStore, score: ScoreConfig, dedup: DedupConfig, select: SelectConfig,
               from_run: str | None = None, say: Callable[[str], None] = print) -> dict:
    """Filter a captioned run; `say` gets one line per stage. Returns every stage's summary."""
    if from_run:
        taken = adopt_scores(store, from_run)
        say(f"took {taken} caption/score shard(s) of run {from_run} (same images, captions and scores)")
    scored = run_score(store, score)
    say(scored.line())
    duplicates = run_dedup(store, dedup)
    say(f"dedup: {duplicates.num_rows} duplicate image(s) "
        f"({sum(k == 'exact' for k in duplicates.column('kind').to_pylist())} exact)")
    provenance = {"clip": score.clip, "clip_pretrained": score.clip_pretrained, "itm": score.itm,
                  "dedup": {"semantic": dedup.semantic, "eps": dedup.eps if dedup.semantic else None}}
    selected = run_select(store, select, extra_provenance=provenance)
    say(selected.line())
    table = write_filter_report(store)
    say(f"report: {store.uri(store.report_dir())}/filter.html")
    return {"score": scored.__dict__, "duplicates": duplicates.num_rows, "select": selected.__dict__, "report": table}
