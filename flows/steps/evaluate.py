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


# the rows --preset fills when not given (model/recipes.py EVAL_PRESETS), with their own defaults
PRESET_ROWS = dict(rerank_k=16, rerank_score="itm+itc", num_beams=3, max_length=30, min_length=1)


@dataclass(frozen=True)
class EvalStep:
    COMMAND: ClassVar[str] = "eval"
    OPTIONS: ClassVar[dict] = {"max_new_tokens": Option("config.max_length"),
                               "min_new_tokens": Option("config.min_length")}

    config: EvalConfig
    out: str  # folder of eval.json

    @classmethod
    def prepare(cls, values: dict) -> dict:
        """`preset` (e.g. lavis: LAVIS's retrieval re-ranking and beam search) fills the rows not
        given (None: not given), which else take their defaults."""
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        for name, option in cls.OPTIONS.items():
            if name in values:
                values[option.path.rsplit(".", 1)[-1]] = values.pop(name)
        if "preset" not in values:
            return values
        from model.recipes import EVAL_PRESETS, preset_values

        name = values.pop("preset")
        given = {k: values.pop(k, None) for k in PRESET_ROWS}
        return {**values, **preset_values(EVAL_PRESETS, name, given, PRESET_ROWS)}

    def check(self, will_exist: tuple[str, ...] = ()) -> None:
        require_paths({"--heldout": self.config.heldout, "--clip-config": self.config.clip_config})

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
