"""The caption step: N synthetic captions per ingested image of a run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.caption import CaptionConfig
from pipeline.configs import Option


@dataclass(frozen=True)
class CaptionStep:
    COMMAND: ClassVar[str] = "caption"
    OPTIONS: ClassVar[dict] = {"run_id": Option("run"), "max_new_tokens": Option("config.decoding.max_length"),
                               "min_new_tokens": Option("config.decoding.min_length")}

    root: str
    run: str
    config: CaptionConfig

    def check(self, will_exist: tuple[str, ...] = ()) -> None:
        pass  # CaptionConfig checked its values; the captioner loads when the step runs

    def execute(self, say=print):
        from pipeline import caption
        from pipeline.run_store import RunStore

        summary = caption.run(RunStore(self.root, self.run), self.config)
        say(summary.line())
        return summary
