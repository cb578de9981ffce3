"""Finetuning the filter and the captioner on a clean annotated set (BLIP, Sec. 3.3).

Both start from the model pretrained on web data and learn, separately (BLIP Table 4: sharing
parameters lets the filter pass the captioner's mistakes), from the human-written pairs:
  filter     Stage 1 checkpoint ─► ITC + ITM (ITG off) ─► a Stage 1 folder: `capfilt filter --itm DIR`
             with folds K > 1: K Stage 1s, each trained as the parent without one fold of its
             images, each finetuned so   ─► K filters in one folder (model/folds.py)
  captioner  Stage 2 checkpoint ─► LM loss              ─► a Stage 2 folder: `capfilt caption --captioner DIR`
Short and at a lower learning rate, like LAVIS's `*_coco_ft` configs (5 epochs, lr 1e-5 after a
1e-4 pretraining): by default 5 epochs over the pairs at a tenth of the parent's learning rate.
Nothing here is a new loop: the Stage 1 and Stage 2 trainers run with `init_from` and the
annotated images as their data; the parent's recipe (precision, augmentation, text length)
carries over. Each checkpoint records its parent, the annotated set and the split (lineage).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from capfilt.errors import ConfigError

log = logging.getLogger(__name__)
EPOCHS = 5  # LAVIS caption_coco_ft / retrieval_coco_ft: max_epoch 5
LR_DIVISOR = 10  # LAVIS: pretrain init_lr 1e-4, coco_ft init_lr 1e-5


@dataclass
class FinetuneSettings:
    """What both finetunings take; None means 'derived from the parent and the set'."""

    out: str
    steps: int | None = None  # default: EPOCHS epochs over the finetuning pairs
    lr: float | None = None  # default: the parent's lr / LR_DIVISOR
    batch_size: int = 32
    warmup_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}.")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}.")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}.")


def training_images(images) -> list:
    """Annotated images (image_id, image, captions) as the trainers' CuratedImage: one image, all its
    captions; each epoch pairs it with one of them, so an image is never its own ITC negative."""
    from .data import CuratedImage

    return [CuratedImage(im.image_id, im.image, list(im.captions)) for im in images]


def _schedule(settings: FinetuneSettings, images: list, parent_lr: float) -> dict:
    if len(images) < settings.batch_size:
        raise ConfigError(f"the finetuning part has {len(images)} images, fewer than --batch-size {settings.batch_size}; "
                          f"lower --batch-size or --holdout-fraction, or give a larger annotated set.")
    pairs = sum(len(im.captions) for im in images)
    steps = settings.steps or max(1, math.ceil(EPOCHS * pairs / settings.batch_size))
    lr = settings.lr or parent_lr / LR_DIVISOR
    return {"steps": steps, "lr": lr, "min_lr": lr / 100, "warmup_steps": max(1, int(settings.warmup_fraction * steps)),
            "batch_size": settings.batch_size, "seed": settings.seed, "checkpoint_every": steps,
            "log_every": max(1, min(10, steps // 10)), "holdout_images": 0, "folds": 1, "fold": None,
            "resume": True, "stop_at": None,
            "out": settings.out, "device": settings.device, "progress": settings.progress}


def _known(cls, values: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def filter_config(stage1: str, settings: FinetuneSettings, images: list, annotated: str, vision: str | None = None):
    """The Stage1Config that finetunes `stage1` as BLIP's filter; (config, parent step folder, parent info)."""
    from .qformer import CONFIG_NAME
    from .stage1_inference import stage1_checkpoint
    from .train_stage1 import Stage1Config

    checkpoint = stage1_checkpoint(stage1, f"--stage1 {stage1}")
    step, model_dir, info = checkpoint.step, checkpoint.model_dir, checkpoint.info
    vision = checkpoint.encoder(vision)
    parent = dict(info.get("config") or {})
    qformer = json.loads((model_dir / CONFIG_NAME).read_text())
    values = {**parent, **_schedule(settings, images, parent.get("lr", 1e-4)),
              "root": annotated, "run": "annotated", "vision": vision, "tokenizer": str(model_dir), "bert": None,
              "init_from": str(model_dir), "itg_weight": 0.0, "itm_random_negative_steps": 0,
              "max_text_length": qformer.get("max_text_length", parent.get("max_text_length", 32))}
    return Stage1Config(**_known(Stage1Config, values)), step, info


def captioner_config(stage2: str, settings: FinetuneSettings, images: list, annotated: str):
    """The Stage2Config that finetunes `stage2` as BLIP's captioner; (config, parent step folder, parent info)."""
    from .blip2 import read_model_config, resolve_checkpoint
    from .stage2 import Stage2Config

    step, model_dir = resolve_checkpoint(stage2)
    model = read_model_config(model_dir)
    info_path = next((p for p in (step / "stage2.json", model_dir.parent / "stage2.json") if p.exists()), None)
    if info_path is None:
        raise ConfigError(f"--stage2 {stage2}: no stage2.json beside the model naming its Stage 1 checkpoint; pass a "
                          f"`capfilt train stage2 --out` folder or one of its step-* folders.")
    info = json.loads(info_path.read_text())
    parent = dict(info.get("config") or {})
    values = {**parent, **_schedule(settings, images, parent.get("lr", 1e-4)),
              "root": annotated, "run": "annotated", "stage1": info.get("stage1") or parent.get("stage1"),
              "llm": model.llm, "vision": model.vision, "prompt": model.prompt,
              "instruction_aware": model.instruction_aware, "max_text_length": model.max_text_length,
              "init_from": str(model_dir)}
    values["min_lr"] = min(values["min_lr"], values["lr"])
    return Stage2Config(**_known(Stage2Config, values)), step, info


def _lineage(kind: str, parent_step: Path, parent_info: dict, annotated: dict, split: dict, config) -> dict:
    return {
        "kind": kind,
        "parent": {"checkpoint": str(Path(parent_step).resolve()), "step": parent_info.get("step"),
                   "lineage": parent_info.get("lineage")},
        "annotated": annotated,
        "split": split,
        "recipe": {"steps": config.steps, "lr": config.lr, "min_lr": config.min_lr, "warmup_steps": config.warmup_steps,
                   "batch_size": config.batch_size, "seed": config.seed,
                   "losses": "itc+itm" if kind == "finetune-filter" else "lm"},
    }


def finetune_filter(stage1: str, finetune_images: list, settings: FinetuneSettings, annotated: dict, split: dict,
                    vision: str | None = None) -> dict:
    """Finetune a Stage 1 checkpoint with ITC + ITM on annotated images; returns the trainer's result
    plus 'lineage'. `annotated` / `split` describe the set and the split (recorded as lineage)."""
    from .train_stage1 import train

    images = training_images(finetune_images)
    config, step, info = filter_config(stage1, settings, images, annotated.get("source", ""), vision)
    lineage = _lineage("finetune-filter", step, info, annotated, split, config)
    result = train(config, images=images, lineage=lineage)
    _write(settings.out, lineage, config)
    return {**result, "lineage": lineage}


def check_folds(folds: int) -> None:
    if folds < 1:
        raise ConfigError(f"--folds must be >= 1, got {folds}.")


def fold_config(stage1: str, fold: int, folds: int, out: str, device: str = "auto", progress: bool = True):
    """The Stage1Config that trains `stage1`'s own recipe again on its run without fold `fold` of
    `folds`: the same settings, steps scaled by (folds - 1) / folds so that each image is seen as
    often as the parent saw it."""
    from .stage1_inference import stage1_checkpoint
    from .train_stage1 import Stage1Config

    parent = dict(stage1_checkpoint(stage1, f"--stage1 {stage1}").info.get("config") or {})
    if parent.get("run") == "" and parent.get("steps"):
        raise ConfigError(f"--stage1 {stage1} was pretrained on pairs of no curated run (e.g. `capfilt toy pretrain "
                          f"--stage1-steps`): it never trained on a run's images, so it needs no --folds; drop it.")
    if not parent.get("run") or not parent.get("steps"):
        raise ConfigError(f"--stage1 {stage1}: no stage1.json with the run and recipe it was trained with; --folds "
                          f"trains that recipe again without each fold, so pass a `capfilt train stage1 --out` folder.")
    if parent.get("init_from"):
        log.warning("--folds: %s started from %s, and so does each fold's Stage 1: if that model trained on these "
                    "images, they are not out of fold", stage1, parent["init_from"])
    steps = max(1, math.ceil(parent["steps"] * (folds - 1) / folds))
    values = {**parent, "folds": folds, "fold": fold, "out": out, "steps": steps, "resume": True, "stop_at": None,
              "device": device, "progress": progress, "checkpoint_every": min(parent.get("checkpoint_every") or steps, steps)}
    return Stage1Config(**_known(Stage1Config, values))


def finetune_filter_folds(stage1: str, folds: int, finetune_images: list, settings: FinetuneSettings, annotated: dict,
                          split: dict, vision: str | None = None) -> dict:
    """BLIP's filter out of fold (model/folds.py): for each of `folds` folds of the run `stage1` was
    trained on, a Stage 1 trained as `stage1` was but without that fold (settings.out/fold-<f>/stage1),
    finetuned on the annotated images as `finetune_filter` does (settings.out/fold-<f>/filter).
    settings.out then loads as one ITM scorer; returns {'step', 'checkpoint', 'metrics', 'lineage'}."""
    from .folds import write_folds
    from .train_stage1 import train

    models, lineages, steps = [], [], 0
    for fold in range(folds):
        base = Path(settings.out) / f"fold-{fold}"
        config = fold_config(stage1, fold, folds, str(base / "stage1"), settings.device, settings.progress)
        train(config)
        result = finetune_filter(str(base / "stage1"), finetune_images, replace(settings, out=str(base / "filter")),
                                 annotated, split, vision)
        models.append(f"fold-{fold}/filter")
        lineages.append(result["lineage"])
        steps = result["step"]
    lineage = {"kind": "finetune-filter-folds", "folds": folds, "parent": {"checkpoint": str(Path(stage1).resolve())},
               "annotated": annotated, "split": split, "models": lineages}
    write_folds(settings.out, models, parent=lineage["parent"])
    (Path(settings.out) / "finetune.json").write_text(json.dumps(lineage, indent=1, default=str))
    return {"step": steps, "checkpoint": settings.out, "metrics": [], "lineage": lineage}


def finetune_captioner(stage2: str, finetune_images: list, settings: FinetuneSettings, annotated: dict, split: dict) -> dict:
    """Finetune a Stage 2 checkpoint with the LM loss on annotated images; returns the trainer's
    result plus 'lineage'."""
    from .stage2 import train

    images = training_images(finetune_images)
    config, step, info = captioner_config(stage2, settings, images, annotated.get("source", ""))
    lineage = _lineage("finetune-captioner", step, info, annotated, split, config)
    result = train(config, images=images, lineage=lineage)
    _write(settings.out, lineage, config)
    return {**result, "lineage": lineage}


def _write(out: str, lineage: dict, config) -> None:
    (Path(out) / "finetune.json").write_text(json.dumps({**lineage, "config": asdict(config)}, indent=1, default=str))
