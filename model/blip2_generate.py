"""A Stage 2 model at work: captions and answers for images, deterministically, and the
Caption-stage captioner (`load_captioner(folder)`) built on it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from capfilt.device import autocast, pick_device
from capfilt.errors import ConfigError

from .blip2 import CONFIG_NAME, Blip2Stage2, resolve_checkpoint
from .captioners import Captioner, Decoding
from .data import hash_seed, pil_pixels
from .vision import FrozenImageEncoder, load_vision_encoder

VQA_PROMPT = "Question: {} Answer:"  # LAVIS's OPT/T5 VQA prompt


def _pil(image) -> "object":
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image)).convert("RGB")
    if isinstance(image, (str, Path)):
        return Image.open(image).convert("RGB")
    return image.convert("RGB")


def pixels_of(image, preprocess) -> torch.Tensor:
    """The plain-resize preprocessing of training (no crop, no flip) for bytes, a path or a PIL image."""
    return pil_pixels(_pil(image), preprocess)


@dataclass
class Stage2Generator:
    """A Stage 2 model with its frozen encoder: captions and answers for images, deterministically."""

    model: Blip2Stage2
    encoder: FrozenImageEncoder
    id: str = ""
    defaults: dict = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, folder: str | Path, vision: str | None = None, llm: str | None = None,
                        device: str = "auto") -> "Stage2Generator":
        """A trainer --out folder (latest step), a step-* folder, a model folder, or a transformers
        Blip2ForConditionalGeneration checkpoint (folder or hub id)."""
        device = pick_device(device)
        path = Path(folder)
        config = path / CONFIG_NAME
        hub_id = not path.exists()
        if hub_id and (path.is_absolute() or str(folder).startswith(".") or str(folder).count("/") > 1):
            raise ConfigError(f"--stage2 {folder}: no such folder; pass a `capfilt train stage2 --out` folder, "
                              f"a step-* folder or its model/, or a BLIP-2 hub id (e.g. Salesforce/blip2-opt-2.7b).")
        if hub_id or (config.exists() and json.loads(config.read_text()).get("model_type") == "blip-2"):
            model, encoder = Blip2Stage2.from_blip2(str(folder), device)
            return cls(model.eval(), encoder, str(folder))
        _, model_dir = resolve_checkpoint(folder)
        model = Blip2Stage2.from_pretrained(model_dir, device, llm=llm)
        spec = vision or model.config.vision
        if not spec:
            raise ConfigError(f"{folder}: the checkpoint names no image encoder; pass vision=.")
        return cls(model.eval(), load_vision_encoder(spec, device), str(folder))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def pixels(self, images) -> torch.Tensor:
        return torch.stack([pixels_of(im, self.encoder.preprocess) for im in images]).to(self.device)

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels)

    def generate_ids(self, images, prompts: list[str], **kwargs) -> list[list[int]]:
        with autocast(self.device):
            return self.model.generate_ids(self.features(self.pixels(images)), prompts, **kwargs)

    def caption(self, images, prompt: str | None = None, num_beams: int = 5, max_new_tokens: int = 30,
                min_new_tokens: int = 1, top_p: float | None = None, seed: int = 0,
                repetition_penalty: float = 1.0, first_index: int = 0, length_penalty: float = 1.0) -> list[str]:
        """One caption per image: beam search by default; `top_p` switches to nucleus sampling
        where image i (counted from `first_index`) draws from its own generator seeded by (seed, i)."""
        prompt = self.model.config.prompt if prompt is None else prompt
        seeds = [hash_seed(seed, first_index + i) for i in range(len(images))] if top_p is not None else None
        ids = self.generate_ids(images, [prompt] * len(images), num_beams=num_beams, max_new_tokens=max_new_tokens,
                                min_new_tokens=min_new_tokens, top_p=top_p, seeds=seeds,
                                repetition_penalty=repetition_penalty, length_penalty=length_penalty)
        return self.model.decode(ids)

    def answer(self, images, questions: list[str], num_beams: int = 5, max_new_tokens: int = 10,
               template: str = VQA_PROMPT, min_new_tokens: int = 1, length_penalty: float = 1.0) -> list[str]:
        """Short answers, one per (image, question), with LAVIS's "Question: {} Answer:" prompt."""
        if len(questions) != len(images):
            raise ConfigError(f"{len(images)} images but {len(questions)} questions; give one question per image.")
        prompts = [template.format(q) for q in questions]
        ids = self.generate_ids(images, prompts, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                min_new_tokens=min_new_tokens, length_penalty=length_penalty)
        return self.model.decode(ids)


class Stage2Captioner(Captioner):
    """A Stage 2 checkpoint as a Caption-stage captioner (`load_captioner(folder)`)."""

    def __init__(self, id_or_path: str, device: str = "auto"):
        self.generator = Stage2Generator.from_checkpoint(id_or_path, device=device)
        self.id = str(id_or_path)

    def prepare(self, images, prompt):
        gen = self.generator
        return {"pixels": gen.pixels(images), "prompt": prompt}

    @torch.no_grad()
    def generate(self, inputs, decoding: Decoding, seeds):
        gen = self.generator
        batch, n = inputs["pixels"].shape[0], decoding.num_captions
        if len(seeds) != batch or any(len(s) != n for s in seeds):
            raise ValueError(f"need {n} seeds for each of {batch} images")
        with autocast(gen.device):
            ids = gen.model.generate_ids(
                gen.features(inputs["pixels"]), [inputs["prompt"]] * batch, num_beams=decoding.num_beams,
                max_new_tokens=decoding.max_length, min_new_tokens=decoding.min_length, num_return_sequences=n,
                repetition_penalty=decoding.repetition_penalty,
                top_p=decoding.top_p if decoding.sampling else None,
                seeds=[s for per_image in seeds for s in per_image] if decoding.sampling else None,
            )
        texts = gen.model.decode(ids)
        return [texts[i * n:(i + 1) * n] for i in range(batch)]


def load_stage2_captioner(id_or_path: str, device: str = "auto") -> Captioner:
    return Stage2Captioner(id_or_path, device)
