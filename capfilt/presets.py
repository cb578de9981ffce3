"""Presets: the stage settings of a bootstrap, as typed data.

A preset holds, per stage, a typed partial config: some fields of the stage's step (flows/steps/:
its IngestConfig, CaptionConfig, FilterConfig's parts, Stage1Config, ...) by their Python names,
each name and value checked against the step class when the preset is built (a typo is a
ConfigError naming the preset, the stage and the field). The flow puts what a user passes
(`--set stage.field=value`, field name or option spelling) over it and builds each step from it.
`blip2` names the real models of the papers (hub ids and open_clip tags).
`toy` is the BLIP-2 recipe in miniature for a laptop without internet: its frozen pieces (text
tokenizer, a small masked-LM BERT, a small CLIP, a small causal LM) are first trained from scratch by
`capfilt toy pretrain` on a separate synthetic pretraining world (`--quick`: on the source's raw web
pairs), into `<root>/models/<run>-toy/`, and every later stage points there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from capfilt.errors import ConfigError
from flows.steps import StepFields
from model.factory import architecture
from model.toy.preset import STAGE1_RECIPE, STAGE2_RECIPE, TOY_STAGE1_STEPS, TOY_STAGE2_STEPS

# Layout written by `capfilt toy pretrain --out DIR` (model/toy/pretrain.py): the preset refers to it.
TOY_TOKENIZER = "tokenizer"
TOY_BERT = "bert"  # masked-LM BERT of the Q-Former's sizes: Stage 1 starts from it (BLIP-2: bert-base)
TOY_CLIP = "clip"  # an open_clip local-dir: open_clip_config.json + weights
TOY_LM = "lm"
TOY_PRETRAIN_WORLD_IMAGES = 3000


def _stage(command: str):
    """A preset field holding some fields of `command`'s step (given as a mapping, checked in __post_init__)."""
    return field(default_factory=dict, metadata={"command": command})


@dataclass(frozen=True)
class Preset:
    """Each stage's fields by name, e.g. `filter={"top_k": 2, "dedup": {"semantic": False}}`; built
    into StepFields, checked against the stage's step class."""

    name: str
    ingest: StepFields = _stage("ingest")
    round0_caption: StepFields = _stage("caption")  # round 0: no model of our own yet
    round0_filter: StepFields = _stage("filter")
    caption: StepFields = _stage("caption")  # rounds >= 1: captioner = previous round's Stage 2
    filter: StepFields = _stage("filter")  # rounds >= 1: ITM = previous round's Stage 1
    # rounds >= 1 with an annotated set (BLIP's recipe): every caption kept when the finetuned
    # filter's ITM probability reaches its calibrated threshold (itm is the finetuned filter)
    calibrated_filter: StepFields = _stage("filter")
    calibrated_caption: StepFields = _stage("caption")  # put over `caption` in that recipe
    finetune_filter: StepFields = _stage("finetune filter")
    finetune_captioner: StepFields = _stage("finetune captioner")
    stage1: StepFields = _stage("train stage1")
    stage2: StepFields = _stage("train stage2")
    pretrain: StepFields | None = field(default=None, metadata={"command": "toy pretrain"})  # presets that need it

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            command = f.metadata.get("command")
            if command and isinstance(value, Mapping):
                object.__setattr__(self, f.name, StepFields.of(command, value, f"preset {self.name}, {f.name}", cli=False))
            elif command and value is not None and value.command != command:
                raise ConfigError(f"preset {self.name}, {f.name}: fields of {value.command!r}, not of {command!r}.")


def blip2_preset() -> Preset:
    """The papers' models: BLIP-large captioner, ViT-L-14 CLIP, blip2-itm-vit-g, EVA ViT-g, OPT-2.7B."""
    clip = {"clip": "ViT-L-14", "clip_pretrained": "openai"}
    return Preset(
        name="blip2",
        ingest={"image_size": 364, "shard_size": 10_000},
        round0_caption={"captioner": "Salesforce/blip-image-captioning-large", "num_captions": 10},
        round0_filter={**clip, "itm": "Salesforce/blip2-itm-vit-g", "policies": ("blip2",), "top_k": 2},
        caption={"num_captions": 10, "prompt": "a photo of"},
        filter={**clip, "policies": ("blip2",), "top_k": 2},
        calibrated_filter={**clip, "policies": ("calibrated",)},
        # BLIP's CapFilt writes one nucleus-sampled caption per image for its per-caption filter;
        # the 10 above are BLIP-2's, ranked with the web caption and the top 2 kept
        calibrated_caption={"num_captions": 1},
        # the finetuned ITM and the CLIP calibrated on the same held-out pairs; the filter thresholds
        # whichever reaches the target precision with more recall (pipeline/calibrate.py choose)
        finetune_filter={**clip},
        stage1={"vision": "open_clip:EVA01-g-14@laion400m_s11b_b41k", "model": architecture("qformer-base"),
                "steps": 250_000, "batch_size": 64},
        stage2={"llm": "facebook/opt-2.7b", "steps": 80_000, "batch_size": 64},
    )


def toy_preset(toy_dir: str, quick: bool = False) -> Preset:
    """Miniature BLIP-2 recipe, trained on the source itself (see module docstring)."""
    clip_spec = f"local-dir:{toy_dir}/{TOY_CLIP}"
    # ITM negatives: BLIP-2's, sampled by ITC similarity, after 200 uniform steps. They teach the ITM
    # the one-attribute differences that retrieval among similar captions turns on; uniform ones
    # almost always differ in colour or background. Held-out text->image R@1 (ITM rerank), 3 seeds,
    # uniform -> hard: raw 0.104 -> 0.127, filter arm 0.204 -> 0.244, oracle 0.178 -> 0.267 (README,
    # "BLIP-2's hard ITM negatives"). On the raw pairs the ITM learns less from them (training accuracy
    # 0.68-0.74), which mattered while round 0's model was the next round's filter: it still is with
    # --quick (its round 1 ranks by round 0's ITM; its 100 steps stay uniform), with --no-blip and with
    # `--set pretrain.stage1_steps=0`; the full preset's filter is finetuned from the toy's pretrained
    # Stage 1 (model/toy/stage1.py, uniform negatives, unchanged).
    # 1000 steps, not 600, let data quality show (testbed: +4.5 points vs +2.3).
    # The Q-Former is qformer-toy (model/configs/): cross-attention in both of its 2 layers (BLIP-2
    # has it every other layer of 12): with the default every-other, ITM learned nothing in 600
    # steps on a 240-image world. The toy BERT has its sizes (ToyPreset.bert_*): Stage 1 starts from it.
    # Stage 2 trains 1200 steps: at 400 the captioner was far from done (seed-0 demo world, 600
    # held-out images, beam 3: attribute accuracy 0.685 / all five right 0.075 on the true captions,
    # 0.475 on the raw pairs; at 1200 0.867 / 0.418 and 0.613; at 2400 0.894 / 0.513), about 40 s more.
    # Stage 1 trains 2000 steps: at 1000 it was far from done too (seed-0 demo world, 600 held-out
    # images, text->image R@1 with ITM re-ranking / ITC: true captions 0.135 / 0.148 at 1000 steps,
    # 0.368 / 0.497 at 2000; raw pairs 0.098 / 0.090 and 0.133 / 0.153), about 80 s more a training.
    stage1_steps, stage2_steps = (100, 80) if quick else (2000, 1200)
    no_semantic_dedup = {"semantic": False}
    return Preset(
        name="toy",
        ingest={"image_size": 64, "timeout": 3, "allow_private_addresses": True},
        round0_caption={"captioner": "none"},
        # Raw web pairs: exact duplicates and empty captions go, nothing is judged by a model.
        round0_filter={"clip": clip_spec, "policies": ("blip2",), "top_k": 1, "dedup": no_semantic_dedup},
        caption={"num_captions": 2 if quick else 4, "top_p": 0.9, "max_length": 16, "min_length": 4},
        # CapFilt with the previous round's models: an image's web + synthetic captions ranked by
        # that round's Stage 1 ITM, the best kept. Ranking, not an absolute threshold: a young
        # model's ITM probabilities sit near its prior, and a threshold would keep nothing.
        # Semantic dedup off: a synthetic world's scenes with the same attributes are near
        # duplicates by design, and dropping them would make the rounds' training sets differ.
        filter={"clip": clip_spec, "policies": ("blip2",), "rank_by": "itm", "top_k": 1 if quick else 2,
                "dedup": no_semantic_dedup},
        calibrated_filter={"clip": clip_spec, "policies": ("calibrated",), "dedup": no_semantic_dedup},
        # One caption per image there, as BLIP's CapFilt: the per-caption filter keeps every caption
        # it judges a match, and with 4 per image round 0's captioner (all five attributes right in
        # 2-4% of its samples) outnumbered the web captions kept 2-3 to 1. Table 1's capfilt arm,
        # 3 seeds, held-out text->image R@1 (ITM rerank): 4 captions 0.118 / 0.077 / 0.112, one
        # 0.140 / 0.085 / 0.165 (raw 0.133 / 0.068 / 0.087).
        calibrated_caption={"num_captions": 1},
        # a synthetic world's annotated set is 10% of it: 16 finetuning images in the --quick world.
        # The finetuned ITM and the frozen CLIP are calibrated on the same held-out pairs and the
        # filter uses whichever reaches the precision with more recall (--filter-score best).
        finetune_filter={"batch_size": 16, "clip": clip_spec},
        finetune_captioner={"batch_size": 16},
        stage1={"vision": f"open_clip:{clip_spec}", "tokenizer": f"{toy_dir}/{TOY_TOKENIZER}", "bert": f"{toy_dir}/{TOY_BERT}",
                "model": architecture("qformer-toy"), "steps": stage1_steps, **STAGE1_RECIPE,
                "itm_random_negative_steps": stage1_steps if quick else 200, "log_every": 10, "checkpoint_every": 100},
        stage2={"llm": f"{toy_dir}/{TOY_LM}", "steps": stage2_steps, **STAGE2_RECIPE, "log_every": 10,
                "checkpoint_every": 100},
        # Full: the frozen pieces pretrain on a separate 3000-image world (made once under the
        # root, as real frozen models saw other, larger data), with a 256-pair CLIP batch
        # (ToyPreset.world). Testbed, seed 0: raw vs oracle held-out R@1 0.067 vs 0.233, where
        # pretraining on the run's own 600 pairs gave 0.067 vs 0.115. --quick: the run's pairs.
        # Full, also a Stage 1 on that world's pairs (TOY_STAGE1_STEPS), the toy's public BLIP-2 checkpoint:
        # round k's filter is finetuned from it, not from round k-1's Stage 1, which remembers the noise
        # of the very pairs it judges (ITM ROC-AUC on round 1's corrupted web captions, seeds 0 / 1 / 2:
        # 0.957 / 0.962 / 0.965 against 0.872 / 0.857 / 0.859), and a Stage 2 from it on that world's
        # uncorrupted pairs (TOY_STAGE2_STEPS), the toy's public captioner: round k's captioner is
        # finetuned from it, not from round k-1's Stage 2, which learnt the source's corrupted captions.
        pretrain={"out": toy_dir, **({"quick": True} if quick else {"world_images": TOY_PRETRAIN_WORLD_IMAGES,
                                                                     "stage1_steps": TOY_STAGE1_STEPS,
                                                                     "stage2_steps": TOY_STAGE2_STEPS})},
    )


PRESETS = ("toy", "blip2", "none")


def get_preset(name: str, toy_dir: str, quick: bool = False) -> Preset:
    if name == "toy":
        return toy_preset(toy_dir, quick)
    if name == "blip2":
        return blip2_preset()
    if name == "none":
        return Preset(name="none")
    raise ConfigError(f"--preset {name!r}: choose one of {', '.join(PRESETS)}.")
