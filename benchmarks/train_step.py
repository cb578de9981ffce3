"""Where a toy Stage 1 / Stage 2 training step spends its time, and its samples/s against the
trainers as they were before (data path, loss and optimizer; kept here, reachable, as the baseline).

    uv run python -m benchmarks.train_step [--images 600] [--steps 150] [--stage 1|2|both] [--repeats 1|2]

Config: the demo's (capfilt/presets.py toy_preset): Q-Former hidden 64, 2 layers, 8 queries,
cross-attention in every layer, batch 32, augmentation off, frozen features cached, demo log and
checkpoint intervals; a toy open_clip ViT (32 px, width 64, 3 blocks) and, for Stage 2, a 2-layer
x 128 OPT. Images are the synthetic world's 32 px scenes, 2 kept captions each.

Both paths run `train()` itself on the same data in the same process, each twice (baseline,
capfilt, capfilt, baseline; each path's faster run counts); the baseline swaps in the
old dataset (a global-RNG seed per sample, every image decoded every epoch, per-sample text
layout), the old loss composition (Stage 1: ITG recomputing the query pass, ITM projecting 3B
image copies, today's attention masks, which are a little cheaper than before; Stage 2: the LM
head over every position and a key/value cache built in training) and the old optimizer (AdamW's
per-parameter loop, PyTorch's CPU default). Only steps
after the first epoch count (the first fills the feature cache). Time inside the step is the sum
of the objective's forward, backward, gradient clipping and the optimizer step, measured by
wrapping those calls; everything else between two optimizer steps (data, feature look-up,
logging, checkpoints) is "outside". On a GPU the wrappers synchronise so the split is honest.
Prints one JSON line per stage.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from model import stage2 as stage2_module  # noqa: E402
from model import train_stage1 as stage1_module  # noqa: E402
from model.blip2 import Blip2Stage2  # noqa: E402
from model.factory import architecture  # noqa: E402
from model.stage2 import Stage2Config, Stage2Objective, split_point  # noqa: E402
from model.train_stage1 import (  # noqa: E402
    Stage1Config,
    Stage1Objective,
    hash_seed,
    image_pixels,
    swap_left_right,
)

TOY_QFORMER = architecture("qformer-toy")  # the demo's Q-Former
LIVE_STAGE2_LOSS = Blip2Stage2.loss  # the baseline patches it
TOY_CLIP_NAME = "capfilt-bench-toy-clip"
# Steps measured after the first epoch: 40 (1.2 s) put one-off work in the window (epoch 0 leaves
# 24 of 600 images unencoded, which epoch 1 encodes one or two at a time) and the Stage 2 ratio
# read 1.87-2.02x from run to run; over 150 steps the window holds a steady state.
STEPS = 150


# -- the baseline: the data path as it was ----------------------------------------------------

class LegacyStage1Batches(stage1_module.Stage1Batches):
    """The old `__getitem__`: per sample, fork and seed torch's global RNG (which also seeds every
    accelerator backend) and decode the image, cached features or not."""

    def legacy_example(self, epoch, index):
        from torchvision.transforms import RandomResizedCrop

        cfg = self.config
        image = self.images[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash_seed(cfg.seed, epoch, index))
            caption = image.captions[int(torch.randint(len(image.captions), ()))]
            crop, flip = None, False
            if cfg.augment:
                from PIL import Image

                with Image.open(io.BytesIO(image.image)) as img:
                    crop = RandomResizedCrop.get_params(img, scale=(cfg.crop_min, 1.0), ratio=(3 / 4, 4 / 3))
                flip = cfg.flip and bool(torch.rand(()) < 0.5)
        if flip:
            caption = swap_left_right(caption)
        return image_pixels(image.image, self.preprocess, crop, flip), caption

    def legacy_samples(self, micro):
        cfg = self.config
        pos = self.position(micro)
        order = np.random.default_rng([cfg.seed, pos["epoch"]]).permutation(len(self.images))
        mine = order[self.rank::self.world_size]
        start = pos["batch_in_epoch"] * cfg.batch_size
        indices = mine[start:start + cfg.batch_size].tolist()
        pixels, captions = zip(*(self.legacy_example(pos["epoch"], i) for i in indices))
        return pos, indices, pixels, captions

    def __getitem__(self, micro):
        _, indices, pixels, captions = self.legacy_samples(micro)
        text = self.tokenizer(list(captions), padding="max_length", truncation=True,
                              max_length=self.config.max_text_length, return_tensors="pt")
        return {"pixels": torch.stack(pixels), "input_ids": text.input_ids,
                "attention_mask": text.attention_mask, "image_ids": torch.tensor(indices)}


class LegacyStage2Batches(stage2_module.Stage2Batches, LegacyStage1Batches):
    def __getitem__(self, micro):
        cfg = self.config
        pos, indices, pixels, captions = self.legacy_samples(micro)
        examples = [self.layout.example(cfg.prompt, c, split_point(cfg.seed, pos["epoch"], i, c))
                    for i, c in zip(indices, captions)]
        return {"pixels": torch.stack(pixels), "image_ids": torch.tensor(indices), **self.layout.collate(examples)}


def legacy_stage1_losses(model, image_features, input_ids, attention_mask, image_ids, itc_label_smoothing=0.1,
                         itg_label_smoothing=0.1, generator=None, hard_negatives=True, itc_local_grad=False):
    """The old composition: a query-only pass for ITC, ITM over 3B image copies, then ITG's own
    [queries ; text] pass recomputing the queries."""
    from model.losses import Stage1Losses, gather_no_grad, itc_loss, itg_loss, sample_hard_negatives

    model.clamp_temperature()
    image_tokens = model.prepare_image(image_features)
    image_feats = torch.nn.functional.normalize(model.vision_projection(model.query_output(image_tokens)), dim=-1)
    text_feat = model.text_features(input_ids, attention_mask)
    itc = itc_loss(image_feats, text_feat, model.temp, itc_label_smoothing)
    ids_all, mask_all, image_ids_all = (gather_no_grad(t) for t in (input_ids, attention_mask, image_ids))
    positive = image_ids[:, None] == image_ids_all[None, :]
    with torch.no_grad():
        neg_image = sample_hard_negatives(itc.sim_t2i, positive, generator, hard_negatives)
        neg_text = sample_hard_negatives(itc.sim_i2t, positive, generator, hard_negatives)
    negative_images = model.prepare_image(gather_no_grad(image_features)[neg_image])
    logits = model.itm_logits(torch.cat([image_tokens, image_tokens, negative_images]),
                              torch.cat([input_ids, ids_all[neg_text], input_ids]),
                              torch.cat([attention_mask, mask_all[neg_text], attention_mask]))
    batch = input_ids.shape[0]
    labels = torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)]).to(logits.device)
    itm = torch.nn.functional.cross_entropy(logits.float(), labels)
    accuracy = (logits.argmax(dim=1) == labels).float().mean().detach()
    itg = itg_loss(model, image_tokens, input_ids, attention_mask, itg_label_smoothing)
    return Stage1Losses(itc.loss + itm + itg, itc.loss, itm, itg, accuracy)


def legacy_stage2_loss(self, *args, **kwargs):
    """The old Stage 2 loss: today's, with the LM head and the loss over every position (queries
    included) and the LLM's default key/value cache built during the training pass."""
    llm = self.language_model
    forward = llm.forward

    def with_cache(*a, use_cache=None, **k):  # the LLM's default: build the cache
        return forward(*a, **k)

    with mock.patch.object(self, "keeps_logits", False), mock.patch.object(llm, "forward", with_cache):
        return LIVE_STAGE2_LOSS(self, *args, **kwargs)


class LegacyAdamW(torch.optim.AdamW):
    """The old optimizer: PyTorch's CPU default, a Python loop over the parameters."""

    def __init__(self, *args, foreach=None, fused=None, **kwargs):
        super().__init__(*args, foreach=False if not torch.cuda.is_available() else None, **kwargs)


@contextmanager
def legacy_path(stage: int):
    with mock.patch.object(stage1_module, "Stage1Batches", LegacyStage1Batches), \
            mock.patch.object(stage2_module, "Stage2Batches", LegacyStage2Batches), \
            mock.patch.object(stage1_module, "stage1_losses", legacy_stage1_losses), \
            mock.patch.object(Blip2Stage2, "loss", legacy_stage2_loss), \
            mock.patch.object(torch.optim, "AdamW", LegacyAdamW):
        # Legacy batches carry pixels: the cache takes them from the batch, as it used to.
        original = stage1_module.image_features

        def from_batch(batch, encoder, cache, device):
            if cache is None or "pixels" not in batch:
                return original(batch, encoder, cache, device)
            keys = [str(i) for i in batch["image_ids"].tolist()]
            by_key = dict(zip(keys, batch["pixels"]))
            return cache(keys, lambda missing: torch.stack([by_key[k] for k in missing])).to(device)

        with mock.patch.object(stage1_module, "image_features", from_batch), \
                mock.patch.object(stage2_module, "image_features", from_batch):
            yield


# -- timing the step's parts -------------------------------------------------------------------

# On CPU the clock is this process's CPU time: these machines' cores are shared, and wall time
# measures the neighbours as much as the code. On a GPU, wall time (kernels run off the CPU).
_now = time.perf_counter if torch.cuda.is_available() else time.process_time

class StepClock:
    """Wall time of each optimizer step's interval and the part of it in forward, backward,
    clipping and the optimizer, gathered by wrapping those calls."""

    def __init__(self, objective_class):
        self.objective_class = objective_class
        self.inside = 0.0
        self.marks: list[tuple[float, float]] = []  # (time at optimizer step end, inside so far)

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            self._sync()
            start = _now()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self.inside += _now() - start
        return wrapper

    @contextmanager
    def running(self):
        def step_post_hook(optimizer, args, kwargs):
            self.marks.append((_now(), self.inside))

        with mock.patch.object(self.objective_class, "forward", self._timed(self.objective_class.forward)), \
                mock.patch.object(torch.autograd, "backward", self._timed(torch.autograd.backward)), \
                mock.patch.object(torch.nn.utils, "clip_grad_norm_", self._timed(torch.nn.utils.clip_grad_norm_)):
            step_start = {}

            def pre(optimizer, args, kwargs):
                self._sync()
                step_start["t"] = _now()

            def post(optimizer, args, kwargs):
                self._sync()
                self.inside += _now() - step_start["t"]
                step_post_hook(optimizer, args, kwargs)

            from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

            handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
            try:
                yield self
            finally:
                for handle in handles:
                    handle.remove()

    def summary(self, skip: int, batch_size: int) -> dict:
        """Steps after the first `skip`: samples/s and the fraction of wall time outside the step."""
        (t0, in0), (t1, in1) = self.marks[skip], self.marks[-1]
        steps, wall = len(self.marks) - 1 - skip, t1 - t0
        return {"steps": steps, "samples_per_s": round(steps * batch_size / wall, 1),
                "step_ms": round(1000 * wall / steps, 1), "outside_fraction": round(1 - (in1 - in0) / wall, 3)}


# -- the toy world ------------------------------------------------------------------------------

def toy_open_clip(folder: Path) -> str:
    """The toy preset's ViT (32 px, 8 px patches, width 64, 3 blocks), random weights."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    config = {"embed_dim": 64,
              "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
              "text_cfg": {"context_length": 32, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 2}}
    (folder / f"{TOY_CLIP_NAME}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{TOY_CLIP_NAME}.json")
    torch.manual_seed(0)
    checkpoint = folder / "clip.pt"
    torch.save(open_clip.create_model(TOY_CLIP_NAME, pretrained=None).state_dict(), checkpoint)
    return f"open_clip:{TOY_CLIP_NAME}@{checkpoint}"


def make_world(base: Path, images: int) -> dict:
    from stage1_world import make_curated_run, make_tokenizer

    make_curated_run(base / "data", "bench", images=images, seed=0, captions_per_image=2)
    return {"root": str(base / "data"), "vision": toy_open_clip(base / "clip"),
            "tokenizer": str(make_tokenizer(base / "tok"))}


def stage1_config(world: dict, out: Path, steps: int) -> Stage1Config:
    return Stage1Config(root=world["root"], run="bench", vision=world["vision"], tokenizer=world["tokenizer"],
                        bert=None, model=TOY_QFORMER, out=str(out), steps=steps, batch_size=32, lr=2e-3,
                        warmup_steps=20, itm_random_negative_steps=steps, augment=False, cache_features=True,
                        log_every=10, checkpoint_every=100, progress=False, resume=False)


def run_stage1(world: dict, out: Path, steps: int, legacy: bool) -> dict:
    config = stage1_config(world, out, steps)
    clock = StepClock(Stage1Objective)
    with (legacy_path(1) if legacy else _nothing()), clock.running():
        result = stage1_module.train(config)
    return {**clock.summary(_skip(world, config), config.batch_size), "last_loss": result["metrics"][-1]["loss"]}


def _skip(world: dict, config) -> int:
    """The first epoch's steps (they fill the feature cache) plus one."""
    images = len(stage1_module.load_curated_images(world["root"], "bench"))
    return images // config.batch_size + 1


def stage2_world(world: dict, base: Path) -> dict:
    import stage2_world as s2

    s2.TINY_QFORMER = TOY_QFORMER  # the demo's Q-Former
    opt = s2.make_opt(base / "opt", width=128, layers=2, pretrain_steps=0)
    stage1 = s2.make_stage1_checkpoint(base / "stage1", world["vision"], Path(world["tokenizer"]))
    return {**world, "llm": opt, "stage1": str(stage1)}


def run_stage2(world: dict, out: Path, steps: int, legacy: bool) -> dict:
    config = Stage2Config(root=world["root"], run="bench", stage1=world["stage1"], llm=world["llm"], out=str(out),
                          steps=steps, batch_size=32, lr=2e-3, warmup_steps=20, augment=False, cache_features=True,
                          log_every=10, checkpoint_every=100, progress=False, resume=False, device="auto")
    clock = StepClock(Stage2Objective)
    with (legacy_path(2) if legacy else _nothing()), clock.running():
        result = stage2_module.train(config)
    return {**clock.summary(_skip(world, config), config.batch_size), "last_loss": result["metrics"][-1]["loss"]}


@contextmanager
def _nothing():
    yield


def measure(stage: int, images: int = 600, steps: int = STEPS, repeats: int = 2) -> dict:
    """Both paths of one stage on a fresh world, each `repeats` (1 or 2) times, the faster run of
    each kept; `steps` counted after the first epoch."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        world = make_world(base, images)
        total = images // 32 + 1 + steps
        if stage == 1:
            run = run_stage1
        else:
            world = stage2_world(world, base)
            run = run_stage2
        # Each path twice, in the order baseline, capfilt, capfilt, baseline, and each path's faster
        # run kept: one run of each read 1.96-2.34x for Stage 2 on the same code (a slow spell of the
        # shared machine lands on one path only).
        runs = {True: [], False: []}
        for i, legacy in enumerate((True, False, False, True) if repeats > 1 else (True, False)):
            runs[legacy].append(run(world, base / f"run{i}", total, legacy=legacy))
        legacy, new = (max(runs[k], key=lambda r: r["samples_per_s"]) for k in (True, False))
    return {"stage": stage, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads(), "baseline": legacy, "capfilt": new,
            "speedup": round(new["samples_per_s"] / legacy["samples_per_s"], 2),
            "all_samples_per_s": {"baseline": [r["samples_per_s"] for r in runs[True]],
                                  "capfilt": [r["samples_per_s"] for r in runs[False]]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--steps", type=int, default=STEPS, help="steps measured after the first epoch")
    parser.add_argument("--stage", choices=["1", "2", "both"], default="both")
    parser.add_argument("--repeats", type=int, choices=[1, 2], default=2,
                        help="runs of each path (2: baseline, capfilt, capfilt, baseline; the faster of each kept)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: toy models lose to thread synchronisation on shared cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for stage in ((1, 2) if args.stage == "both" else (int(args.stage),)):
        print(json.dumps(measure(stage, args.images, args.steps, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
