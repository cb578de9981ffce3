"""Every stage's summary: rows in = kept + dropped by reason + failed by reason, over the shards it committed."""

import pyarrow as pa

from pipeline.run_store import ShardCounts
from pipeline.summary import StageSummary


def rejected(*rows: tuple[str, str]) -> pa.Table:
    return pa.table({"outcome": [o for o, _ in rows], "reason": [r for _, r in rows]})


def test_shards_add_up_by_outcome_and_reason():
    summary = StageSummary()
    summary.add(ShardCounts(rows_in=5, kept=2, rejected=2, failed=1),
                rejected(("dropped", "duplicate"), ("dropped", "not_top_k"), ("failed", "undecodable_image")))
    summary.add(ShardCounts(rows_in=3, kept=2, rejected=1), rejected(("dropped", "duplicate")))
    summary.add(ShardCounts(rows_in=0, kept=0))  # an empty shard: nothing rejected

    assert (summary.shards_done, summary.rows_in, summary.kept) == (3, 8, 4)
    assert summary.dropped == {"duplicate": 2, "not_top_k": 1} and summary.failed == {"undecodable_image": 1}
    assert summary.rows_in == summary.kept + summary.rows_dropped + summary.rows_failed
    assert summary.counts("images", "captioned") == (
        "8 images = 4 captioned + 3 dropped (duplicate 2, not_top_k 1) + 1 failed (undecodable_image 1)")


def test_only_a_local_run_says_where_it_ran():
    assert StageSummary(executor="ray").note() == ""
    assert StageSummary(executor="local", executor_reason="small run").note() == (
        "; ran in the driver process, not on Ray actors (small run)")
