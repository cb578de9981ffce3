"""The ingest step: a URL source (or another run's downloads) into a run's image shards."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from capfilt.errors import CapfiltError
from flows.steps import warn
from pipeline.configs import Option, negate
from pipeline.ingest import IngestConfig, IngestRequest
from pipeline.ingest_policy import read_blocklist


@dataclass(frozen=True)
class IngestStep:
    COMMAND: ClassVar[str] = "ingest"
    # the CLI's spellings that are not a field's own
    OPTIONS: ClassVar[dict] = {
        "run_id": Option("run"),
        "no_progress": Option("progress", negate),
        "ignore_opt_out": Option("config.respect_opt_out", negate),
        "url_col": Option("config.columns.URL"),
        "caption_col": Option("config.columns.TEXT"),
        "url_blocklist": Option("config.url_blocklist", lambda path: read_blocklist(path, "--url-blocklist")),
        "hash_blocklist": Option("config.hash_blocklist", lambda path: read_blocklist(path, "--hash-blocklist")),
    }

    root: str
    run: str
    source: str | None = None  # a LAION-style URL source, or
    from_run: str | None = None  # another run whose downloads this run takes (nothing downloaded again)
    config: IngestConfig = field(default_factory=IngestConfig)
    retry_failed: bool = False
    progress: bool = True

    def __post_init__(self):
        self.request()  # either a source or a run to reuse

    def request(self) -> IngestRequest:
        return IngestRequest(source=self.source, from_run=self.from_run, config=self.config,
                             retry_failed=self.retry_failed, progress=self.progress)

    def check(self, will_exist: tuple[str, ...] = ()) -> None:
        pass  # the source is listed when the step runs (it may be where only a cluster sees it)

    def execute(self, say=print):
        from pipeline import ingest
        from pipeline.run_store import RunStore

        summary = ingest.run(RunStore(self.root, self.run), self.request())
        say(summary.line())
        problem = summary.problem(self.source or f"run {self.from_run}")
        if problem and summary.kept == 0:
            raise CapfiltError(f"ingest {self.run}: {problem}")
        if problem:
            warn(f"capfilt: warning: ingest {self.run}: {problem}")
        return summary
