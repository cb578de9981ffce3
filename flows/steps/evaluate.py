"""The evaluation step: retrieval, captions and (on a synthetic world) filter quality of a run's models."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from flows.steps import require_paths, warn
from pipeline.configs import Option
from pipeline.evaluate import EvalConfig

METRICS_FILE = "eval.json"


def metrics_path(out: str) -> Path:
    """--out DIR -> DIR/eval.json; --out FILE.json (what --out meant before every --out was a folder) -> FILE.json."""
    if out.endswith(".json"):
        warn(f"capfilt: warning: eval --out {out}: --out is a folder now; the metrics go to "
             f"--out/{METRICS_FILE} (a .json path still names the file)")
        return Path(out)
    return Path(out) / METRICS_FILE


@dataclass(frozen=True)
class EvalStep:
    COMMAND: ClassVar[str] = "eval"
    OPTIONS: ClassVar[dict] = {"max_new_tokens": Option("config.max_length"),
                               "min_new_tokens": Option("config.min_length")}

    config: EvalConfig
    out: str  # folder of eval.json

    def check(self, will_exist: tuple[str, ...] = ()) -> None:
        require_paths(self.COMMAND, {"--heldout": self.config.heldout, "--clip-config": self.config.clip_config})

    def execute(self, say=print) -> dict:
        from pipeline.evaluate import run_eval, summary_lines

        path = metrics_path(self.out)
        result = run_eval(self.config)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, sort_keys=True))
        for line in summary_lines(result):
            say(line)
        say(f"metrics: {path}")
        return result
