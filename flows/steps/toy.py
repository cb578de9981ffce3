"""The synthetic world's steps: the toy preset's frozen pieces, and the oracle run of true captions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from capfilt.errors import ConfigError


@dataclass(frozen=True)
class ToyPretrainStep:
    COMMAND: ClassVar[str] = "toy pretrain"

    root: str
    run: str  # an ingested run: its (image, web caption) pairs, unless world_images
    out: str  # tokenizer/, bert/, clip/ (open_clip local-dir:), lm/ and, with stage1_steps / stage2_steps, stage1/ / stage2/
    quick: bool = False
    seed: int = 0
    world_images: int = 0  # > 0: pretrain on a separate synthetic world of this many images instead
    world_noise: float = 0.4
    world_seed: int = 104729
    clip_world_images: int = 0  # > 0: the CLIP alone pretrains on a pretraining world of this many images
    stage1_steps: int = 0  # > 0: also a Stage 1 pretrained on the CLIP's pairs (model/toy/stage1.py), the filter's start
    # > 0: also a Stage 2 pretrained from that Stage 1 on the world's uncorrupted pairs (model/toy/stage2.py), the captioner's start
    stage2_steps: int = 0

    def check(self, will_exist: tuple[str, ...] = ()) -> None:
        for option in ("world_images", "clip_world_images", "stage1_steps", "stage2_steps"):
            if getattr(self, option) < 0:
                raise ConfigError(f"--{option.replace('_', '-')} must be >= 0, got {getattr(self, option)}.")
        if self.stage1_steps and not self.world_images:
            raise ConfigError("--stage1-steps needs --world-images: a Stage 1 pretrained on the run's own pairs would "
                              "judge the pairs it learnt, as the round's Stage 1 does; it is pretrained on another world.")
        if self.stage2_steps and not self.stage1_steps:
            raise ConfigError("--stage2-steps needs --stage1-steps (in a bootstrap: pretrain.stage2_steps needs "
                              "pretrain.stage1_steps): the pretrained Stage 2 starts from the pretrained Stage 1; "
                              "set both to 0 for neither.")
        if self.clip_world_images and not self.world_images:
            raise ConfigError("--clip-world-images needs --world-images: the CLIP's world is a pretraining world "
                              "beside the text pieces' one.")

    def _world(self, images: int):
        """A pretraining world of `images` images (made once under <root>/worlds/), its pairs for the CLIP
        (the web pairs, each described image once with its first wording), the described images'
        other wordings (for the text pieces) and its clean pairs (for the Stage 2: the web pairs the
        world did not corrupt, and the described ones)."""
        from pathlib import Path

        from model.toy.world import described_pairs, pretraining_world, world_pairs

        world = pretraining_world(Path(self.root) / "worlds" / f"toy-pretrain-{images}-noise{self.world_noise}"
                                  f"-seed{self.world_seed}-described", images, self.world_seed, self.world_noise)
        every_wording = described_pairs(world)
        described = [(image, captions[0]) for image, captions in every_wording]
        texts = [text for _, captions in every_wording for text in captions[1:]]
        return world, world_pairs(world) + described, texts, world_pairs(world, clean=True) + described

    def execute(self, say=print) -> dict:
        from model.toy.preset import ToyPreset
        from model.toy.pretrain import pretrain_toy, pretrain_toy_pairs

        world_images = self.world_images
        fields = {"seed": self.seed, "stage1_steps": self.stage1_steps, "stage2_steps": self.stage2_steps}
        preset = (ToyPreset.quick(**fields) if self.quick else ToyPreset.world(**fields) if world_images
                  else ToyPreset(**fields))
        if world_images:
            world, pairs, texts, caption_pairs = self._world(world_images)
            # "clip_world" is always there, so a folder whose CLIP saw another world is never reused for one that did not
            about = {"world": str(world), "clip_world": None, "counts": {
                "pairs": len(pairs), "texts": len(pairs) + len(texts), "clean_pairs": len(caption_pairs)}}
            clip_pairs = None
            if self.clip_world_images and self.clip_world_images != world_images:
                clip_world, clip_pairs, _, _ = self._world(self.clip_world_images)
                about = {**about, "clip_world": str(clip_world),
                         "counts": {**about["counts"], "clip_pairs": len(clip_pairs)}}
            info = pretrain_toy_pairs(pairs, self.out, preset, extra_texts=texts, about=about, clip_pairs=clip_pairs,
                                      caption_pairs=caption_pairs)
            what = f"pretraining world {world}" + (f" (the CLIP: {about['clip_world']})" if clip_pairs else "")
        else:
            info = pretrain_toy(self.root, self.run, self.out, preset)
            what = f"run '{self.run}'"
        if info["reused"]:
            say(f"{self.out} already holds the toy models for {what} (same preset): nothing to do")
            return info
        if info["kept"]:
            say(f"kept from the folder (same pairs and settings): {', '.join(info['kept'])}")
        c = info["counts"]
        if world_images:
            say(f"trained on {c['pairs']} pairs of the {what} (not on run '{self.run}')")
        else:
            say(f"trained on {c['pairs']} pairs of run '{self.run}' ({c['duplicates']} duplicate images, "
                f"{c['empty_caption']} empty captions, {c['undecodable']} undecodable images left out)")
        say(f"bert: masked-LM loss {info['bert']['loss_first']:.3f} -> {info['bert']['loss_last']:.3f} "
            f"({info['bert']['seconds']:.0f} s)")
        say(f"clip: loss {info['clip']['loss_first']:.3f} -> {info['clip']['loss_last']:.3f} "
            f"({info['clip']['seconds']:.0f} s); lm: loss {info['lm']['loss_first']:.3f} -> "
            f"{info['lm']['loss_last']:.3f} ({info['lm']['seconds']:.0f} s)")
        if info.get("stage1"):
            s1 = info["stage1"]
            say(f"stage1: {s1['steps']} steps on {s1['pairs']} pairs, loss {s1['loss_last']:.3f}, ITM accuracy "
                f"{s1['itm_accuracy_last']:.2f} ({s1['seconds']:.0f} s): the filter's start, {self.out}/stage1")
        if info.get("stage2"):
            s2 = info["stage2"]
            say(f"stage2: {s2['steps']} steps on {s2['pairs']} clean pairs, loss {s2['loss_last']:.3f} "
                f"({s2['seconds']:.0f} s): the captioner's start, {self.out}/stage2")
        say(f"tokenizer: {self.out}/tokenizer  bert: {self.out}/bert  clip: local-dir:{self.out}/clip  lm: {self.out}/lm")
        return info


@dataclass(frozen=True)
class OracleStep:
    COMMAND: ClassVar[str] = "synth oracle"
    OPTIONS: ClassVar[dict] = {}

    truth: str  # the world's ground_truth.parquet
    root: str
    from_run: str  # whose ingested images
    run: str  # written: curated/ with the true captions

    def check(self, will_exist: tuple[str, ...] = ()) -> None:
        pass  # the ground truth is read when the step runs (the CLI's --truth must exist)

    def execute(self, say=print) -> dict:
        from model.toy.oracle import write_oracle_run

        totals = write_oracle_run(self.truth, self.root, self.from_run, self.run)
        say(f"oracle run {self.run}: {totals['images']} images = {totals['kept']} with true captions + "
            f"{totals['dropped']} dropped (no ground truth)")
        return totals
