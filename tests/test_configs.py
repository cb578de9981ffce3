"""Typed configs as data (pipeline/configs.py): built by field name from presets, `--set` and the CLI's
options, replaced by name with clear errors, carried to a Ray job as JSON and back, equal."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from capfilt.errors import ConfigError
from model.decoding import Decoding
from pipeline.caption import CaptionConfig
from pipeline.configs import Option, build, field_values, from_json, negate, replace_fields, to_json
from pipeline.dedup import DedupConfig
from pipeline.ingest import IngestConfig


def test_a_field_is_named_as_in_python_or_as_on_the_command_line():
    config = build(IngestConfig, {"shard-size": 5, "allow_private_addresses": True, "max-aspect-ratio": "3.5"}, "stage ingest")
    assert (config.shard_size, config.allow_private_addresses, config.max_aspect_ratio) == (5, True, 3.5)
    assert config.image_size == IngestConfig().image_size  # a field not named keeps its default


def test_a_nested_configs_field_is_found_by_its_unique_name_or_its_path():
    config = build(CaptionConfig, {"captioner": "c", "num-captions": 3, "decoding.seed": 7}, "stage caption")
    assert config.decoding == Decoding(num_captions=3, seed=7)
    ingest = build(IngestConfig, {"URL": "url"}, "stage ingest")
    assert ingest.columns.URL == "url" and ingest.columns.TEXT == "TEXT"


def test_no_flags_and_options_negate_or_rename_a_field():
    options = {"exact_only": Option("semantic", negate)}
    assert build(DedupConfig, {"no-semantic": True}, "dedup").semantic is False
    assert build(DedupConfig, {"exact-only": True}, "dedup", options).semantic is False
    assert build(DedupConfig, {"no-semantic": False}, "dedup").semantic is True


@pytest.mark.parametrize("values, message", [
    ({"shard-sise": 5}, "^stage ingest: unknown field 'shard-sise' \\(did you mean 'shard-size'\\?\\); known fields: .*shard-size"),
    ({"shard-size": "many"}, "^stage ingest: shard-size='many' is not an integer"),
    ({"shard-size": 2.5}, "^stage ingest: shard-size=2.5 is not an integer"),
    ({"allow-private-addresses": "maybe"}, "^stage ingest: allow-private-addresses='maybe' is not true or false"),
    ({"shard-size": 0}, r"^stage ingest: --shard-size must be >= 1, got 0\.$"),  # the config's own check
])
def test_an_unknown_field_or_a_bad_value_is_one_clear_error(values, message):
    with pytest.raises(ConfigError, match=message):
        build(IngestConfig, values, "stage ingest")


def test_a_missing_required_field_is_named_also_inside_a_nested_config():
    from flows.steps import make

    with pytest.raises(ConfigError, match="^stage caption: missing captioner: a required field"):
        make("caption", {"root": "r", "run": "x"})
    with pytest.raises(ConfigError, match="^stage filter: missing clip: a required field"):
        make("filter", {"root": "r", "run": "x", "top-k": 1})


def test_an_ambiguous_name_asks_for_the_path():
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class Two:
        a: DedupConfig = field(default_factory=DedupConfig)
        b: DedupConfig = field(default_factory=DedupConfig)

    with pytest.raises(ConfigError, match="'eps' is ambiguous; name one of a.eps, b.eps"):
        build(Two, {"eps": 0.1}, "two")
    assert build(Two, {"b.eps": 0.1}, "two").b.eps == 0.1


def test_a_typed_partial_config_is_checked_field_by_field_and_merges_by_path():
    # a preset's spelling: the fields' own names, a nested config by its name; values typed on the way in
    preset = field_values(CaptionConfig, {"captioner": "c", "decoding": {"top_p": "0.9", "max_length": 16}}, "p", cli=False)
    assert preset == {"captioner": "c", "decoding.top_p": 0.9, "decoding.max_length": 16}
    user = field_values(CaptionConfig, {"top-p": 0.5}, "stage caption")  # a user's: the CLI's spelling too
    config = build(CaptionConfig, {**preset, **user}, "stage caption")
    assert (config.decoding.top_p, config.decoding.max_length) == (0.5, 16)
    with pytest.raises(ConfigError, match=r"^p: unknown field 'top-p' \(did you mean 'top_p'\?\)"):
        field_values(CaptionConfig, {"top-p": 0.5}, "p", cli=False)
    with pytest.raises(ConfigError, match=r"^p: max_length='long' is not an integer"):
        field_values(CaptionConfig, {"decoding": {"max_length": "long"}}, "p", cli=False)


def test_replace_keeps_the_other_fields_and_checks_again():
    config = build(CaptionConfig, {"captioner": "c", "num-captions": 2, "batch-size": 4}, "stage caption")
    replaced = replace_fields(config, {"top-p": "0.5"}, "stage caption")
    assert replaced.decoding == Decoding(num_captions=2, top_p=0.5) and replaced.batch_size == 4
    with pytest.raises(ConfigError, match=r"^stage caption: --top-p must be in \(0, 1\]"):
        replace_fields(config, {"top_p": 0}, "stage caption")


def test_json_carries_a_config_and_brings_it_back_equal():
    config = build(IngestConfig, {"shard-size": 5, "url_blocklist": ["a.example"], "TEXT": "caption"}, "stage ingest")
    assert config.max_aspect_ratio == float("inf") and config.url_blocklist == ("a.example",)
    text = to_json(config)
    json.loads(text)  # plain JSON: infinity travels as text
    assert from_json(IngestConfig, text) == config
    caption = CaptionConfig(captioner="c", decoding=Decoding(num_captions=2, prompt="a photo of"))
    assert from_json(CaptionConfig, to_json(caption)) == caption


def test_a_trainer_config_keeps_its_recipe_through_json():
    from model.train_stage1 import Stage1Config

    config = build(Stage1Config, {"root": "r", "run": "x", "out": "o", "vision": "v", "recipe": "lavis",
                                  "betas": [0.9, 0.98], "model": {"hidden_size": 32}}, "stage train stage1")
    assert from_json(Stage1Config, to_json(config)) == config and config.betas == (0.9, 0.98)


def test_the_job_entrypoint_runs_a_step_from_its_json_and_a_bad_one_is_one_line(tmp_path):
    from flows.steps import make, step_data

    step = make("synth oracle", {"truth": str(tmp_path / "missing.parquet"), "root": str(tmp_path), "from_run": "a",
                                 "run": "b"})
    data = step_data(step)
    assert data == {"stage": "synth oracle", "config": {"truth": str(tmp_path / "missing.parquet"),
                                                         "root": str(tmp_path), "from_run": "a", "run": "b"}}
    bad = {"stage": "filter", "config": {"root": "r", "run": "x", "score": {"clip": "c"}, "select": {"top_k": 0}}}
    done = subprocess.run([sys.executable, "-m", "flows.stage_job", json.dumps(bad)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and done.stderr.strip() == "capfilt: error: stage filter: --top-k must be >= 1 (got 0).", \
        done.stderr


def test_evals_preset_fills_the_rows_not_given_in_a_flow_as_on_the_command_line():
    from flows.steps import make

    where = {"root": "r", "run": "x", "stage1": "s", "out": "o"}
    lavis = make("eval", {**where, "preset": "lavis", "num-beams": 4}).config  # --set eval.preset=lavis
    assert (lavis.rerank_k, lavis.num_beams, lavis.min_length) == (128, 4, 8)
    plain = make("eval", {**where, "max-new-tokens": 20}).config
    assert (plain.rerank_k, plain.num_beams, plain.max_length) == (16, 3, 20)
    with pytest.raises(ConfigError, match="^stage eval: --preset must be one of lavis"):
        make("eval", {**where, "preset": "blip"})
