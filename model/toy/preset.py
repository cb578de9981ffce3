"""The toy preset: sizes and step counts of the "pretrained" pieces of a miniature BLIP-2.

BLIP-2 starts from frozen pretrained models (a CLIP image encoder, a BERT tokenizer, an LLM).
Offline, with no hub and two CPU cores, there are none, so the demo trains tiny stand-ins on the
source's own (image, web caption) pairs, once, in seconds, and saves each in the format its real
counterpart has, so the rest of capfilt loads them through the same calls as real names:

  train_text_tokenizer (tokenizer.py)  BERT WordPiece tokenizer    model.qformer.load_tokenizer(folder)
  pretrain_bert (bert.py)              masked-LM BERT              model.qformer.init_from_bert(model, folder)
  pretrain_clip (clip.py)              open_clip ViT CLIP          model.scorers.load_clip(name, ckpt) after
                                                                   register_clip_config(config), and
                                                                   model.vision.load_vision_encoder(spec)
  pretrain_lm (lm.py)                  OPT-style causal LM + BPE   AutoModelForCausalLM / AutoTokenizer
  pretrain_stage1 (stage1.py)          Stage 1 Q-Former (optional) `finetune filter --stage1 folder`
  pretrain_stage2 (stage2.py)          Stage 2 captioner (optional) `finetune captioner --stage2 folder`

Every function is seeded and deterministic on CPU, and its sizes and step counts come from a
`ToyPreset` (`ToyPreset.quick()` for the 3-minute demo). Each writes `toy.json` next to its
files with the preset and the figures it reached.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from capfilt.errors import ConfigError

from ..factory import architecture

TOY_INFO = "toy.json"
TOY_STAGE1 = "stage1"  # the toy folder's pretrained Stage 1 (ToyPreset.stage1_steps), the filter's start
TOY_STAGE2 = "stage2"  # the toy folder's pretrained Stage 2 (ToyPreset.stage2_steps), the captioner's start
# The toy preset's Stage 1 recipe (capfilt/presets.py toy_preset; model/toy/stage1.py), less its steps:
# ITM negatives drawn uniformly for all of them (itm_random_negative_steps = steps).
STAGE1_RECIPE = {"batch_size": 32, "lr": 2e-3, "warmup_steps": 20, "augment": False, "cache_features": True}
# The demo's pretrained Stage 1 (ToyPreset.stage1_steps). Measured (the 3000-image pretraining world's
# 3018 pairs, 4000 steps, 236 s on 1 thread alone; the demo worlds of seeds 0 / 1 / 2): ROC-AUC of the
# finetuned ITM on round 1's corrupted web captions 0.957 / 0.962 / 0.965, against 0.872 / 0.857 /
# 0.859 finetuned from the round's Stage 1; on 400 new scenes (seed 0) 0.946 at 4000 steps, 0.890 at
# 2000 (README, "A filter that never saw the source"). The bootstrap flow trains it beside round 0's
# and the oracle's trainings, so the demo does not wait for it.
TOY_STAGE1_STEPS = 4000
# The toy preset's Stage 2 recipe (capfilt/presets.py toy_preset; model/toy/stage2.py), less its steps.
STAGE2_RECIPE = {"batch_size": 32, "lr": 2e-3, "warmup_steps": 20, "augment": False, "cache_features": True}
# The demo's pretrained Stage 2 (ToyPreset.stage2_steps), from the pretrained Stage 1, on the
# pretraining world's pairs that the world did not corrupt (the stand-in for a public captioner
# trained on cleaned data). Measured (seed 0, 600 held-out images, beam 3, one run each): caption
# attribute accuracy 0.813 at 2400 steps (0.794 in the demo, whose data order differs), 0.827 at
# 3600 (batch 64 for 1800 steps, the same samples and time: 0.831), 0.837 at 4800 (148 s on 1
# thread, about 1000 pairs a second); on all the world's pairs (40% corrupted) 0.768 at 4800; round
# 0's captioner (the source's raw pairs) 0.536.
TOY_STAGE2_STEPS = 3600
_QFORMER = architecture("qformer-toy")  # the Q-Former the toy preset trains (capfilt/presets.py)


@dataclass(frozen=True)
class ToyPreset:
    """Sizes and step counts of the toy pieces. Defaults fit ~500-2000 pairs of 32-64 px images."""

    seed: int = 0
    # BERT WordPiece tokenizer (Q-Former text side)
    bert_vocab_size: int = 1000
    # A small BERT pretrained with masked-LM on the captions, the toy's bert-base-uncased: BLIP-2
    # initialises the Q-Former's self-attention and feed-forward layers from BERT. Its sizes are
    # the toy Q-Former's (model/configs/qformer-toy.json; init_from_bert refuses a mismatch).
    # Measured on a 600-image world (seed 0, oracle captions, 1000 Stage 1 steps): held-out
    # text->image ITC R@1 0.175 with this init vs 0.055 from random init (0.105 vs 0.050 at 500).
    bert_width: int = _QFORMER["hidden_size"]
    bert_layers: int = _QFORMER["num_hidden_layers"]
    bert_heads: int = _QFORMER["num_attention_heads"]
    bert_intermediate: int = _QFORMER["intermediate_size"]
    bert_max_length: int = 32
    bert_steps: int = 600
    bert_batch_size: int = 64
    bert_lr: float = 1e-3
    bert_warmup: int = 50
    # CLIP: a ViT small enough to train on 2 cores; 32 px with 8 px patches = 16 patches + [CLS]
    clip_name: str = "capfilt-toy-clip"
    image_size: int = 32
    patch_size: int = 8
    clip_width: int = 64
    clip_layers: int = 3  # >= 2: Stage 1 reads the second-to-last block's tokens
    clip_text_width: int = 64
    clip_text_layers: int = 2
    clip_head_width: int = 32
    clip_embed_dim: int = 64
    clip_context_length: int = 32
    # 500 pairs overfit past ~500 steps (held-out top-1 fell from 0.37 at 400 steps to 0.26 at
    # 800); dropping a quarter of the patches while training (open_clip's patch_dropout, FLIP)
    # is the cheap regulariser that helped (0.42 -> 0.45 at 400 steps, lr 5e-4).
    clip_steps: int = 500
    clip_batch_size: int = 64
    clip_lr: float = 5e-4
    clip_warmup: int = 50
    clip_weight_decay: float = 0.1
    clip_patch_dropout: float = 0.25
    # causal LM (the frozen "LLM" of Stage 2)
    lm_vocab_size: int = 1000
    lm_width: int = 128
    lm_layers: int = 2
    lm_heads: int = 4
    lm_max_length: int = 64
    # Train on "caption</s>caption" rows as well as single captions: an LM that has learned to
    # take words from its context is one a Stage 2 soft prompt can steer; trained on independent
    # captions alone, the toy LM ignored the soft prompt (Stage 2 loss stayed at the text-only floor).
    lm_repeat: bool = True
    lm_steps: int = 300
    lm_batch_size: int = 32
    lm_lr: float = 2e-3
    lm_warmup: int = 30
    # A Stage 1 pretrained on the CLIP's pairs (model/toy/stage1.py), the toy's public BLIP-2
    # checkpoint, from which a bootstrap's filter is finetuned instead of from the round's own
    # Stage 1 (which remembers the pairs it judges); 0: none, the filter starts from the round's.
    # The demo's preset asks for TOY_STAGE1_STEPS (capfilt/presets.py).
    stage1_steps: int = 0
    # A Stage 2 pretrained from that Stage 1 on the pretraining world's clean pairs (model/toy/stage2.py),
    # the toy's public BLIP-2 captioner, from which a bootstrap's captioner is finetuned instead of from
    # the round's own Stage 2 (which learnt the source's noisy captions); 0: none. The demo's preset
    # asks for TOY_STAGE2_STEPS.
    stage2_steps: int = 0
    # Intra-op threads while training. Models this small spend more time synchronising threads
    # than computing: measured on 2 shared cores, a CLIP step took 48 ms on 1 thread and
    # 150-900 ms on 2 (OpenMP threads spin while another process holds the other core).
    threads: int = 1

    def __post_init__(self):
        problems = [f"{name} must be >= 1 (got {getattr(self, name)})" for name in (
            "bert_vocab_size", "bert_steps", "bert_batch_size", "clip_steps", "clip_batch_size", "lm_vocab_size", "lm_steps", "lm_batch_size",
            "clip_context_length", "lm_max_length") if getattr(self, name) < 1]
        if self.stage1_steps < 0:
            problems.append(f"stage1_steps must be >= 0 (got {self.stage1_steps}; 0: no pretrained Stage 1)")
        if self.stage2_steps < 0:
            problems.append(f"stage2_steps must be >= 0 (got {self.stage2_steps}; 0: no pretrained Stage 2)")
        if self.clip_layers < 2:
            problems.append(f"clip_layers must be >= 2 (got {self.clip_layers}): Stage 1 uses the second-to-last block")
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if problems:
            raise ConfigError("toy preset: " + "; ".join(problems) + ".")

    @classmethod
    def world(cls, **overrides) -> "ToyPreset":
        """For a separate, larger pretraining world (`capfilt toy pretrain --world-images N`): the
        CLIP sees 256 pairs a step for 1000 steps. Contrastive learning learns what tells a batch's
        images apart; in 64 random scenes colour, size and background mostly do, so a 64-pair CLIP
        never learned shape or position. Measured (3000-image world, 600 held-out scenes, zero-shot
        choice among captions differing in one attribute): position 0.26 -> 0.71, shape 0.33 -> 0.49
        (chance 0.2 and 0.17); held-out retrieval top-1 0.34 -> 0.62.

        The LM trains 2400 steps, as a real frozen LLM is trained to convergence before anyone
        puts a soft prompt in front of it: on the 3000-image world's 2718 texts, 300 steps (3.5
        epochs) left an LM whose grammar Stage 2 still had to fix, and the captioner ignored the
        image (seed-0 demo world, oracle captions, Stage 2 400 steps, 600 held-out images:
        attribute accuracy 0.385, colour at chance); 1200 steps 0.645, 2400 steps 0.747, 4800
        steps 0.640 (one Stage 2 run each)."""
        return replace(cls(clip_batch_size=256, clip_steps=1000, lm_steps=2400), **overrides)

    @classmethod
    def quick(cls, **overrides) -> "ToyPreset":
        """Same architectures (so checkpoints are interchangeable), fewer steps."""
        return replace(cls(clip_steps=200, lm_steps=120, bert_steps=200), **overrides)


def write_info(folder: Path, kind: str, preset: ToyPreset, metrics: dict) -> None:
    info = {"kind": kind, "preset": asdict(preset), "metrics": metrics}
    (folder / TOY_INFO).write_text(json.dumps(info, indent=1, sort_keys=True))
