"""Every step a flow runs, as a typed object: where it reads and writes, and its stage's config.

A step is a frozen dataclass per command (`ingest`, `caption`, `filter`, `train stage1`, ...) holding
the stage's own config objects (IngestConfig, CaptionConfig, Stage1Config, ...). `make` builds one
from values by field name (a preset's `StepFields` with `--set stage.field=value` put over them, a
flow's parameters, the CLI's options; see pipeline/configs.py), so its checks run before any work.
`step.execute(say)` calls the stage function in this process; flows/stage_job.py runs the same step
from its JSON in a Ray job.

The step classes live one module per stage and load on first use: a step's module imports its
stage (and torch), which a `capfilt ingest` should not pay for.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from capfilt.errors import ConfigError
from pipeline.configs import at, build, field_values, from_data, to_data

# command -> (module, class), imported when a step of it is first made
STEPS = {
    "ingest": ("flows.steps.ingest", "IngestStep"),
    "caption": ("flows.steps.caption", "CaptionStep"),
    "filter": ("flows.steps.filter", "FilterStep"),
    "train stage1": ("flows.steps.train", "Stage1Step"),
    "train stage2": ("flows.steps.train", "Stage2Step"),
    "finetune filter": ("flows.steps.finetune", "FinetuneFilterStep"),
    "finetune captioner": ("flows.steps.finetune", "FinetuneCaptionerStep"),
    "eval": ("flows.steps.evaluate", "EvalStep"),
    "toy pretrain": ("flows.steps.toy", "ToyPretrainStep"),
    "synth oracle": ("flows.steps.toy", "OracleStep"),
}


class Step(Protocol):
    COMMAND: str  # what a user would type after `capfilt` for the same work

    def check(self, will_exist: tuple[str, ...] = ()) -> None: ...

    def execute(self, say) -> Any: ...


def warn(line: str) -> None:
    """A warning a user should see even with the summary lines captured: stderr."""
    print(line, file=sys.stderr, flush=True)


def step_class(command: str) -> type:
    if command not in STEPS:
        raise ConfigError(f"unknown stage {command!r}; stages: {', '.join(STEPS)}.")
    module, name = STEPS[command]
    return getattr(importlib.import_module(module), name)


def make(command: str, values: Mapping[str, Any], will_exist: tuple[str, ...] = (), where: str | None = None) -> Step:
    """The step of `command` from values by field or option name; checked as the stage would check
    it. Paths that must exist may instead lie under one of `will_exist` (what earlier steps write).
    Errors start with `where`: "stage <command>" in a flow; the CLI's own command passes ""."""
    cls = step_class(command)
    where = f"stage {command}" if where is None else where
    try:
        if hasattr(cls, "prepare"):  # options that decide other options' defaults (eval's --preset)
            values = cls.prepare(dict(values))
        step = build(cls, values, where, getattr(cls, "OPTIONS", {}))
        step.check(will_exist)
    except ConfigError as exc:
        raise ConfigError(at(where, exc) if not str(exc).startswith(f"{where}: ") else str(exc)) from None
    return step


@dataclass(frozen=True)
class StepFields:
    """Some fields of one command's step, typed: {dotted field path: value of the field's type}, each
    checked against the step class (pipeline/configs.py field_values). A preset holds one per stage;
    `replace` puts a user's values over it by name (`--set filter.top-k=1`); `make(command,
    {**fields.values, ...})` builds the step from them."""

    command: str
    values: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, command: str, values: Mapping[str, Any], where: str, cli: bool = True) -> StepFields:
        """Checked values by name; `cli=False` takes only the fields' own names (a preset's)."""
        step = step_class(command)
        return cls(command, field_values(step, values, where, getattr(step, "OPTIONS", {}), cli))

    def replace(self, values: Mapping[str, Any], where: str | None = None) -> StepFields:
        """These fields with `values` (by field name or the CLI's spelling) replacing theirs; errors
        start with `where` (default "stage <command>")."""
        where = f"stage {self.command}" if where is None else where
        return StepFields(self.command, {**self.values, **StepFields.of(self.command, values, where).values})


def step_data(step: Step) -> dict:
    """What a Ray job needs to run the step: {"stage": command, "config": its fields as JSON data}."""
    return {"stage": step.COMMAND, "config": to_data(step)}


def step_from_data(data: Mapping) -> Step:
    where = f"stage {data['stage']}"
    step = from_data(step_class(data["stage"]), data["config"], where)
    try:
        step.check()
    except ConfigError as exc:
        raise ConfigError(at(where, exc)) from None
    return step


def require_paths(paths: Mapping[str, str | None], will_exist: tuple[str, ...] = ()) -> None:
    """Each named path exists, or lies under a folder an earlier step writes; else one clear line."""
    for option, path in paths.items():
        if not path or os.path.exists(path) or "://" in path or under(path, will_exist):
            continue
        raise ConfigError(f"{option} {path} does not exist" + (" (and no earlier step writes it)." if will_exist else "."))


def _under(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def under(path: str, will_exist: tuple[str, ...]) -> bool:
    return any(_under(path, folder) for folder in will_exist)
