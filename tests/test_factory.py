"""Q-Former architectures are data: named JSON configs (model/configs/) built by one factory."""

from __future__ import annotations

import json

import pytest
import torch

from capfilt.errors import ConfigError
from capfilt.presets import get_preset
from flows.steps import make
from model.factory import architecture, architectures, create, qformer_config
from model.qformer import QFormerConfig


def test_the_named_architectures_ship():
    assert {"qformer-base", "qformer-toy"} <= set(architectures())


@pytest.mark.parametrize("name", architectures())
def test_each_named_architecture_builds_a_qformer_of_its_sizes(name):
    fields = architecture(name)
    with torch.device("meta"):  # shapes only: qformer-base is BLIP-2's 188M parameters
        model = create(name, vocab_size=30523, vision_width=1408)
    assert {k: getattr(model.config, k) for k in fields} == fields
    assert len(model.qformer.encoder.layer) == fields["num_hidden_layers"]
    assert model.query_tokens.shape == (1, fields["num_query_tokens"], fields["hidden_size"])
    crossing = [i for i, layer in enumerate(model.qformer.encoder.layer) if layer.has_cross_attention]
    assert crossing == list(range(0, fields["num_hidden_layers"], fields["cross_attention_frequency"]))


def test_qformer_base_is_blip2s_and_the_configs_defaults():
    base = qformer_config("qformer-base")
    sizes = (base.hidden_size, base.num_hidden_layers, base.num_query_tokens, base.cross_attention_frequency)
    assert sizes == (768, 12, 32, 2)
    assert base == QFormerConfig()  # a run that names no architecture gets qformer-base
    with torch.device("meta"):
        parameters = sum(p.numel() for p in create("qformer-base", vision_width=1408).parameters())
    assert 185e6 < parameters < 190e6  # BLIP-2 reports 188M for its Q-Former


def test_an_unknown_name_is_one_clear_error_listing_the_known_ones():
    with pytest.raises(ConfigError) as exc:
        architecture("qformer-huge", where="--model-config")
    message = str(exc.value)
    assert "\n" not in message and message.startswith("--model-config 'qformer-huge': not a known architecture")
    assert all(name in message for name in architectures())


def test_a_json_file_is_accepted_where_a_name_is_and_checked_the_same(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(architecture("qformer-toy")))
    assert architecture(str(path)) == architecture("qformer-toy")
    path.write_text(json.dumps({**architecture("qformer-toy"), "model_type": "capfilt-qformer", "vision": "open_clip:x"}))
    assert architecture(str(path)) == architecture("qformer-toy")  # a saved model's config: its encoder is no size
    path.write_text(json.dumps({"hidden_size": 64, "num_layers": 2}))
    with pytest.raises(ConfigError, match=rf"^--model-config {path}: unknown Q-Former config key\(s\) \['num_layers'\]"):
        architecture(str(path), where="--model-config")
    path.write_text(json.dumps({"hidden_size": 60, "num_attention_heads": 8}))
    with pytest.raises(ConfigError, match=rf"^arch {path}: hidden_size 60 must be a multiple"):
        architecture(str(path), where="arch")


def test_train_stage1_takes_a_name_a_file_or_fields(tmp_path):
    base = {"root": "r", "run": "x", "vision": "v", "out": "o"}
    by_name = make("train stage1", {**base, "model-config": "qformer-toy"}).config.model
    assert by_name == architecture("qformer-toy")
    (tmp_path / "toy.json").write_text(json.dumps(by_name))
    assert make("train stage1", {**base, "model-config": str(tmp_path / "toy.json")}).config.model == by_name
    fields = make("train stage1", {**base, "model-config": '{"num_hidden_layers": 2}'}).config.model
    assert fields == {"num_hidden_layers": 2}
    assert make("train stage1", base).config.model == {}  # qformer-base
    with pytest.raises(ConfigError, match="^stage train stage1: --model-config 'qformer-xl': not a known architecture"):
        make("train stage1", {**base, "model-config": "qformer-xl"})


@pytest.mark.parametrize("preset, name", [("blip2", "qformer-base"), ("toy", "qformer-toy")])
def test_the_presets_name_their_qformer(preset, name):
    stage1 = get_preset(preset, "toy-dir").stage1.values
    assert stage1["config.model"] == architecture(name)
    step = make("train stage1", {"root": "r", "run": "x", "out": "o", **stage1})
    assert qformer_config(step.config.model) == qformer_config(name)
