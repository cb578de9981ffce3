"""Stage 1 trainer: the Q-Former learns ITC + ITM + ITG on a curated run against a frozen encoder.

Read top to bottom: config -> data (curated Parquet -> per-sample seeded transforms) -> model
-> `Stage1Training`, the objective the one trainer core (model/trainer.py: loop, LR schedule,
checkpoints, exact resume) trains. One process on CPU/GPU via `train(config)`, several workers
via `train_distributed(config, workers)` (Ray Train TorchTrainer, DDP over gloo on CPU / NCCL
on GPU).

Exact resume: every random choice of the data (which caption, crop, flip) is drawn from a
generator seeded by (seed, epoch, position), so the data at step s is a function of s alone;
the checkpoint holds what the core keeps (model, optimizer, scheduler, grad scaler, step, torch
RNG) and Stage 1's extra state, the ITM negative-sampling generator. A resumed CPU run therefore
reproduces the uninterrupted run's losses exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from capfilt.errors import ConfigError

from .data import (  # noqa: F401  (tests and benchmarks import some from here)
    CuratedImage,
    Stage1Batches,
    TrainingConfig,
    feature_cache,
    hash_seed,
    image_features,
    image_pixels,
    load_curated_images,
    pil_pixels,
    random_resized_crop,
    split_holdout,
    swap_left_right,
    training_images,
)
from .factory import create
from .losses import stage1_losses, world
from .qformer import QFormer, init_from_bert, load_tokenizer, tokenizer_fields
from .recipes import STAGE1 as STAGE1_RECIPES
from .recipes import lr_factor  # noqa: F401  (tests read it here)
from .recipes import resolve as resolve_recipe
from .trainer import (  # noqa: F401  (Stage 2 and tests import some from here)
    LATEST_NAME,
    METRICS_NAME,
    Objective,
    _trim_metrics,
    fit,
    latest_checkpoint,
    lr_lambda,
    param_groups,
    run_on_ray_train,
    worker_device,
)
from .vision import load_vision_encoder

# -- config -------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class Stage1Config(TrainingConfig):
    """Everything a Stage 1 run needs: what every trainer config has (model/data.py TrainingConfig)
    and Stage 1's own rows."""

    vision: str  # see model/vision.py: open_clip:<name>@<tag|file> or a transformers id/folder
    tokenizer: str = "bert-base-uncased"
    bert: str | None = "bert-base-uncased"  # initialise the Q-Former from it; None = random init
    init_from: str | None = None  # a Stage 1 checkpoint to start from instead (finetuning); wins over bert
    itg_weight: float = 1.0  # BLIP finetunes its filter with ITC + ITM only (model/finetune.py sets 0)
    model: dict = field(default_factory=dict)  # the architecture's QFormerConfig fields (model/factory.py); {}: qformer-base
    itc_gather_grad: str | None = None  # local | none: gradient through ITC's gathered batch
    itc_label_smoothing: float = 0.1
    itg_label_smoothing: float = 0.1
    # ITM negatives drawn uniformly (not by ITC similarity) for the first N steps. LAVIS starts
    # from pretrained BERT and ViT, so hard negatives are informative from step 0; from scratch
    # (the toy preset) ITC is near chance early, and hard negatives kept ITM at its prior for 600
    # steps, while uniform negatives got it learning by step ~200 (measured on a 240-image world).
    itm_random_negative_steps: int = 0

    def __post_init__(self):
        resolve_recipe(self, STAGE1_RECIPES)
        self.check(("steps", "batch_size", "grad_accumulation", "log_every", "checkpoint_every"))


# -- model ----------------------------------------------------------------------------------------

class Stage1Objective(nn.Module):
    """The Q-Former with its three losses as `forward`, so DDP sees one forward per step."""

    def __init__(self, qformer: QFormer, config: Stage1Config):
        super().__init__()
        self.qformer = qformer
        self.config = config

    def forward(self, image_features, input_ids, attention_mask, image_ids, generator=None, hard_negatives=True):
        losses = stage1_losses(
            self.qformer, image_features, input_ids, attention_mask, image_ids,
            self.config.itc_label_smoothing, self.config.itg_label_smoothing, generator, hard_negatives,
            itc_local_grad=self.config.itc_gather_grad == "local",
        )
        if self.config.itg_weight != 1.0:
            losses.total = losses.itc + losses.itm + self.config.itg_weight * losses.itg
        return losses


def build_model(config: Stage1Config, tokenizer, vision_width: int) -> QFormer:
    if config.init_from:
        return _model_from_checkpoint(config, vision_width)
    # config.model: the architecture's fields (--model-config, resolved by model/factory.py)
    architecture = {"max_text_length": config.max_text_length, **config.model}
    torch.manual_seed(config.seed)
    model = create(architecture, **tokenizer_fields(tokenizer), vision_width=vision_width)
    if config.bert:
        init_from_bert(model, config.bert)
    model.set_gradient_checkpointing(config.activation_checkpointing)
    return model


def _model_from_checkpoint(config: Stage1Config, vision_width: int) -> QFormer:
    from .stage1_inference import resolve_checkpoint  # imports this module

    _, model_dir = resolve_checkpoint(config.init_from)
    torch.manual_seed(config.seed)
    model = QFormer.from_pretrained(model_dir)
    if model.config.vision_width != vision_width:
        raise ConfigError(f"--init-from {config.init_from}: its Q-Former reads {model.config.vision_width}-wide image "
                          f"tokens but --vision gives {vision_width}; use the encoder it was trained with.")
    model.set_gradient_checkpointing(config.activation_checkpointing)
    return model


# -- Stage 1 as an objective of the trainer core (model/trainer.py) ---------------------------------

class Stage1Training(Objective):
    """ITC + ITM + ITG on frozen image features: what Stage 1 plugs into `fit`.

    Exact resume needs one state beyond the loop's: the generator that samples ITM negatives,
    seeded per worker by (seed, rank)."""

    name = "stage1"

    def __init__(self, config: Stage1Config, model: QFormer, tokenizer, encoder, data: Stage1Batches, lineage: dict,
                 device: torch.device, rank: int = 0):
        self.config, self.model, self.tokenizer, self.encoder, self.data = config, model, tokenizer, encoder, data
        self.lineage, self.device = lineage, device
        self.module = Stage1Objective(model, config)
        self.cache = feature_cache(encoder, data)
        self.generator = torch.Generator(device=device).manual_seed(hash_seed(config.seed, rank, 1))

    def inputs(self, batch: dict, step: int) -> dict:
        return {"image_features": image_features(batch, self.encoder, self.cache, self.device),
                "input_ids": batch["input_ids"].to(self.device), "attention_mask": batch["attention_mask"].to(self.device),
                "image_ids": batch["image_ids"].to(self.device), "generator": self.generator,
                "hard_negatives": step >= self.config.itm_random_negative_steps}

    def loss(self, losses):
        return losses.total, {"itc": losses.itc, "itm": losses.itm, "itg": losses.itg, "itm_accuracy": losses.itm_accuracy}

    def log_values(self) -> dict:
        return {"temp": round(self.model.temp.item(), 6)}

    def shown(self, totals: dict) -> dict:
        return {"loss": f"{totals['loss']:.3f}", "itm_acc": f"{totals['itm_accuracy']:.2f}"}

    def save(self, folder: Path, step: int, data_position: dict) -> None:
        config = self.config
        self.model.save_pretrained(folder / "model", tokenizer=self.tokenizer, vision=config.vision)
        (folder / "stage1.json").write_text(json.dumps({
            "config": asdict(config), "step": step, "data_position": data_position,
            "curated_run": {"root": config.root, "run": config.run}, "vision": config.vision,
            "lineage": self.lineage,  # which run, thresholds and models produced the training data
        }, indent=1, default=str))

    def restore(self, folder: Path) -> None:
        from safetensors.torch import load_model

        load_model(self.model, str(folder / "model" / "model.safetensors"), device=str(next(self.model.parameters()).device))

    def extra_state(self) -> dict:
        return {"itm_generator": self.generator.get_state()}

    def load_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["itm_generator"])


def train(config: Stage1Config, images: list[CuratedImage] | None = None, lineage: dict | None = None) -> dict:
    """Train (or resume) Stage 1; returns {'step', 'checkpoint', 'metrics'} of this process.

    `images` (with its `lineage`) replaces the curated run as the data, e.g. an annotated set."""
    rank, world_size = world()
    device = worker_device(config.device)
    tokenizer = load_tokenizer(config.tokenizer)
    encoder = load_vision_encoder(config.vision, device)
    images, lineage = training_images(config, images, lineage)
    data = Stage1Batches(images, tokenizer, encoder.preprocess, config, rank, world_size)
    model = build_model(config, tokenizer, encoder.width).to(device)
    return fit(Stage1Training(config, model, tokenizer, encoder, data, lineage, device, rank), config, device)


# -- several workers: Ray Train -----------------------------------------------------------------

def train_distributed(config: Stage1Config, workers: int, use_gpu: bool | None = None) -> dict:
    """Run `train` on `workers` Ray Train workers (DDP); returns rank 0's {'step', 'checkpoint', 'metrics'}."""
    return run_on_ray_train(train, config, workers, use_gpu, "stage1")
