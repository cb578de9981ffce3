"""Frozen image encoders: loaded by name the way real ones are, second-to-last layer, frozen."""

from __future__ import annotations

import pytest
import torch

from capfilt.errors import ConfigError
from model.vision import FeatureCache, load_vision_encoder
from stage1_world import IMAGE_SIZE, make_clip_vision, make_open_clip


@pytest.fixture(scope="module")
def open_clip_spec(tmp_path_factory):
    return make_open_clip(tmp_path_factory.mktemp("open_clip"))


@pytest.fixture(scope="module")
def clip_spec(tmp_path_factory):
    return make_clip_vision(tmp_path_factory.mktemp("clip"))


def _block_output(blocks, encoder, pixels):
    """What the second-to-last block really returns, seen through a forward hook."""
    seen = {}
    handle = blocks[-2].register_forward_hook(lambda m, i, o: seen.update(out=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        tokens = encoder(pixels)
    handle.remove()
    return tokens, seen["out"]


def test_open_clip_encoder_returns_second_to_last_block_tokens(open_clip_spec):
    encoder = load_vision_encoder(open_clip_spec)
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    tokens, block = _block_output(encoder.visual.transformer.resblocks, encoder, pixels)
    assert tokens.shape == (2, 1 + (IMAGE_SIZE // 8) ** 2, 48)  # [CLS] + 4x4 patches
    assert encoder.width == 48 and encoder.preprocess.image_size == IMAGE_SIZE
    assert torch.allclose(tokens, block)


def test_transformers_clip_encoder_returns_second_to_last_layer(clip_spec):
    encoder = load_vision_encoder(clip_spec)
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    tokens, block = _block_output(encoder.model.encoder.layers, encoder, pixels)
    assert tokens.shape == (2, 17, 48)
    assert torch.allclose(tokens, block)


def test_encoders_are_frozen_and_stay_in_eval_mode(open_clip_spec, clip_spec):
    for spec in (open_clip_spec, clip_spec):
        encoder = load_vision_encoder(spec)
        encoder.train()
        assert not encoder.training and not any(m.training for m in encoder.modules())
        assert not any(p.requires_grad for p in encoder.parameters())
        out = encoder(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, requires_grad=True))
        assert not out.requires_grad


def test_unknown_encoders_give_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="open_clip has no model"):
        load_vision_encoder("open_clip:No-Such-Model")
    with pytest.raises(ConfigError, match="not a transformers model"):
        load_vision_encoder(str(tmp_path / "missing"))


def test_feature_cache_runs_the_encoder_once_per_image(clip_spec):
    encoder = load_vision_encoder(clip_spec)
    calls = []

    def pixels_for(keys):
        calls.append(list(keys))
        return torch.stack([torch.full((3, IMAGE_SIZE, IMAGE_SIZE), float(k)) for k in keys])

    cache = FeatureCache(encoder)
    first = cache(["1", "2"], pixels_for)
    again = cache(["2", "1", "3"], pixels_for)
    assert calls == [["1", "2"], ["3"]]
    assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])
