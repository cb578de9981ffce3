"""Scorers for the Filter stage: CLIP similarity (open_clip) and ITM match probability.

`load_clip(name, pretrained)` builds any open_clip model by name with a pretrained tag (as
open_clip's registry knows them, e.g. ViT-L-14 + openai) or a local checkpoint file; a model
config JSON of one's own is registered first with `register_clip_config(path)`, which is how the
tiny test models take the same path as a real name.

`load_itm(id_or_path)` loads a transformers image-text matching model by hub id or
`save_pretrained` folder, choosing the class from the checkpoint's `model_type` (BLIP:
BlipForImageTextRetrieval, BLIP-2: Blip2ForImageTextRetrieval, capfilt's Stage 1 Q-Former:
"capfilt-qformer", whose folders are a `capfilt train stage1 --out`, one of its step-* folders
or a step's model/), through the one registry of model families (model/registry.py).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod

import numpy as np
import torch
from PIL import Image

from capfilt.device import autocast, inference_dtype, pick_device
from capfilt.errors import ConfigError, first_line
from capfilt.logs import RANDOM_INIT, expected

from . import registry


# -- CLIP ------------------------------------------------------------------------------------

def register_clip_config(path: str) -> list[str]:
    """Register open_clip model config(s) from a JSON file or folder; returns the new names."""
    import open_clip

    if not os.path.exists(path):
        raise ConfigError(f"--clip-config {path}: no such file or folder.")
    before = set(open_clip.list_models())
    open_clip.add_model_config(path)
    return sorted(set(open_clip.list_models()) - before)


def _loads_weights_file(name: str, pretrained: str | None) -> bool:
    """Whether open_clip will load every weight from a local file: a checkpoint path, or a
    `local-dir:` folder holding one (open_clip loads a full checkpoint strictly: a missing weight
    is an error, never a random one)."""
    from pathlib import Path

    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):])
        return folder.is_dir() and any(folder.glob(f"*.{ext}") for ext in ("safetensors", "bin", "pth"))
    return bool(pretrained) and os.path.isfile(pretrained)


def _skipped_init(skip: bool):
    """No random initialisation of weights a checkpoint overwrites right after (transformers'
    `no_init_weights`, which patches torch.nn.init): a tenth of a second of a small run's start-up."""
    from contextlib import nullcontext

    if not skip:
        return nullcontext()
    from transformers.initialization import no_init_weights

    return no_init_weights()


class ClipScorer:
    """An open_clip model that embeds images and texts (L2-normalised) and scores pairs."""

    def __init__(self, name: str, pretrained: str | None = None, device: str = "auto"):
        import open_clip

        if name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
            raise ConfigError(
                f"--clip {name!r} is not an open_clip model name (e.g. ViT-L-14); register your own "
                f"config with --clip-config FILE.json."
            )
        self.device = pick_device(device)
        try:
            with _skipped_init(_loads_weights_file(name, pretrained)):
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=pretrained or None, device=self.device
                )
        except (RuntimeError, OSError, ValueError) as exc:
            raise ConfigError(
                f"--clip {name} --clip-pretrained {pretrained!r}: cannot load ({first_line(exc)}). Give an "
                f"open_clip pretrained tag or a local checkpoint file."
            ) from exc
        self.model = model.eval().to(dtype=inference_dtype(self.device))
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(name)
        self.id = f"{name}:{pretrained}" if pretrained else name

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        pixels = torch.stack([self.preprocess(img) for img in images]).to(self.device, inference_dtype(self.device))
        with autocast(self.device):
            features = self.model.encode_image(pixels)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer([t or "" for t in texts]).to(self.device)
        with autocast(self.device):
            features = self.model.encode_text(tokens)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()


    def pair_scores(self, images: list[Image.Image], texts: list[str]) -> np.ndarray:
        """Cosine similarity of each (image, text) pair: the score stage's clip_score."""
        return (self.embed_images(images) * self.embed_texts(texts)).sum(axis=1)


def load_clip(name: str, pretrained: str | None = None, device: str = "auto", config: str | None = None) -> ClipScorer:
    """An open_clip model by name and pretrained tag/file; `config` registers model configs first."""
    if config:
        register_clip_config(config)
    return ClipScorer(name, pretrained, device)


def save_random_clip(folder: str, name: str = "capfilt-tiny-clip", width: int = 32, image_size: int = 32) -> tuple[str, str, str]:
    """Write a tiny open_clip config and randomly initialised checkpoint to `folder`.

    Returns (config path, model name, checkpoint path): register the config, then load
    (name, checkpoint) exactly like a real model name and pretrained file.
    """
    import open_clip

    os.makedirs(folder, exist_ok=True)
    config = {
        "embed_dim": width,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": width, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": width, "heads": 2, "layers": 2},
    }
    config_path = os.path.join(folder, f"{name}.json")
    with open(config_path, "w") as handle:
        json.dump(config, handle)
    register_clip_config(config_path)
    with expected(RANDOM_INIT):  # random on purpose: a test model, saved to load like a real one
        model = open_clip.create_model(name)
    checkpoint = os.path.join(folder, f"{name}.pt")
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return config_path, name, checkpoint


# -- ITM -------------------------------------------------------------------------------------

class ItmScorer(ABC):
    """Image-text matching: the probability that a caption describes an image."""

    id: str
    # True where a score depends on which images the model trained on (model/folds.py): the
    # score stage then passes each image's sample id as `keys`.
    keyed = False

    @abstractmethod
    def match_probability(self, images: list[Image.Image], texts: list[str]) -> np.ndarray:
        """One probability per (images[i], texts[i]) pair."""

    def match_probability_of(self, images: list[Image.Image], image_of: list[int], texts: list[str]) -> np.ndarray:
        """One probability per (images[image_of[i]], texts[i]) pair: a batch whose captions share
        images names each image once. A family that can prepare an image once for all its captions
        overrides this."""
        return self.match_probability([images[i] for i in image_of], texts)


class HFItmScorer(ItmScorer):
    """transformers BlipForImageTextRetrieval / Blip2ForImageTextRetrieval with the ITM head."""

    def __init__(self, id_or_path: str, model_class, device: str = "auto"):
        from transformers import AutoProcessor

        self.id = id_or_path
        self.device = pick_device(device)
        dtype = inference_dtype(self.device)
        try:
            self.processor = AutoProcessor.from_pretrained(id_or_path)
            self.model = model_class.from_pretrained(id_or_path, dtype=dtype).eval().to(self.device)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--itm {id_or_path}: cannot load ({first_line(exc)}).") from exc

    def match_probability(self, images, texts):
        return self.match_probability_of(images, list(range(len(images))), texts)

    @torch.no_grad()
    def match_probability_of(self, images, image_of, texts):
        # Each distinct image is resized and normalised once, its pixels then repeated for each of
        # its captions: BLIP's processor at 384 px takes milliseconds an image on a CPU core, and
        # with 3 captions an image every pair's copy cost 2.6-7.5x each image once (benchmarks/score.py (d)).
        inputs = self.processor(images=images, text=[t or "" for t in texts], return_tensors="pt",
                                padding=True, truncation=True, max_length=64)
        inputs["pixel_values"] = inputs["pixel_values"][torch.as_tensor(image_of, dtype=torch.long)]
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(inference_dtype(self.device))
        with autocast(self.device):
            out = self.model(**inputs, use_image_text_matching_head=True) if "Blip2" in type(self.model).__name__ \
                else self.model(**inputs, use_itm_head=True)
        logits = out.logits_per_image if getattr(out, "itm_score", None) is None else out.itm_score
        return torch.softmax(logits.float(), dim=-1)[:, 1].cpu().numpy()


# The ITM families' loaders (model/registry.py names them): transformers' BLIP and BLIP-2 retrieval models,
# capfilt's own Stage 1.
def blip_itm(id_or_path: str, device: str) -> ItmScorer:
    from transformers import BlipForImageTextRetrieval

    return HFItmScorer(id_or_path, BlipForImageTextRetrieval, device)


def blip2_itm(id_or_path: str, device: str) -> ItmScorer:
    from transformers import Blip2ForImageTextRetrieval

    return HFItmScorer(id_or_path, Blip2ForImageTextRetrieval, device)


def stage1_itm(id_or_path: str, device: str) -> ItmScorer:
    from model.stage1_inference import Stage1Scorer

    return Stage1Scorer.from_checkpoint(id_or_path, device=device)


def _stage1_config(id_or_path: str) -> dict | None:
    """The Q-Former config of a local Stage 1 checkpoint folder (trainer --out, step-* or model/), else None."""
    if not os.path.isdir(id_or_path):
        return None
    from model.qformer import CONFIG_NAME
    from model.stage1_inference import resolve_checkpoint

    _, model_dir = resolve_checkpoint(id_or_path)
    path = model_dir / CONFIG_NAME
    if not path.exists():
        return None
    config = json.loads(path.read_text())
    # Q-Former configs written before they carried a model_type are still Q-Formers: the file name says so.
    config.setdefault("model_type", registry.STAGE1_MODEL_TYPE)
    return config


def itm_model_type(id_or_path: str) -> str:
    """The `model_type` of an ITM checkpoint (a Stage 1 folder, a save_pretrained folder or a hub id)."""
    return registry.model_type("itm", id_or_path, _stage1_config(id_or_path))


def load_itm(id_or_path: str, device: str = "auto") -> ItmScorer:
    return registry.load("itm", itm_model_type(id_or_path), id_or_path, device)


def save_random_itm(folder: str, width: int = 32, image_size: int = 32) -> str:
    """A randomly initialised BLIP ITM model + processor in `folder` (tests, demos, benchmarks)."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    from model.captioners import save_random_captioner

    save_random_captioner(folder, family="blip", width=width, image_size=image_size)
    config = BlipConfig.from_pretrained(folder)
    BlipForImageTextRetrieval(config).save_pretrained(folder)
    return folder
