"""The training steps: Stage 1 (ITC + ITM + ITG) and Stage 2 (LM through a frozen LLM) on a curated run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from capfilt.errors import ConfigError
from flows.steps import require_paths
from model.factory import architecture
from model.stage2 import Stage2Config
from model.train_stage1 import Stage1Config
from pipeline.configs import Option


def _model_config(value):
    """--model-config: a named architecture (qformer-base, qformer-toy: model/configs/), a JSON file
    of one, or a JSON object of Q-Former config fields (text from the CLI, a dict from a flow)."""
    return {} if value is None else architecture(value, where="--model-config")


def _betas(beta2):
    return None if beta2 is None else (0.9, float(beta2))


# the trainers' CLI spellings that are not a field's own
TRAINER_OPTIONS = {"run_id": Option("config.run"), "data_workers": Option("config.num_data_workers"),
                   "beta2": Option("config.betas", _betas)}


@dataclass(frozen=True)
class Stage1Step:
    COMMAND: ClassVar[str] = "train stage1"
    OPTIONS: ClassVar[dict] = {**TRAINER_OPTIONS, "model_config": Option("config.model", _model_config),
                               "bert": Option("config.bert", lambda b: None if b is None or b.lower() == "none" else b)}

    config: Stage1Config
    workers: int = 1  # Ray Train workers (DDP) when > 1

    def check(self, will_exist: tuple[str, ...] = ()) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}.")

    def execute(self, say=print) -> dict:
        from model.train_stage1 import train, train_distributed
        from pipeline.lineage import curated_lineage

        curated_lineage(self.config.root, self.config.run)  # a typo costs a second, not a model download
        out = self.config.out
        if self.workers > 1:
            result = train_distributed(self.config, self.workers)
            say(f"trained to step {result['step']} on {self.workers} workers; checkpoints in {out}")
            return result
        result = train(self.config)
        last = result["metrics"][-1] if result["metrics"] else {}
        say(f"trained to step {result['step']}; last loss {last.get('loss')} (itc {last.get('itc')}, itm "
            f"{last.get('itm')}, itg {last.get('itg')}); checkpoint {result['checkpoint']}; metrics {out}/metrics.jsonl")
        return result


@dataclass(frozen=True)
class Stage2Step:
    COMMAND: ClassVar[str] = "train stage2"
    OPTIONS: ClassVar[dict] = TRAINER_OPTIONS

    config: Stage2Config
    workers: int = 1

    def check(self, will_exist: tuple[str, ...] = ()) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}.")
        require_paths({"--stage1": self.config.stage1}, will_exist)

    def execute(self, say=print) -> dict:
        from model.stage2 import stage1_info, train, train_distributed
        from pipeline.lineage import curated_lineage

        curated_lineage(self.config.root, self.config.run)
        stage1_info(self.config.stage1)  # not a Stage 1 checkpoint: say so before --out is created
        workers, out = self.workers, self.config.out
        result = train_distributed(self.config, workers) if workers > 1 else train(self.config)
        metrics = result["metrics"]
        first, last = (metrics[0], metrics[-1]) if metrics else ({}, {})
        say(f"trained to step {result['step']}{f' on {workers} workers' if workers > 1 else ''}; loss "
            f"{first.get('loss')} (step {first.get('step')}) -> {last.get('loss')} (step {last.get('step')}); "
            f"checkpoint {result['checkpoint']}; metrics {out}/metrics.jsonl")
        return result
