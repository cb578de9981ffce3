"""Presets are typed (capfilt/presets.py): each stage's fields by their Python names, checked against the
stage's step class when the preset is built; `--set` replaces fields of them by name, typed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capfilt.errors import ConfigError
from capfilt.presets import Preset, toy_preset
from flows.steps import StepFields
from model.factory import architecture


@pytest.mark.parametrize("stage, values, message", [
    ("filter", {"top_kk": 1}, r"preset mine, filter: unknown field 'top_kk' \(did you mean 'top_k'\?\); known fields: "),
    ("filter", {"top-k": 1}, r"preset mine, filter: unknown field 'top-k' \(did you mean 'top_k'\?\)"),  # the CLI's
    ("filter", {"no_semantic_dedup": True}, r"preset mine, filter: unknown field 'no_semantic_dedup'"),  # spellings
    ("stage1", {"steps": "many"}, r"preset mine, stage1: steps='many' is not an integer"),
    ("round0_caption", {"decoding": {"top_q": 0.9}}, r"preset mine, round0_caption: unknown field 'top_q'"),
    ("pretrain", {"world_imagez": 3}, r"preset mine, pretrain: unknown field 'world_imagez' \(did you mean 'world_images'\?\)"),
])
def test_a_preset_with_a_typo_or_a_wrong_type_fails_when_it_is_built(stage, values, message):
    with pytest.raises(ConfigError, match=f"^{message}") as caught:
        Preset(name="mine", **{stage: values})
    assert len(str(caught.value).splitlines()) == 1


def test_a_presets_stages_hold_typed_fields_by_path():
    preset = toy_preset("/t", quick=True)
    assert preset.filter == StepFields("filter", {
        "score.clip": "local-dir:/t/clip", "select.policies": ("blip2",), "select.rank_by": "itm", "select.top_k": 1,
        "dedup.semantic": False})
    assert preset.caption.values["config.decoding.max_length"] == 16  # the field's own name, not --max-new-tokens
    assert preset.stage1.values["config.model"] == architecture("qformer-toy")
    assert preset.ingest.values["config.timeout"] == 3.0 and isinstance(preset.ingest.values["config.timeout"], float)
    assert Preset(name="empty").stage2 == StepFields("train stage2") and Preset(name="empty").pretrain is None


def test_set_replaces_a_field_by_name_typed_and_an_unknown_one_is_one_clear_line():
    fields = toy_preset("/t").filter
    replaced = fields.replace({"top-k": "1", "no-semantic-dedup": False, "policy": "blip2,clip-threshold"})
    assert replaced.values == {**fields.values, "select.top_k": 1, "dedup.semantic": True,
                               "select.policies": ("blip2", "clip-threshold")}
    assert fields.values["select.top_k"] == 2  # the preset itself is unchanged
    assert fields.replace({"select.top_k": 3}).values["select.top_k"] == 3  # the dotted path names it too
    with pytest.raises(ConfigError, match=r"^stage filter: unknown field 'top-kk' \(did you mean 'top-k'\?\); known"):
        fields.replace({"top-kk": 1})
    with pytest.raises(ConfigError, match="^stage train stage1: batch-size='many' is not an integer"):
        toy_preset("/t").stage1.replace({"batch-size": "many"})


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "model":
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


GOLDEN = json.loads((Path(__file__).parent / "data" / "toy_preset_steps.json").read_text())


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_the_toy_preset_builds_the_same_steps_as_its_option_name_dicts_did(case):
    # tests/data/toy_preset_steps.json: every planned step of the toy preset, and the values the preset set
    # in it, as built when the preset was dicts of CLI option names ("top-k", "no-semantic-dedup", ...);
    # a value the preset changes on purpose (a step count) is changed there too
    from flows.bootstrap import planned_steps
    from flows.params import BootstrapParams
    from pipeline.configs import to_data

    params = BootstrapParams(source="src", root="/d", run="b", **GOLDEN[case]["params"])
    steps = planned_steps(params)
    assert [label for label, _ in steps] == [label for label, _ in GOLDEN[case]["steps"]]
    for (label, step), (_, expected) in zip(steps, GOLDEN[case]["steps"]):
        values = _flat(to_data(step))
        assert {path: values[path] for path in expected} == expected, label
        if step.COMMAND == "train stage1":
            assert step.config.model == architecture("qformer-toy")
