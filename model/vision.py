"""Frozen image encoders behind one interface: pixels in, image tokens from the second-to-last layer out.

Two families, named by one string (the CLI's `--vision`):
  open_clip:<model name>[@<pretrained tag or checkpoint file>]   e.g. open_clip:ViT-L-14@openai,
      open_clip:EVA01-g-14@laion400m_s11b_b41k; a model name registered with
      `open_clip.add_model_config` (tests register a tiny one) loads the same way.
  <hub id or folder of a transformers model>                      CLIP, SigLIP or BLIP-2 vision
      models (also a full CLIP/SigLIP/BLIP-2 checkpoint: its vision tower is taken).

Every encoder is frozen: eval mode, `requires_grad=False`, run under `torch.no_grad()`, and held
in bf16/fp16 on GPU (fp32 on CPU). The trainable LayerNorm on top (LAVIS `ln_vision`) lives in
the Q-Former, so the encoder's outputs never change and can be cached (`FeatureCache`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from capfilt.device import inference_dtype
from capfilt.errors import ConfigError

OPEN_CLIP_PREFIX = "open_clip:"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Preprocess:
    """What pixels the encoder expects: square side and per-channel normalisation."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class FrozenImageEncoder(nn.Module):
    """A frozen vision model returning (B, N, width) image tokens of one hidden layer."""

    def __init__(self, name: str, width: int, preprocess: Preprocess):
        super().__init__()
        self.name = name
        self.width = width
        self.preprocess = preprocess

    def freeze(self) -> "FrozenImageEncoder":
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "FrozenImageEncoder":
        # A frozen encoder stays in eval mode (no dropout, fixed norms) even inside model.train().
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        return self.tokens(pixel_values.to(dtype))

    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class OpenClipEncoder(FrozenImageEncoder):
    """open_clip ViT: tokens ([CLS] + patches) after the second-to-last transformer block."""

    def __init__(self, name: str, visual: nn.Module):
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
            raise ConfigError(
                f"--vision {name}: this open_clip image tower ({type(visual).__name__}) has no "
                f"intermediate-layer access capfilt knows; use an open_clip ViT model."
            )
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
        preprocess = Preprocess(int(size), tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD)))
        super().__init__(name, visual.transformer.width, preprocess)
        self.visual = visual

    def tokens(self, pixel_values):
        out = self.visual.forward_intermediates(
            pixel_values, indices=2, intermediates_only=True, output_fmt="NLC", output_extra_tokens=True
        )
        # indices=2 -> the last two blocks; [0] is the second-to-last. Keep [CLS] as LAVIS does.
        return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)


class TransformersEncoder(FrozenImageEncoder):
    """CLIPVisionModel / SiglipVisionModel / Blip2VisionModel: hidden states of one layer."""

    def __init__(self, name: str, model: nn.Module, preprocess: Preprocess, layer: int):
        super().__init__(name, model.config.hidden_size, preprocess)
        self.model = model
        self.layer = layer

    def tokens(self, pixel_values):
        return self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.layer]


# model_type -> (transformers class name, mean, std, hidden-state index)
# Blip2VisionModel checkpoints (EVA ViT-g in blip2-*) already dropped the last block, as LAVIS
# does, so their last hidden state (before post_layernorm, which is LAVIS's ln_vision) is the
# second-to-last layer of the original ViT.
_TRANSFORMERS_FAMILIES = {
    "clip": ("CLIPVisionModel", CLIP_MEAN, CLIP_STD, -2),
    "clip_vision_model": ("CLIPVisionModel", CLIP_MEAN, CLIP_STD, -2),
    "siglip": ("SiglipVisionModel", SIGLIP_MEAN, SIGLIP_STD, -2),
    "siglip_vision_model": ("SiglipVisionModel", SIGLIP_MEAN, SIGLIP_STD, -2),
    "blip-2": ("Blip2VisionModel", CLIP_MEAN, CLIP_STD, -1),
    "blip_2_vision_model": ("Blip2VisionModel", CLIP_MEAN, CLIP_STD, -1),
}


def _load_open_clip(spec: str, device: torch.device, dtype: torch.dtype) -> FrozenImageEncoder:
    import open_clip

    name, _, pretrained = spec[len(OPEN_CLIP_PREFIX):].partition("@")
    if name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(
            f"--vision {spec}: open_clip has no model '{name}'. Known names include "
            f"{', '.join(sorted(open_clip.list_models())[:8])}, ... (open_clip.list_models())."
        )
    precision = {torch.float32: "fp32", torch.bfloat16: "pure_bf16", torch.float16: "pure_fp16"}[dtype]
    try:
        model = open_clip.create_model(name, pretrained=pretrained or None, precision=precision, device=device)
    except (RuntimeError, OSError) as exc:
        raise ConfigError(f"--vision {spec}: cannot load open_clip weights '{pretrained}' ({exc}).") from exc
    return OpenClipEncoder(spec, model.visual)


def _load_transformers(spec: str, device: torch.device, dtype: torch.dtype) -> FrozenImageEncoder:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--vision {spec}: not a transformers model folder or hub id ({exc}). For open_clip "
            f"models write open_clip:<name>@<tag or checkpoint>."
        ) from exc
    family = _TRANSFORMERS_FAMILIES.get(config.model_type)
    if family is None:
        raise ConfigError(
            f"--vision {spec}: model type '{config.model_type}' is not supported; use one of "
            f"{sorted(_TRANSFORMERS_FAMILIES)} or an open_clip model."
        )
    class_name, mean, std, layer = family
    model = getattr(transformers, class_name).from_pretrained(spec, dtype=dtype).to(device)
    vision_config = getattr(model.config, "vision_config", model.config)
    processor_file = Path(spec) / "preprocessor_config.json"
    if processor_file.exists():  # a local folder may say its normalisation; hub ids use the family's
        processor = json.loads(processor_file.read_text())
        mean = tuple(processor.get("image_mean", mean))
        std = tuple(processor.get("image_std", std))
    return TransformersEncoder(spec, model, Preprocess(int(vision_config.image_size), mean, std), layer)


def load_vision_encoder(spec: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> FrozenImageEncoder:
    """Load and freeze the encoder named by `spec` (see the module docstring for the forms)."""
    device = torch.device(device)
    dtype = dtype or inference_dtype(device)
    if spec.startswith(OPEN_CLIP_PREFIX):
        encoder = _load_open_clip(spec, device, dtype)
    else:
        encoder = _load_transformers(spec, device, dtype)
    return encoder.freeze()


class FeatureCache:
    """Image tokens of the frozen encoder, computed once per image and kept in memory.

    Valid only when the pixels of an image never change between epochs, i.e. with augmentation
    off (the trainer refuses random crops / flips with a cache). Features are stored in the
    encoder's dtype (bf16/fp16 on GPU) on the CPU.
    """

    def __init__(self, encoder: FrozenImageEncoder, pixels_for=None):
        self.encoder = encoder
        self.pixels_for = pixels_for
        self.features: dict[str, torch.Tensor] = {}

    def __call__(self, keys: list[str], pixels_for=None) -> torch.Tensor:
        """Features of `keys`; `pixels_for(missing_keys)` (or the one given at construction) gives
        pixel batches for the uncached ones, so images are decoded only when the cache lacks them."""
        missing = [k for k in keys if k not in self.features]
        if missing:
            device = next(self.encoder.parameters()).device
            computed = self.encoder((pixels_for or self.pixels_for)(missing).to(device)).cpu()
            for key, feats in zip(missing, computed):
                self.features[key] = feats
        return torch.stack([self.features[k] for k in keys])
