"""Training recipes as data: `paper` (the BLIP-2 paper; capfilt's defaults) and `lavis` (what
salesforce/LAVIS's code and yamls actually do).

A recipe is one row value per point where the two differ. Every row is also a field of
`Stage1Config` / `Stage2Config` (and a CLI option): a field left None takes its recipe's value, a
field set by the user wins, so rows can be mixed. The checkpoint's stage1.json / stage2.json
records `recipe` and every resolved row.

| row              | paper                        | lavis                                                  |
|------------------|------------------------------|--------------------------------------------------------|
| itc_gather_grad  | local: the local slice of the gathered batch keeps its gradient (open_clip) | none: `concat_all_gather` carries no gradient and LAVIS always runs distributed, so i2t trains only the image side and t2i only the text side (blip2_qformer.py, base_model.py) |
| grad_clip        | 1.0                          | 0 (none; runner_base.py has no clipping)               |
| betas            | (0.9, 0.98) (paper sec. 3.4) | (0.9, 0.999) (the yamls set none: torch's default)     |
| warmup_steps     | 2000                         | 5000 Stage 1, 2000 Stage 2 (pretrain_stage{1,2}.yaml)  |
| warmup_lr        | 0 (ramp from lr/warmup)      | 1e-6 (warmup_lr in the yamls)                          |
| lr_schedule      | cosine-step                  | cosine-epoch (optim.py LinearWarmupCosineLRScheduler)  |
| min_lr           | 1e-5 Stage 1, 5e-5 Stage 2   | 1e-5 both (pretrain_stage2.yaml)                       |
| text_processing  | tokenizer                    | pre_caption (blip_processors.py: lowercase, strip .!"()*#:;~, 50 words) |
| llm_train_mode   | False (frozen LLM in eval)   | True (blip2_opt.py / blip2_t5.py only set requires_grad=False: dropout on) |
| caption_end      | eos                          | newline for decoder-only LLMs (blip2_opt.py appends "\\n" and stops there); T5 keeps eos |
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

from capfilt.errors import ConfigError

ITC_GATHER_GRAD = ("local", "none")
LR_SCHEDULES = ("cosine-step", "cosine-epoch")
TEXT_PROCESSING = ("tokenizer", "pre_caption")
CAPTION_ENDS = ("eos", "newline")


@dataclass(frozen=True)
class Recipe:
    itc_gather_grad: str
    grad_clip: float
    betas: tuple[float, float]
    warmup_steps: int
    warmup_lr: float
    lr_schedule: str
    min_lr: float
    text_processing: str
    llm_train_mode: bool = False  # Stage 2 only
    caption_end: str = "eos"  # Stage 2 only


STAGE1 = {
    "paper": Recipe(itc_gather_grad="local", grad_clip=1.0, betas=(0.9, 0.98), warmup_steps=2000, warmup_lr=0.0,
                    lr_schedule="cosine-step", min_lr=1e-5, text_processing="tokenizer"),
    "lavis": Recipe(itc_gather_grad="none", grad_clip=0.0, betas=(0.9, 0.999), warmup_steps=5000, warmup_lr=1e-6,
                    lr_schedule="cosine-epoch", min_lr=1e-5, text_processing="pre_caption"),
}
STAGE2 = {
    "paper": Recipe(itc_gather_grad="local", grad_clip=1.0, betas=(0.9, 0.98), warmup_steps=2000, warmup_lr=0.0,
                    lr_schedule="cosine-step", min_lr=5e-5, text_processing="tokenizer",
                    llm_train_mode=False, caption_end="eos"),
    "lavis": Recipe(itc_gather_grad="none", grad_clip=0.0, betas=(0.9, 0.999), warmup_steps=2000, warmup_lr=1e-6,
                    lr_schedule="cosine-epoch", min_lr=1e-5, text_processing="pre_caption",
                    llm_train_mode=True, caption_end="newline"),
}
RECIPES = tuple(STAGE1)


def resolve(config, table: dict[str, Recipe]) -> None:
    """Fill every row field of `config` that is None from `table[config.recipe]`; check the values."""
    if config.recipe not in table:
        raise ConfigError(f"--recipe must be one of {', '.join(table)}, got {config.recipe!r}.")
    recipe = table[config.recipe]
    for f in fields(Recipe):
        if hasattr(config, f.name) and getattr(config, f.name) is None:
            setattr(config, f.name, getattr(recipe, f.name))
    config.betas = tuple(float(b) for b in config.betas)
    for name, allowed in (("itc_gather_grad", ITC_GATHER_GRAD), ("lr_schedule", LR_SCHEDULES),
                          ("text_processing", TEXT_PROCESSING), ("caption_end", CAPTION_ENDS)):
        value = getattr(config, name, allowed[0])
        if value not in allowed:
            raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {value!r}.")
    if config.grad_clip < 0:
        raise ConfigError(f"--grad-clip must be >= 0 (0 = no clipping), got {config.grad_clip}.")
    if not 0 <= config.warmup_lr <= config.lr:
        raise ConfigError(f"--warmup-lr must be in [0, --lr={config.lr}], got {config.warmup_lr}.")
    if config.warmup_steps < 0:
        raise ConfigError(f"--warmup-steps must be >= 0, got {config.warmup_steps}.")


# -- learning rate ------------------------------------------------------------------------------

def lr_factor(step: int, config, epoch: int | None = None, epochs: int | None = None) -> float:
    """The learning rate at optimizer step `step`, as a fraction of config.lr.

    cosine-step (paper): linear warmup, then cosine from lr to min_lr over the remaining steps.
    cosine-epoch (LAVIS): in epoch 0 a linear ramp from warmup_lr that holds at lr once reached;
    from epoch 1 on, lr = min_lr + (lr - min_lr) * (1 + cos(pi * epoch / epochs)) / 2, constant
    within an epoch (so the last epoch stays above min_lr, as in LAVIS). `epoch` (of this step)
    and `epochs` (of the run) are needed for it.
    """
    if config.lr_schedule == "cosine-epoch":
        if epoch is None or epochs is None:
            raise ValueError("the cosine-epoch schedule needs the step's epoch and the run's epochs")
        if epoch == 0:
            return _warmup(step, config)
        lr, floor = config.lr, config.min_lr
        return (floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs)))) / lr
    if step < config.warmup_steps:
        return _warmup(step, config)
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    floor = config.min_lr / config.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _warmup(step: int, config) -> float:
    if config.warmup_steps <= 0:
        return 1.0
    if config.warmup_lr == 0:  # no step is spent at lr 0
        return min(1.0, (step + 1) / config.warmup_steps)
    start = config.warmup_lr
    return min(config.lr, start + (config.lr - start) * step / config.warmup_steps) / config.lr


# -- text ---------------------------------------------------------------------------------------

_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS's caption processing: lowercase, the characters .!"()*#:;~ become spaces, runs of
    whitespace collapse, ends are trimmed, at most `max_words` words."""
    text = _SPACES.sub(" ", _PUNCTUATION.sub(" ", caption.lower())).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def process_captions(images: list, text_processing: str) -> list:
    """Curated images with their captions processed as the recipe says (same objects when 'tokenizer')."""
    if text_processing == "tokenizer":
        return images
    from dataclasses import replace

    return [replace(im, captions=[pre_caption(c) for c in im.captions]) for im in images]


# -- LAVIS's generation and retrieval defaults, as presets of `capfilt generate` and `capfilt eval` --

# blip2_opt.py / blip2_t5.py `generate` with the COCO caption yamls (beam 5, max 30, min 8), and
# `predict_answers` with the zero-shot VQA yamls ("Question: {} Short answer:", beam 5, max 10,
# length penalty -1 for T5; blip2_opt's default 0 for OPT).
GENERATE_PRESETS = {
    "lavis-caption": {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8,
                      "length_penalty": {"causal": 1.0, "seq2seq": 1.0}},
    "lavis-vqa": {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1,
                  "vqa_template": "Question: {} Short answer:", "length_penalty": {"causal": 0.0, "seq2seq": -1.0}},
}
# blip2_qformer.py compute_sim_matrix with the retrieval yamls: the ITC top k=128 re-ranked by
# ITM logit + ITC similarity; captioning as the caption preset.
EVAL_PRESETS = {
    "lavis": {"rerank_k": 128, "rerank_score": "itm+itc", "num_beams": 5, "max_length": 30, "min_length": 8},
}


def preset_values(presets: dict, name: str | None, given: dict, defaults: dict) -> dict:
    """Option values: those the user gave (not None) win over the preset's, which win over `defaults`."""
    if name is not None and name not in presets:
        raise ConfigError(f"--preset must be one of {', '.join(presets)}, got {name!r}.")
    chosen = presets.get(name, {}) if name else {}
    return {key: given[key] if given.get(key) is not None else chosen.get(key, defaults.get(key))
            for key in set(defaults) | set(chosen) | set(given)}
