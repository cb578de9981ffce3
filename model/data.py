"""Curated images -> seeded micro-batches: the data every trainer that reads image-text pairs uses.

Micro-batch m is a pure function of (seed, m): each epoch is a seeded permutation of the images,
and per sample a generator seeded by (seed, epoch, image) picks the caption, the crop and the
flip. That is what lets a checkpoint resume exactly (model/trainer.py) without saving any data
loader state. Stage 1 tokenizes the captions for BERT (`Stage1Batches`), Stage 2 lays them out
for its LLM (`model.stage2.Stage2Batches`, a subclass).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from capfilt.errors import ConfigError

from .recipes import process_captions
from .vision import FeatureCache, Preprocess


@dataclass(kw_only=True)
class TrainingConfig:
    """What Stage 1 and Stage 2 configs share: the run, the loop (model/trainer.py), the recipe's
    rows and the data's transforms. The rows where the paper and LAVIS differ (model/recipes.py)
    are None by default and take `recipe`'s value; set one to override that row only."""

    root: str
    run: str
    out: str
    steps: int = 10_000
    batch_size: int = 32  # per worker, per micro-step
    grad_accumulation: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    recipe: str = "paper"  # paper | lavis: the defaults of the rows below
    min_lr: float | None = None
    warmup_steps: int | None = None
    warmup_lr: float | None = None  # warmup starts here (0: at lr / warmup_steps)
    lr_schedule: str | None = None  # cosine-step | cosine-epoch
    betas: tuple[float, float] | None = None
    grad_clip: float | None = None  # max gradient norm; 0 = no clipping
    text_processing: str | None = None  # tokenizer | pre_caption (LAVIS)
    precision: str = "bf16"  # bf16 | fp16 (with GradScaler) | fp32; autocast on GPU only
    activation_checkpointing: bool = False
    augment: bool = True  # random resized crop (scale crop_min..1) + flip
    crop_min: float = 0.5
    flip: bool = True  # a flip also swaps 'left' and 'right' in the caption
    cache_features: bool = False  # frozen features computed once per image (needs augment off)
    max_text_length: int = 32
    holdout_images: int = 0  # images kept out of training, for retrieval evaluation
    # Out-of-fold training: with folds K > 1, every image but those of fold `fold` (fold_of: by
    # sample id), so that the model can judge that fold's pairs without having learned them.
    folds: int = 1
    fold: int | None = None
    seed: int = 0
    device: str = "auto"
    num_data_workers: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    resume: bool = True
    stop_at: int | None = None  # stop after this step as if killed (time-sliced jobs, tests)
    progress: bool = True

    def check(self, positive: tuple[str, ...]) -> None:
        """Precision, the feature cache (only without augmentation), the `positive` fields >= 1,
        the crop's scale."""
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"--precision must be bf16, fp16 or fp32, got {self.precision!r}.")
        if self.cache_features and self.augment:
            raise ConfigError("--cache-features needs --no-augment: cached features are only valid when an "
                              "image's pixels are the same every epoch.")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if not 0 < self.crop_min <= 1:
            raise ConfigError(f"--crop-min must be in (0, 1], got {self.crop_min}.")
        if self.folds < 1:
            raise ConfigError(f"--folds must be >= 1, got {self.folds}.")
        if (self.fold is None) != (self.folds == 1) or (self.fold is not None and not 0 <= self.fold < self.folds):
            raise ConfigError(f"--fold must be one of 0..{self.folds - 1} with --folds {self.folds} > 1, and unset "
                              f"without it; got --fold {self.fold}.")


@dataclass
class CuratedImage:
    sample_id: str
    source: object  # the encoded bytes, or a reference (pipeline.curated.ImageRef) read on demand
    captions: list[str]

    @property
    def image(self) -> bytes:
        # Bytes are read when a batch needs them, so a run's images are never all in memory.
        return self.source if isinstance(self.source, bytes) else self.source.read()


def load_curated_images(root: str, run: str) -> list[CuratedImage]:
    """A run's curated images with their kept captions (sorted by sample_id, captions best first)."""
    from pipeline.curated import image_index
    from pipeline.run_store import RunStore

    store = RunStore(root, run)
    images = [CuratedImage(row["sample_id"], ref, row["captions"])
              for row, ref in image_index(store, ["sample_id", "captions"])]
    selected = [r for r in store.records("select") if r.status == "done"] if not images else []
    if selected:  # the filter ran and kept nothing: say so, not "run the filter"
        raise ConfigError(
            f"run '{run}' under {root}: its filter kept none of its {sum(r.rows_in or 0 for r in selected)} captions, "
            f"so there is nothing to train on; {store.uri(store.report_dir())}/filter.html shows each caption's drop "
            f"reason. A calibrated filter that keeps nothing judges this source's captions unlike its calibration "
            f"pairs: filter again with a lower --target-precision or --stated-prior, or finetune the filter with "
            f"another --filter-score."
        )
    if not images:
        raise ConfigError(
            f"run '{run}' under {root} has no curated rows (no images in {store.uri(store.artifact_dir('curated_images'))}); "
            f"run `capfilt filter` for it first."
        )
    return sorted(images, key=lambda im: im.sample_id)


def fold_of(key: str, folds: int) -> int:
    """The fold (0..folds-1) of an image key (a sample id), the same in every process and run."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") % folds


def split_holdout(images: list[CuratedImage], holdout: int, seed: int):
    """(train, held out): `holdout` images picked by a seeded permutation."""
    if holdout >= len(images):
        raise ConfigError(f"--holdout-images {holdout} leaves no training images (the run has {len(images)}).")
    order = np.random.default_rng([seed, 7]).permutation(len(images))
    held = set(order[:holdout].tolist())
    return [im for i, im in enumerate(images) if i not in held], [im for i, im in enumerate(images) if i in held]


_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


def swap_left_right(caption: str) -> str:
    """What a horizontal flip does to a caption's meaning."""
    return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", caption)


def image_pixels(data: bytes, preprocess: Preprocess, crop=None, flip: bool = False) -> torch.Tensor:
    """Decode, crop (i, j, h, w) or plain-resize to the encoder's size, flip, normalise."""
    from PIL import Image

    return pil_pixels(Image.open(io.BytesIO(data)), preprocess, crop, flip)


def pil_pixels(img, preprocess: Preprocess, crop=None, flip: bool = False) -> torch.Tensor:
    """`image_pixels` for an image already decoded (a PIL image)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    img = img.convert("RGB")
    size = [preprocess.image_size, preprocess.image_size]
    if crop is None:
        img = TF.resize(img, size, interpolation=InterpolationMode.BICUBIC)
    else:
        img = TF.resized_crop(img, *crop, size, interpolation=InterpolationMode.BICUBIC)
    if flip:
        img = TF.hflip(img)
    return TF.normalize(TF.to_tensor(img), preprocess.mean, preprocess.std)


class Stage1Batches(torch.utils.data.Dataset):
    """Micro-batch number m -> that micro-batch, for this worker; a pure function of (seed, m).

    Each epoch is a seeded permutation of the images, dealt round-robin to the workers; the
    ragged end of an epoch is dropped so every worker holds equal batches (ITC's targets rely on
    it). Per sample, a generator seeded by (seed, epoch, image) picks the caption (one of the
    image's kept captions, BLIP-2), the crop and the flip.

    With cached features (`config.cache_features`) a batch carries no pixels: the frozen
    encoder's output of an image never changes, so the trainer decodes an image (`plain_pixels`)
    only the first time the cache meets it, not every epoch.
    """

    def __init__(self, images, tokenizer, preprocess, config, rank: int = 0, world_size: int = 1):
        self.images, self.tokenizer, self.preprocess, self.config = images, tokenizer, preprocess, config
        self.rank, self.world_size = rank, world_size
        self.with_pixels = not config.cache_features
        # Token ids per caption, kept alongside cached features (both hold the run's data in
        # memory; ids are tiny next to features): after the first epoch no batch calls the
        # tokenizer, whose Python-side conversion cost more than the rest of a batch.
        self.token_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = {} if config.cache_features else None
        per_worker = len(images) // world_size
        # A curated run smaller than one batch (a strict filter on a small source, an ablation arm)
        # still trains, on batches of all it has, and says so; below 2 per worker (ITC needs a
        # negative in the batch) it is an error.
        self.batch_size = min(config.batch_size, per_worker)
        if self.batch_size < 2:
            raise ConfigError(
                f"{len(images)} training images cannot fill a batch of 2 (ITC needs a negative) on each of "
                f"{world_size} worker(s); curate more data."
            )
        if self.batch_size < config.batch_size:
            logging.getLogger(__name__).warning(
                "%d training images fill no batch of %d on each of %d worker(s): batches of %d instead",
                len(images), config.batch_size, world_size, self.batch_size)
        self.per_epoch = per_worker // self.batch_size
        self._epoch_order: tuple[int, list[int]] | None = None  # (epoch, this worker's image order)

    def __len__(self):
        return self.per_epoch * 10**9  # endless; the trainer decides when to stop

    def position(self, micro: int) -> dict:
        return {"epoch": micro // self.per_epoch, "batch_in_epoch": micro % self.per_epoch}

    def indices(self, micro: int) -> tuple[int, list[int]]:
        """(epoch, this worker's image indices) of micro-batch `micro`."""
        pos = self.position(micro)
        epoch = pos["epoch"]
        if self._epoch_order is None or self._epoch_order[0] != epoch:  # drawn once per epoch, not per batch
            order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.images))
            self._epoch_order = (epoch, order[self.rank::self.world_size].tolist())
        start = pos["batch_in_epoch"] * self.batch_size
        return epoch, self._epoch_order[1][start:start + self.batch_size]

    def draw(self, epoch: int, index: int, img=None) -> tuple[str, tuple | None, bool]:
        """(caption, crop, flip) of one sample, from its own generator seeded by (seed, epoch, image).

        An explicit generator, not the global one: seeding torch's global RNG per sample also
        seeds every accelerator backend, which cost more than the sample itself. The draws (and
        so the data) are the same as seeding the global generator would give. `img` (a PIL
        image) is needed only with augmentation, for the crop's bounds.
        """
        cfg = self.config
        image = self.images[index]
        generator = torch.Generator().manual_seed(hash_seed(cfg.seed, epoch, index))
        caption = image.captions[int(torch.randint(len(image.captions), (), generator=generator))]
        crop, flip = None, False
        if cfg.augment:
            crop = random_resized_crop(img.size, (cfg.crop_min, 1.0), (3 / 4, 4 / 3), generator)
            flip = cfg.flip and bool(torch.rand((), generator=generator) < 0.5)
        return (swap_left_right(caption) if flip else caption), crop, flip

    def example(self, epoch: int, index: int):
        """(pixels, caption) of one sample, augmented as the config says."""
        from PIL import Image

        with Image.open(io.BytesIO(self.images[index].image)) as img:
            caption, crop, flip = self.draw(epoch, index, img)
            return pil_pixels(img, self.preprocess, crop, flip), caption

    def plain_pixels(self, indices: list[int]) -> torch.Tensor:
        """Unaugmented pixels of these images (what the feature cache encodes once)."""
        return torch.stack([image_pixels(self.images[i].image, self.preprocess) for i in indices])

    def samples(self, micro: int) -> tuple[list[int], list[str], torch.Tensor | None]:
        """(image indices, captions, pixels or None) of micro-batch `micro`."""
        epoch, indices = self.indices(micro)
        if not self.with_pixels:
            return indices, [self.draw(epoch, i)[0] for i in indices], None
        pixels, captions = zip(*(self.example(epoch, i) for i in indices))
        return indices, list(captions), torch.stack(pixels)

    def tokens(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), padded to the batch's longest text (at most max_text_length)."""
        def tokenize(texts):
            text = self.tokenizer(texts, padding="max_length", truncation=True,
                                  max_length=self.config.max_text_length, return_tensors="pt")
            return text.input_ids, text.attention_mask

        if self.token_cache is None:
            input_ids, attention_mask = tokenize(captions)
        else:
            missing = [c for c in dict.fromkeys(captions) if c not in self.token_cache]
            if missing:
                self.token_cache.update(zip(missing, zip(*tokenize(missing))))
            rows = [self.token_cache[c] for c in captions]
            input_ids, attention_mask = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        # Padding columns are masked out of every attention and loss, so cutting them changes only
        # the cost: web captions are often far shorter than max_text_length (the toy's ~12 of 32).
        width = max(int(attention_mask.sum(dim=1).max()), 1)
        return input_ids[:, :width], attention_mask[:, :width]

    def __getitem__(self, micro: int) -> dict:
        indices, captions, pixels = self.samples(micro)
        input_ids, attention_mask = self.tokens(captions)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "image_ids": torch.tensor(indices)}
        if pixels is not None:
            batch["pixels"] = pixels
        return batch


def random_resized_crop(size: tuple[int, int], scale, ratio, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random resized crop of an image of `size` (width, height).

    torchvision's RandomResizedCrop.get_params draws from the global generator; this takes an
    explicit one and draws in the same order, so a seed gives the same crop either way.
    """
    width, height = size
    area = width * height
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    # No fit in ten tries: the central crop of the nearest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def hash_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def training_images(config, images: list | None, lineage: dict | None) -> tuple[list, dict]:
    """(training images, their lineage): `images` or the curated run's, less the held-out ones and
    (folds > 1) those of the left-out fold, captions processed as the recipe says."""
    from pipeline.lineage import curated_lineage

    images, _ = split_holdout(images or load_curated_images(config.root, config.run), config.holdout_images, config.seed)
    if config.folds > 1:
        images = [im for im in images if fold_of(im.sample_id, config.folds) != config.fold]
        if not images:
            raise ConfigError(f"--fold {config.fold} of --folds {config.folds} leaves no training images.")
    return process_captions(images, config.text_processing), lineage or curated_lineage(config.root, config.run)


def feature_cache(encoder, data: Stage1Batches) -> FeatureCache | None:
    """The frozen encoder's features kept per image when the config caches them (else None);
    an image is decoded only the first time the cache meets it (such batches carry no pixels)."""
    if not data.config.cache_features:
        return None
    return FeatureCache(encoder, lambda keys: data.plain_pixels([int(k) for k in keys]))


def image_features(batch, encoder, cache, device) -> torch.Tensor:
    """The frozen encoder's image tokens of a batch, from its pixels or from the cache."""
    if cache is None:
        return encoder(batch["pixels"].to(device))
    return cache([str(i) for i in batch["image_ids"].tolist()]).to(device)
