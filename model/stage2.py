"""BLIP-2 Stage 2 training: the Stage 1 Q-Former and a fresh projection learn to prompt a frozen LLM.

Read top to bottom: config -> data (Stage 1's seeded batches, captions laid out for the LLM by
model/llm.py's TextLayout) -> model (model/blip2.py's Blip2Stage2 from a Stage 1 checkpoint) ->
`Stage2Training`, the objective the one trainer core (model/trainer.py) trains. The model,
generation and transformers conversion live in model/blip2*.py; their names are imported here
too, where existing callers find them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from capfilt.errors import ConfigError

from .blip2 import (  # noqa: F401  (also imported from here by callers)
    CONFIG_NAME,
    MODEL_TYPE,
    WEIGHTS_NAME,
    Blip2Stage2,
    Stage2ModelConfig,
    read_model_config,
    resolve_checkpoint,
)
from .blip2_generate import VQA_PROMPT, Stage2Captioner, Stage2Generator, load_stage2_captioner, pixels_of  # noqa: F401
from .data import Stage1Batches, TrainingConfig, feature_cache, image_features, training_images
from .llm import TextLayout, load_llm, split_point  # noqa: F401
from .losses import world
from .qformer import QFormer, load_tokenizer
from .recipes import STAGE2 as STAGE2_RECIPES
from .recipes import resolve as resolve_recipe
from .stage1_inference import Stage1Checkpoint, stage1_checkpoint
from .trainer import Objective, fit, run_on_ray_train, worker_device
from .vision import FrozenImageEncoder, load_vision_encoder


# -- the Stage 1 checkpoint it starts from ---------------------------------------------------------

def stage1_info(stage1: str | Path) -> Stage1Checkpoint:
    """The Stage 1 checkpoint Stage 2 starts from (trainer --out, step-* or model/), checked."""
    return stage1_checkpoint(stage1, f"--stage1 {stage1}")


# -- training config -----------------------------------------------------------------------------

@dataclass(kw_only=True)
class Stage2Config(TrainingConfig):
    """Everything a Stage 2 run needs: what every trainer config has (model/data.py TrainingConfig)
    and Stage 2's own rows."""

    stage1: str  # Stage 1 checkpoint: trainer --out, step-* or model folder
    llm: str  # hub id or folder: AutoModelForCausalLM or AutoModelForSeq2SeqLM + AutoTokenizer
    vision: str | None = None  # default: the encoder the Stage 1 checkpoint names
    prompt: str = ""  # LAVIS pretrains with no prompt; caption fine-tuning uses "a photo of"
    init_from: str | None = None  # a Stage 2 checkpoint whose Q-Former + projection to start from (finetuning)
    instruction_aware: bool = False
    llm_train_mode: bool | None = None  # the frozen LLM's dropout on (LAVIS) or off
    caption_end: str | None = None  # eos | newline (decoder-only LLMs; T5 always ends with eos)

    def __post_init__(self):
        resolve_recipe(self, STAGE2_RECIPES)
        self.check(("steps", "batch_size", "grad_accumulation", "log_every", "checkpoint_every", "max_text_length"))
        if not 0 < self.min_lr <= self.lr:
            raise ConfigError(f"--min-lr must be in (0, --lr={self.lr}], got {self.min_lr}.")


class Stage2Batches(Stage1Batches):
    """Stage 1's data order, captions, crops and flips (pure functions of (seed, micro-batch)),
    with the captions laid out for the LLM; the prefix-LM split is seeded the same way."""

    def __init__(self, images, layout: TextLayout, preprocess, config: Stage2Config, rank=0, world_size=1):
        super().__init__(images, None, preprocess, config, rank, world_size)
        self.layout = layout
        if config.cache_features:  # as Stage 1 keeps token ids: tiny next to the features
            layout.memo = {}

    def __getitem__(self, micro: int) -> dict:
        cfg = self.config
        epoch = self.position(micro)["epoch"]
        indices, captions, pixels = self.samples(micro)
        splits = [split_point(cfg.seed, epoch, i, c) for i, c in zip(indices, captions)] if self.layout.kind != "causal" else None
        # With the memo on, an image's captions are all tokenized the first time one is drawn
        # (in one call), not one by one over the epochs that draw them.
        siblings = [c for i in indices for c in self.images[i].captions] if self.layout.memo is not None else []
        batch = {"image_ids": torch.tensor(indices), **self.layout.batch(cfg.prompt, captions, splits, siblings)}
        if pixels is not None:
            batch["pixels"] = pixels
        return batch


class Stage2Objective(nn.Module):
    """The trainable part as DDP's module; the frozen LLM is held outside it (never broadcast)."""

    def __init__(self, model: Blip2Stage2):
        super().__init__()
        self.qformer = model.qformer
        self.language_projection = model.language_projection
        self.__dict__["model"] = model  # not a submodule: DDP would otherwise broadcast the LLM

    def forward(self, image_features, input_ids, attention_mask, labels):
        return self.model.loss(image_features, input_ids, attention_mask, labels)

    def train(self, mode: bool = True) -> "Stage2Objective":
        super().train(mode)
        self.model.train(mode)  # the frozen LLM's mode follows Blip2Stage2.llm_train_mode
        return self


def build_model(config: Stage2Config, device: torch.device) -> tuple[Blip2Stage2, FrozenImageEncoder, str]:
    """(model with Stage 1 Q-Former and fresh projection, frozen encoder, vision spec)."""
    stage1 = stage1_info(config.stage1)
    model_dir, vision = stage1.model_dir, stage1.encoder(config.vision)
    encoder = load_vision_encoder(vision, device)
    qformer = QFormer.from_pretrained(model_dir, device)
    if qformer.config.vision_width != encoder.width:
        raise ConfigError(f"--vision {vision}: width {encoder.width}, but the Stage 1 Q-Former expects "
                          f"{qformer.config.vision_width}; use the encoder Stage 1 was trained with.")
    qtok = load_tokenizer(model_dir)
    llm, tokenizer, kind = load_llm(config.llm, device)
    llm_ref = str(Path(config.llm).resolve()) if Path(config.llm).exists() else config.llm
    hidden = llm.config.hidden_size if kind == "causal" else llm.config.d_model
    spec = Stage2ModelConfig(qformer=asdict(qformer.config), llm=llm_ref, llm_kind=kind, llm_hidden_size=hidden,
                             vision=vision, instruction_aware=config.instruction_aware,
                             max_text_length=config.max_text_length, prompt=config.prompt,
                             caption_end=config.caption_end)
    torch.manual_seed(config.seed)
    model = Blip2Stage2(qformer, llm, tokenizer, spec, qtok).to(device)
    model.llm_train_mode = config.llm_train_mode
    if config.init_from:
        _load_trainable(model, config.init_from)
    model.qformer.set_gradient_checkpointing(config.activation_checkpointing)
    return model, encoder, vision


def _load_trainable(model: Blip2Stage2, checkpoint: str) -> None:
    from safetensors.torch import load_file

    _, model_dir = resolve_checkpoint(checkpoint)
    result = model.load_state_dict(load_file(str(model_dir / WEIGHTS_NAME), device=str(model.device)), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("language_model.") and k != "qformer.lm_head.decoder.weight"]
    if missing or result.unexpected_keys:
        raise ConfigError(f"--init-from {checkpoint}: its weights do not fit this Stage 2 model (missing {missing[:3]}, "
                          f"unexpected {result.unexpected_keys[:3]}); give a checkpoint trained from the same Stage 1.")


# -- Stage 2 as an objective of the trainer core (model/trainer.py) ---------------------------------
# Checkpoints have Stage 1's layout: step-*/model, trainer.pt, stage2.json, and the "latest" pointer.

def _marker(path: Path) -> None:
    # load_captioner reads config.json's model_type; this marker makes trainer and step folders
    # loadable by the same call (they resolve to the latest model/ folder).
    (path / CONFIG_NAME).write_text(json.dumps({"model_type": MODEL_TYPE, "checkpoint_of": "stage2"}))


class Stage2Training(Objective):
    """The LM / prefix-LM loss through the frozen LLM: what Stage 2 plugs into `fit`. Only the
    Q-Former and the projection are saved and restored; the LLM is referenced by config.llm."""

    name = "stage2"

    def __init__(self, config: Stage2Config, model: Blip2Stage2, encoder, data: Stage2Batches, lineage: dict,
                 device: torch.device):
        self.config, self.model, self.encoder, self.data, self.lineage, self.device = config, model, encoder, data, lineage, device
        self.module = Stage2Objective(model)
        self.cache = feature_cache(encoder, data)

    def inputs(self, batch: dict, step: int) -> dict:
        return {"image_features": image_features(batch, self.encoder, self.cache, self.device),
                "input_ids": batch["input_ids"].to(self.device), "attention_mask": batch["attention_mask"].to(self.device),
                "labels": batch["labels"].to(self.device)}

    def loss(self, loss):
        return loss, {}

    def save(self, folder: Path, step: int, data_position: dict) -> None:
        config, model = self.config, self.model
        model.save_pretrained(folder / "model")
        (folder / "stage2.json").write_text(json.dumps({
            "config": asdict(config), "step": step, "data_position": data_position,
            "curated_run": {"root": config.root, "run": config.run}, "vision": model.config.vision,
            "stage1": str(Path(config.stage1).resolve()), "llm": model.config.llm,
            "lineage": self.lineage,  # which run, thresholds and models produced the training data
        }, indent=1, default=str))
        _marker(folder)
        _marker(folder.parent)

    def restore(self, folder: Path) -> None:
        from safetensors.torch import load_file

        model = self.model
        result = model.load_state_dict(load_file(str(folder / "model" / WEIGHTS_NAME), device=str(model.device)), strict=False)
        if result.unexpected_keys:
            raise ConfigError(f"{folder}: checkpoint weights {result.unexpected_keys[:3]} do not fit this model; "
                              f"was --out used for another Stage 2 configuration? Use a fresh --out or --no-resume.")


def train(config: Stage2Config, images: list | None = None, lineage: dict | None = None) -> dict:
    """Train (or resume) Stage 2; returns {'step', 'checkpoint', 'metrics'} of this process.

    `images` (CuratedImage-like, with its `lineage`) replaces the curated run as the data."""
    rank, world_size = world()
    device = worker_device(config.device)
    model, encoder, _ = build_model(config, device)
    images, lineage = training_images(config, images, lineage)
    data = Stage2Batches(images, model.layout, encoder.preprocess, config, rank, world_size)
    return fit(Stage2Training(config, model, encoder, data, lineage, device), config, device)


def train_distributed(config: Stage2Config, workers: int, use_gpu: bool | None = None) -> dict:
    """Run `train` on `workers` Ray Train workers (DDP); returns rank 0's {'step', 'checkpoint', 'metrics'}."""
    return run_on_ray_train(train, config, workers, use_gpu, "stage2")
