"""A command's option defaults are its stage config's defaults: the step `capfilt <command>` builds when
only the required options are given equals the step a flow builds from those values alone."""

from __future__ import annotations

from dataclasses import fields, is_dataclass

import click
import pytest

from flows.steps import step_class
from pipeline.configs import SHAPE, build, to_data
from test_cli_vocabulary import COMMANDS

# command -> the step it builds with flows.steps.make from its options
STEP_OF = {"capfilt ingest": "ingest", "capfilt caption": "caption", "capfilt filter": "filter",
           "capfilt train stage1": "train stage1", "capfilt train stage2": "train stage2",
           "capfilt finetune filter": "finetune filter", "capfilt finetune captioner": "finetune captioner",
           "capfilt eval": "eval", "capfilt toy pretrain": "toy pretrain"}
# what the command needs besides its required options to build a step at all
MORE = {"capfilt ingest": ["--source", "s.parquet"], "capfilt eval": ["--stage1", "x"]}
NOT_FIELDS = ("quiet", "verbose")  # every command's logging options (capfilt/cli.py)


def data(step) -> dict:
    """The step as data, a dict field shaped after a config (the filter's select) as that config."""
    if not is_dataclass(step):
        return to_data(step)
    out = {}
    for f in fields(step):
        value = getattr(step, f.name)
        shape = f.metadata.get(SHAPE)
        out[f.name] = to_data(shape(**value)) if shape is not None else data(value)
    return out


BUILDING = [c for c in COMMANDS if c[0] in STEP_OF]


@pytest.mark.parametrize("path, command, ctx", BUILDING, ids=[path for path, _, _ in BUILDING])
def test_a_commands_defaults_are_its_configs(path, command, ctx, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()  # a required folder that must exist (train stage2's --stage1)
    required = [p for p in command.params if isinstance(p, click.Option) and p.required]
    args = [arg for p in required for arg in (p.opts[0], "x")] + MORE.get(path, [])
    options = {k: v for k, v in command.make_context(path, list(args)).params.items() if k not in NOT_FIELDS}
    given = {name: options[name] for name in options
             if name == "root" or any(name == p.name for p in required) or f"--{name}".replace("_", "-") in args}
    cls = step_class(STEP_OF[path])

    def step(values):
        values = cls.prepare(dict(values)) if hasattr(cls, "prepare") else values
        return build(cls, values, path, getattr(cls, "OPTIONS", {}))

    assert data(step(options)) == data(step(given))


def test_every_step_with_defaulted_options_is_checked():
    from flows.steps import STEPS

    assert set(STEP_OF.values()) | {"synth oracle"} == set(STEPS)  # synth oracle: only --root has a default
    assert {path for path, _, _ in BUILDING} == set(STEP_OF)
