"""The toy CLIP: a tiny open_clip ViT trained contrastively on (image, web caption) pairs."""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from capfilt.errors import ConfigError
from capfilt.logs import RANDOM_INIT, expected

from .preset import ToyPreset, write_info
from .tokenizer import train_text_tokenizer
from .training import Batches, threads, train_in_memory


@dataclass(frozen=True)
class ToyClip:
    """Where a toy CLIP lives and how to name it.

    `config` is an open_clip model config for `register_clip_config`; `checkpoint` the weights
    (safetensors). `folder` is also an open_clip `local-dir:` folder, which needs no registration
    in the loading process (Ray workers, a fresh CLI): prefer `local_vision_spec` for Stage 1.
    """

    name: str
    config: str
    checkpoint: str
    folder: str
    metrics: dict = field(default_factory=dict)

    @property
    def vision_spec(self) -> str:
        """For load_vision_encoder, in a process that has registered `config`."""
        return f"open_clip:{self.name}@{self.checkpoint}"

    @property
    def local_vision_spec(self) -> str:
        """For load_vision_encoder in any process."""
        return f"open_clip:local-dir:{self.folder}"

    def load_scorer(self, device: str = "cpu"):
        """The Filter stage's CLIP scorer, through the same calls as a real name."""
        from model.scorers import load_clip

        return load_clip(self.name, self.checkpoint, device, self.config)


def clip_model_config(preset: ToyPreset, tokenizer_folder: str | Path, vocab_size: int, eos_id: int) -> dict:
    """The open_clip model config (architecture as data, like open_clip's model_configs/*.json).

    Text goes through a WordPiece tokenizer trained on the source (open_clip's HFTokenizer via
    `hf_tokenizer_name`, a local folder here) instead of open_clip's SimpleTokenizer: its 49408-row
    embedding, mostly never seen, made the optimizer step the dominant cost on 2 cores (measured
    ~10x the rest of the model). Pooling is at the tokenizer's [SEP] ('eos'), since CLIP's
    'argmax' pooling relies on EOT being the largest id, true only for SimpleTokenizer.
    """
    return {
        "embed_dim": preset.clip_embed_dim,
        "vision_cfg": {
            "image_size": preset.image_size, "layers": preset.clip_layers, "width": preset.clip_width,
            "head_width": preset.clip_head_width, "patch_size": preset.patch_size,
            "patch_dropout": preset.clip_patch_dropout,
        },
        "text_cfg": {
            "context_length": preset.clip_context_length, "vocab_size": vocab_size, "width": preset.clip_text_width,
            "heads": max(1, preset.clip_text_width // preset.clip_head_width), "layers": preset.clip_text_layers,
            "hf_tokenizer_name": str(tokenizer_folder), "pool_type": "eos", "eos_id": eos_id, "pad_id": 0,
        },
    }


def _decode_images(images: Sequence[bytes], preprocess) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    pixels = []
    for i, data in enumerate(images):
        try:
            img = Image.open(io.BytesIO(data)).convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise ConfigError(f"pretrain_clip: pair {i} has image bytes PIL cannot decode ({exc}); pass decoded "
                              f"images only (e.g. the images/ of an ingested run).") from exc
        pixels.append(preprocess(img))
    return torch.stack(pixels)


@torch.no_grad()
def clip_retrieval_top1(model, tokenizer, preprocess, pairs: Sequence[tuple[bytes, str]]) -> dict:
    """In-batch top-1 of image->text and text->image over `pairs` (chance = 1 / len(pairs)).

    A text repeated across pairs (same scene, same caption) counts as correct for any of them.
    """
    images = _decode_images([p[0] for p in pairs], preprocess)
    texts = [p[1] or "" for p in pairs]
    model.eval()
    img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    txt = torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1)
    sims = img @ txt.T
    same = torch.tensor([[a == b for b in texts] for a in texts])
    i2t = same[torch.arange(len(texts)), sims.argmax(dim=1)].float().mean().item()
    t2i = same[sims.argmax(dim=0), torch.arange(len(texts))].float().mean().item()
    return {"image_to_text_top1": i2t, "text_to_image_top1": t2i, "pairs": len(pairs), "chance": 1 / len(pairs)}


def pretrain_clip(pairs: Sequence[tuple[bytes, str]], folder: str | Path, preset: ToyPreset = ToyPreset(),
                  eval_pairs: Sequence[tuple[bytes, str]] | None = None) -> ToyClip:
    """Train a tiny open_clip CLIP contrastively on raw (image bytes, web caption) pairs.

    open_clip's own pieces do the work: the model from a registered config, its eval preprocess,
    its tokenizer and `open_clip.loss.ClipLoss`. Deviation from CLIP training: no random crops
    (images are preprocessed once, which is most of the speed on 2 cores). `eval_pairs` (e.g.
    held-out images with clean captions) are scored with `clip_retrieval_top1` after training.
    """
    if len(pairs) < 2:
        raise ConfigError(f"pretrain_clip: need at least 2 (image, text) pairs, got {len(pairs)}.")
    with threads(preset.threads):
        return _pretrain_clip(pairs, Path(folder), preset, eval_pairs)


def _pretrain_clip(pairs, folder: Path, preset: ToyPreset, eval_pairs) -> ToyClip:
    import open_clip
    from safetensors.torch import save_file

    started, cpu_started = time.perf_counter(), time.process_time()
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    # The tokenizer lives in the CLIP folder: open_clip's local-dir: loader looks for it there.
    from transformers import BertTokenizerFast

    text_tokenizer = BertTokenizerFast.from_pretrained(train_text_tokenizer([p[1] for p in pairs], folder, preset))
    cfg = clip_model_config(preset, folder, len(text_tokenizer), text_tokenizer.sep_token_id)
    config_path = folder / f"{preset.clip_name}.json"
    config_path.write_text(json.dumps(cfg, indent=1))
    open_clip.add_model_config(config_path)
    torch.manual_seed(preset.seed)
    with expected(RANDOM_INIT):  # random on purpose: it is trained right below, then saved
        model, _, preprocess = open_clip.create_model_and_transforms(preset.clip_name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(preset.clip_name)

    images = _decode_images([p[0] for p in pairs], preprocess)
    tokens = tokenizer([p[1] or "" for p in pairs])
    prepared = time.perf_counter()
    loss_fn = open_clip.loss.ClipLoss()
    # open_clip's recipe: no weight decay on gains, biases, embeddings and the logit scale
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n and "logit_scale" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n and "logit_scale" not in n)]
    groups = [{"params": decay, "weight_decay": preset.clip_weight_decay, "eps": 1e-6},
              {"params": rest, "weight_decay": 0.0, "eps": 1e-6}]

    @torch.no_grad()
    def clamp_temperature():  # open_clip clamps the temperature at 100 after each step
        model.logit_scale.clamp_(0, math.log(100))

    data = Batches(len(pairs), preset.clip_batch_size, preset.clip_steps, preset.seed,
                    lambda idx: {"image": images[idx], "text": tokens[idx]})
    # the model's output is (image features, text features, logit scale already exp())
    losses = train_in_memory(model, data, groups, preset.clip_lr, preset.clip_warmup, preset.seed,
                       loss=lambda output: loss_fn(*output), after_step=clamp_temperature)
    model.eval()

    # One safetensors file serves both loaders: open_clip's `local-dir:` looks for
    # open_clip_model.safetensors, and `create_model(name, pretrained=<file>)` reads any path.
    checkpoint = folder / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    pre = model.visual.preprocess_cfg
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": list(pre["mean"]), "std": list(pre["std"])}}, indent=1))
    tail = losses[-max(1, len(losses) // 10):]
    metrics = {"pairs": len(pairs), "steps": preset.clip_steps, "loss_first": losses[0],
               "loss_last": sum(tail) / len(tail), "batch_size": min(preset.clip_batch_size, len(pairs)),
               "logit_scale": model.logit_scale.exp().item(), "seconds_prepare": prepared - started,
               "seconds_train": time.perf_counter() - prepared}
    if eval_pairs:
        metrics["eval"] = clip_retrieval_top1(model, tokenizer, preprocess, eval_pairs)
    metrics["seconds"] = time.perf_counter() - started
    metrics["cpu_seconds"] = time.process_time() - cpu_started
    write_info(folder, "open_clip", preset, metrics)
    return ToyClip(preset.clip_name, str(config_path), str(checkpoint), str(folder), metrics)
