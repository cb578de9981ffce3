"""Official weight layouts: LAVIS state dicts and transformers' Blip2ForImageTextRetrieval."""

from __future__ import annotations

import pytest
import torch

from capfilt.errors import ConfigError
from model.qformer import QFormer, QFormerConfig
from model.convert import capfilt_to_hf_retrieval, capfilt_to_lavis, hf_retrieval_to_capfilt, lavis_to_capfilt, load_into

VISION_WIDTH = 48


def tiny_qformer(**overrides) -> QFormer:
    torch.manual_seed(0)
    settings = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    num_query_tokens=4, embed_dim=16, vision_width=VISION_WIDTH, max_position_embeddings=40,
                    dec_token_id=49, cls_token_id=2, vision_layer_norm_eps=1e-6)
    settings.update(overrides)
    return QFormer(QFormerConfig(**settings)).eval()


def test_lavis_keys_round_trip_and_load():
    model = tiny_qformer()
    lavis = capfilt_to_lavis(model.state_dict())
    assert "Qformer.bert.encoder.layer.0.crossattention.self.query.weight" in lavis
    assert "Qformer.bert.encoder.layer.1.output_query.dense.weight" in lavis
    assert "Qformer.bert.embeddings.LayerNorm.weight" in lavis and "vision_proj.weight" in lavis
    lavis["visual_encoder.blocks.0.attn.qkv.weight"] = torch.zeros(3)  # the frozen ViT travels along; dropped
    fresh = tiny_qformer()
    torch.nn.init.zeros_(fresh.itm_head.weight)
    assert load_into(fresh, lavis_to_capfilt(lavis), "lavis") == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key


def test_weights_of_another_architecture_are_refused_with_the_reason():
    lavis = capfilt_to_lavis(tiny_qformer(num_hidden_layers=3).state_dict())
    with pytest.raises(ConfigError, match="no place in this Q-Former"):
        load_into(tiny_qformer(), lavis_to_capfilt(lavis), "blip2_pretrained.pth")


def _tiny_blip2_retrieval():
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2QFormerConfig, Blip2VisionConfig

    vision = Blip2VisionConfig(hidden_size=VISION_WIDTH, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=3, image_size=32, patch_size=8)
    qformer = Blip2QFormerConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=40, encoder_hidden_size=VISION_WIDTH,
                                 use_qformer_text_input=True)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), num_query_tokens=4,
                         image_text_hidden_size=16)
    torch.manual_seed(1)
    return Blip2ForImageTextRetrieval(config).eval()


def test_saved_qformer_loads_into_transformers_blip2_retrieval_and_scores_the_same(tmp_path):
    from model.vision import Preprocess, TransformersEncoder

    hf = _tiny_blip2_retrieval()
    vision_state = {k: v for k, v in hf.state_dict().items() if k.startswith("vision_model.")}
    model = tiny_qformer()
    model.save_pretrained(tmp_path / "q")
    ours = QFormer.from_pretrained(tmp_path / "q").eval()
    state = {**vision_state, **capfilt_to_hf_retrieval(ours.state_dict())}
    result = hf.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []

    encoder = TransformersEncoder("blip2", hf.vision_model, Preprocess(32, (0.5,) * 3, (0.5,) * 3), layer=-1).freeze()
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[2, 5, 6, 7, 0], [2, 9, 8, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        theirs_itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        tokens = ours.prepare_image(encoder(pixels))
        mine_itm = ours.itm_logits(tokens, ids, mask)
        theirs_itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        mine_itc = torch.einsum("bqd,nd->bnq", ours.image_features(tokens), ours.text_features(ids, mask)).amax(-1)
    assert torch.allclose(theirs_itm.logits_per_image, mine_itm, atol=1e-5)
    assert torch.allclose(theirs_itc.logits_per_image, mine_itc, atol=1e-5)

    back = tiny_qformer()
    missing = load_into(back, hf_retrieval_to_capfilt(hf.state_dict()), "hf")
    assert sorted(missing) == ["lm_head.decoder.bias", "lm_head.dense.bias", "lm_head.dense.weight",
                               "lm_head.layer_norm.bias", "lm_head.layer_norm.weight", "temp"]
    assert torch.equal(back.itm_head.weight, ours.itm_head.weight) and torch.equal(back.ln_vision.weight, ours.ln_vision.weight)
