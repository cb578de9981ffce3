"""What one run of a stage did, in one shape every stage shares.

Every stage module exposes `run(store, config) -> <Stage>Summary`; each summary is a
`StageSummary` plus the few figures only that stage has (caption rows by source, tars written).
The shared part is the accounting every stage keeps (ARCHITECTURE.md, "Contracts"):

    rows_in = kept + sum(dropped.values()) + sum(failed.values())

`dropped` counts rows by the reason a decision gave (duplicate, not_top_k, private_address, ...),
`failed` rows by the reason of their error (undecodable_image, http_404, timeout, ...): the same
`reason` the stage wrote beside each row under rejected/. The driver fields say how a stage ran:
its wall time and, for a model-holding stage (pipeline/model_stage.py), its start-up and where
the batches ran.

Imports nothing above the bottom floor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.run_store import ShardCounts


@dataclass
class StageSummary:
    shards_done: int = 0
    shards_skipped: int = 0  # already done with the same config: nothing redone
    rows_in: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    failed: dict[str, int] = field(default_factory=dict)  # reason -> rows
    seconds: float = 0.0  # wall time of the stage's work (a model stage: the Ray job or the local loop)
    startup_s: float | None = None  # model stages: until an actor (or the driver), its model loaded, began its first batch
    executor: str = ""  # model stages: "ray" or "local"; "" when there was nothing to run
    executor_reason: str = ""  # why "local"

    @property
    def rows_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def rows_failed(self) -> int:
        return sum(self.failed.values())

    def add(self, counts: ShardCounts, rejected: pa.Table | None = None) -> None:
        """One committed shard: its counts, and its rejected rows tallied by outcome and reason."""
        self.shards_done += 1
        self.rows_in += counts.rows_in
        self.kept += counts.kept
        if rejected is not None and rejected.num_rows:
            self.tally(zip(rejected.column("outcome").to_pylist(), rejected.column("reason").to_pylist()))

    def tally(self, outcomes) -> None:
        """Count (outcome, reason) pairs: "failed" into `failed`, anything else into `dropped`."""
        for outcome, reason in outcomes:
            target = self.failed if outcome == "failed" else self.dropped
            target[reason] = target.get(reason, 0) + 1

    def counts(self, rows: str = "rows in", kept: str = "kept") -> str:
        """"N <rows> = K <kept> + D dropped (reason n, ...) + F failed (reason n, ...)"."""
        def by_reason(reasons: dict[str, int]) -> str:
            return f" ({', '.join(f'{r} {n}' for r, n in sorted(reasons.items()))})" if reasons else ""

        return (f"{self.rows_in} {rows} = {self.kept} {kept} + {self.rows_dropped} dropped{by_reason(self.dropped)} + "
                f"{self.rows_failed} failed{by_reason(self.failed)}")

    def note(self) -> str:
        return (f"; ran in the driver process, not on Ray actors ({self.executor_reason})"
                if self.executor == "local" else "")
