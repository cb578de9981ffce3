"""Official BLIP-2 Stage 1 weights in and out: LAVIS state dicts and HF `Blip2ForImageTextRetrieval`.

capfilt's parameter names are HF's (see model/qformer.py), so the HF mapping is nearly the
identity; LAVIS's needs renaming. Key mapping, LAVIS -> capfilt:

  Qformer.bert.embeddings.{word,position}_embeddings  -> embeddings.{word,position}_embeddings
  Qformer.bert.embeddings.LayerNorm                   -> qformer.layernorm
  Qformer.bert.encoder.layer.N.attention.self.*       -> qformer.encoder.layer.N.attention.attention.*
  Qformer.bert.encoder.layer.N.crossattention.self.*  -> qformer.encoder.layer.N.crossattention.attention.*
  Qformer.bert.encoder.* (everything else)            -> qformer.encoder.* (same names)
  Qformer.cls.predictions.transform.dense             -> lm_head.dense
  Qformer.cls.predictions.transform.LayerNorm         -> lm_head.layer_norm
  Qformer.cls.predictions.bias / .decoder.bias        -> lm_head.decoder.bias
  Qformer.cls.predictions.decoder.weight              -> (tied to embeddings.word_embeddings)
  vision_proj / text_proj                             -> vision_projection / text_projection
  query_tokens, itm_head, temp, ln_vision             -> same names
  visual_encoder.*, *.position_ids                    -> not part of the Q-Former (dropped)

HF Blip2ForImageTextRetrieval -> capfilt: `vision_model.post_layernorm` -> `ln_vision`, the
rest of `vision_model.*` is the frozen encoder (load it as a Blip2VisionModel), every other key
keeps its name. HF has no ITG head and no temperature: those keep their init (reported).
"""

from __future__ import annotations

import re

import torch

from capfilt.errors import ConfigError

from .qformer import QFormer

_LAVIS_TO_CAPFILT = [
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (r"^Qformer\.bert\.embeddings\.", "embeddings."),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.", r"qformer.encoder.layer.\1.\2.attention."),
    (r"^Qformer\.bert\.encoder\.", "qformer.encoder."),
    (r"^Qformer\.cls\.predictions\.transform\.dense\.", "lm_head.dense."),
    (r"^Qformer\.cls\.predictions\.transform\.LayerNorm\.", "lm_head.layer_norm."),
    (r"^Qformer\.cls\.predictions\.(decoder\.)?bias$", "lm_head.decoder.bias"),
    (r"^vision_proj\.", "vision_projection."),
    (r"^text_proj\.", "text_projection."),
]
_CAPFILT_TO_LAVIS = [
    (r"^qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
    (r"^embeddings\.", "Qformer.bert.embeddings."),
    (r"^qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.", r"Qformer.bert.encoder.layer.\1.\2.self."),
    (r"^qformer\.encoder\.", "Qformer.bert.encoder."),
    (r"^lm_head\.dense\.", "Qformer.cls.predictions.transform.dense."),
    (r"^lm_head\.layer_norm\.", "Qformer.cls.predictions.transform.LayerNorm."),
    (r"^lm_head\.decoder\.bias$", "Qformer.cls.predictions.bias"),
    (r"^vision_projection\.", "vision_proj."),
    (r"^text_projection\.", "text_proj."),
]
_DROPPED = re.compile(r"(^visual_encoder\.|position_ids$|^Qformer\.cls\.predictions\.decoder\.weight$|^lm_head\.decoder\.weight$)")


def _rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    return key


def lavis_to_capfilt(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LAVIS blip2 (Stage 1) state dict, e.g. blip2_pretrained.pth['model'], in capfilt's names."""
    return {_rename(k, _LAVIS_TO_CAPFILT): v for k, v in state_dict.items() if not _DROPPED.search(k)}


def capfilt_to_lavis(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """capfilt's Q-Former state dict in LAVIS's names (the tied decoder weight written out, as LAVIS has it)."""
    out = {_rename(k, _CAPFILT_TO_LAVIS): v for k, v in state_dict.items() if not _DROPPED.search(k)}
    out["Qformer.cls.predictions.decoder.weight"] = state_dict["embeddings.word_embeddings.weight"]
    return out


def hf_retrieval_to_capfilt(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Blip2ForImageTextRetrieval state dict's Q-Former part in capfilt's names."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("vision_model.post_layernorm."):
            out["ln_vision." + key.rsplit(".", 1)[1]] = value
        elif not key.startswith("vision_model.") and not key.endswith("position_ids"):
            out[key] = value
    return out


def capfilt_to_hf_retrieval(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Q-Former part of a Blip2ForImageTextRetrieval state dict (add the vision model's own)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("ln_vision."):
            out["vision_model.post_layernorm." + key.rsplit(".", 1)[1]] = value
        elif not key.startswith(("lm_head.", "temp")):
            out[key] = value
    return out


def load_into(model: QFormer, state_dict: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load mapped weights; returns the model keys they did not cover. Unknown keys are an error."""
    result = model.load_state_dict(state_dict, strict=False)
    if result.unexpected_keys:
        raise ConfigError(
            f"{source}: {len(result.unexpected_keys)} weight(s) have no place in this Q-Former, e.g. "
            f"{result.unexpected_keys[:3]}; is the Q-Former config the checkpoint's (layers, queries, widths)?"
        )
    return [k for k in result.missing_keys if k != "lm_head.decoder.weight"]  # tied to the embeddings
