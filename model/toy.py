"""The toy preset: the "pretrained" pieces of a miniature BLIP-2, trained from scratch on the source.

BLIP-2 starts from frozen pretrained models (a CLIP image encoder, a BERT tokenizer, an LLM).
Offline, with no hub and two CPU cores, there are none, so the demo trains tiny stand-ins on the
source's own (image, web caption) pairs, once, in seconds, and saves each in the format its real
counterpart has, so the rest of capfilt loads them through the same calls as real names:

  train_text_tokenizer(texts, folder)  BERT WordPiece tokenizer    model.qformer.load_tokenizer(folder)
  pretrain_clip(pairs, folder)         open_clip ViT CLIP          model.scorers.load_clip(name, ckpt) after
                                                                   register_clip_config(config), and
                                                                   model.vision.load_vision_encoder(spec)
  pretrain_lm(texts, folder)           OPT-style causal LM + BPE   AutoModelForCausalLM / AutoTokenizer

Every function is seeded and deterministic on CPU, and its sizes and step counts come from a
`ToyPreset` (`ToyPreset.quick()` for the 3-minute demo). Each writes `toy.json` next to its
files with the preset and the figures it reached.
"""

from __future__ import annotations

import io
import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import torch

from capfilt.errors import ConfigError
from capfilt.logs import RANDOM_INIT, expected

from .trainer import LoopConfig, Objective, fit

TOY_INFO = "toy.json"


@dataclass(frozen=True)
class ToyPreset:
    """Sizes and step counts of the toy pieces. Defaults fit ~500-2000 pairs of 32-64 px images."""

    seed: int = 0
    # BERT WordPiece tokenizer (Q-Former text side)
    bert_vocab_size: int = 1000
    # A small BERT pretrained with masked-LM on the captions, the toy's bert-base-uncased: BLIP-2
    # initialises the Q-Former's self-attention and feed-forward layers from BERT. Its sizes are
    # the toy Q-Former's (capfilt/presets.py TOY_QFORMER; init_from_bert refuses a mismatch).
    # Measured on a 600-image world (seed 0, oracle captions, 1000 Stage 1 steps): held-out
    # text->image ITC R@1 0.175 with this init vs 0.055 from random init (0.105 vs 0.050 at 500).
    bert_width: int = 64
    bert_layers: int = 2
    bert_heads: int = 4
    bert_intermediate: int = 128
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
    # Intra-op threads while training. Models this small spend more time synchronising threads
    # than computing: measured on 2 shared cores, a CLIP step took 48 ms on 1 thread and
    # 150-900 ms on 2 (OpenMP threads spin while another process holds the other core).
    threads: int = 1

    def __post_init__(self):
        problems = [f"{name} must be >= 1 (got {getattr(self, name)})" for name in (
            "bert_vocab_size", "bert_steps", "bert_batch_size", "clip_steps", "clip_batch_size", "lm_vocab_size", "lm_steps", "lm_batch_size",
            "clip_context_length", "lm_max_length") if getattr(self, name) < 1]
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


# -- pretraining through the trainer core (model/trainer.py) -------------------------------------

class _Batches(torch.utils.data.Dataset):
    """Batch m of a toy pretraining: `steps` index batches, epochs of seeded permutations that
    batches never cross (no repeats), drawn up front; `make(indices)` builds the batch."""

    def __init__(self, n: int, batch_size: int, steps: int, seed: int, make):
        generator = torch.Generator().manual_seed(seed)
        batch_size = min(batch_size, n)
        self.per_epoch, self.make, self.batches = n // batch_size, make, []
        order, pos = torch.randperm(n, generator=generator), 0
        for _ in range(steps):
            if pos + batch_size > n:
                order, pos = torch.randperm(n, generator=generator), 0
            self.batches.append(order[pos:pos + batch_size])
            pos += batch_size

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, m: int) -> dict:
        return self.make(self.batches[m])

    def position(self, m: int) -> dict:
        return {"epoch": m // self.per_epoch, "batch_in_epoch": m % self.per_epoch}


class _Pretraining(Objective):
    """A toy piece's pretraining as an objective of the trainer core; it keeps each step's loss."""

    name = "toy"

    def __init__(self, model, data: _Batches, groups: list[dict], loss=None, after_step=None):
        self.module, self.data, self.groups = model, data, groups
        self.loss_of, self.after = loss or (lambda output: output.loss), after_step
        self.losses: list[float] = []

    def param_groups(self, weight_decay: float) -> list[dict]:
        return self.groups

    def inputs(self, batch: dict, step: int) -> dict:
        return batch

    def loss(self, output):
        loss = self.loss_of(output)
        self.losses.append(loss.item())
        return loss, {}

    def after_step(self) -> None:
        if self.after is not None:
            self.after()


def _pretrain(model, data: _Batches, groups: list[dict], lr: float, warmup: int, seed: int, grad_clip: float = 0.0,
              loss=None, after_step=None) -> list[float]:
    """Train in memory (nothing written) with AdamW (betas 0.9, 0.98) and linear warmup then
    cosine to zero (the schedule open_clip's training uses); returns each step's loss."""
    objective = _Pretraining(model, data, groups, loss, after_step)
    config = LoopConfig(steps=len(data), lr=lr, warmup_steps=warmup, betas=(0.9, 0.98), grad_clip=grad_clip,
                        seed=seed, log_every=len(data))
    fit(objective, config, torch.device("cpu"))
    return objective.losses


@contextmanager
def _threads(n: int):
    """Run with `n` torch intra-op threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_info(folder: Path, kind: str, preset: ToyPreset, metrics: dict) -> None:
    info = {"kind": kind, "preset": asdict(preset), "metrics": metrics}
    (folder / TOY_INFO).write_text(json.dumps(info, indent=1, sort_keys=True))


# -- BERT WordPiece tokenizer -------------------------------------------------------------------

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _wordpiece_vocab(corpus: list[str], size: int) -> dict[str, int]:
    """A WordPiece vocabulary, deterministically: the specials, every character alone and as a
    continuation (`##c`, so any word can be spelled), then whole words by frequency (ties by
    spelling) while `size` allows. tokenizers' WordPieceTrainer breaks ties between equally
    frequent merges in hash-map order, so two processes learned different vocabularies (and
    different toy models) from the same captions."""
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(w for text in corpus for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    tokens = list(BERT_SPECIALS) + chars + [f"##{c}" for c in chars]
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    tokens += words[:max(0, size - len(tokens))]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def train_text_tokenizer(texts: Iterable[str], folder: str | Path, preset: ToyPreset = ToyPreset()) -> str:
    """A lowercasing BERT WordPiece tokenizer trained on `texts`, saved as a BertTokenizerFast folder.

    `model.qformer.load_tokenizer(folder)` loads it and adds `[DEC]`, as for bert-base-uncased.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    corpus = [t for t in texts if t]
    if not corpus:
        raise ConfigError("train_text_tokenizer: no non-empty texts to learn a vocabulary from.")
    raw = Tokenizer(models.WordPiece(vocab=_wordpiece_vocab(corpus, preset.bert_vocab_size), unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    raw.decoder = decoders.WordPiece()
    tokenizer = BertTokenizerFast(
        tokenizer_object=raw, do_lower_case=True, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    _write_info(folder, "bert_tokenizer", preset, {"texts": len(corpus), "vocab_size": len(tokenizer)})
    return str(folder)


def pretrain_bert(texts: Sequence[str], folder: str | Path, tokenizer_folder: str | Path,
                  preset: ToyPreset = ToyPreset()) -> dict:
    """A small BertForMaskedLM trained with masked-LM on `texts` (transformers' 15% masking
    collator), saved with its tokenizer: what `capfilt train stage1 --bert FOLDER` initialises
    the Q-Former from, as BLIP-2 does from bert-base-uncased. Returns its metrics."""
    corpus = [t.strip() for t in texts if t and t.strip()]
    if not corpus:
        raise ConfigError("pretrain_bert: no non-empty texts to train on.")
    with _threads(preset.threads):
        return _pretrain_bert(corpus, Path(folder), Path(tokenizer_folder), preset)


def _pretrain_bert(corpus: list[str], folder: Path, tokenizer_folder: Path, preset: ToyPreset) -> dict:
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast, DataCollatorForLanguageModeling

    started = time.perf_counter()
    tokenizer = BertTokenizerFast.from_pretrained(str(tokenizer_folder))
    torch.manual_seed(preset.seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=preset.bert_width, num_hidden_layers=preset.bert_layers,
        num_attention_heads=preset.bert_heads, intermediate_size=preset.bert_intermediate,
        max_position_embeddings=2 * preset.bert_max_length, pad_token_id=tokenizer.pad_token_id,
    )
    model = BertForMaskedLM(config)
    ids = tokenizer(corpus, truncation=True, max_length=preset.bert_max_length)["input_ids"]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, return_tensors="pt")
    # the collator draws its masks from torch's global generator, seeded above
    data = _Batches(len(corpus), preset.bert_batch_size, preset.bert_steps, preset.seed,
                    lambda idx: dict(collator([{"input_ids": ids[i]} for i in idx.tolist()])))
    losses = _pretrain(model, data, [{"params": list(model.parameters()), "weight_decay": 0.01}], preset.bert_lr,
                       preset.bert_warmup, preset.seed, grad_clip=1.0)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    tail = losses[-max(1, len(losses) // 10):]
    metrics = {"texts": len(corpus), "steps": preset.bert_steps, "loss_first": losses[0],
               "loss_last": sum(tail) / len(tail), "parameters": sum(p.numel() for p in model.parameters()),
               "seconds": time.perf_counter() - started}
    _write_info(folder, "bert_mlm", preset, metrics)
    return metrics


# -- CLIP ---------------------------------------------------------------------------------------

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
    with _threads(preset.threads):
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

    data = _Batches(len(pairs), preset.clip_batch_size, preset.clip_steps, preset.seed,
                    lambda idx: {"image": images[idx], "text": tokens[idx]})
    # the model's output is (image features, text features, logit scale already exp())
    losses = _pretrain(model, data, groups, preset.clip_lr, preset.clip_warmup, preset.seed,
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
    _write_info(folder, "open_clip", preset, metrics)
    return ToyClip(preset.clip_name, str(config_path), str(checkpoint), str(folder), metrics)


# -- causal LM ----------------------------------------------------------------------------------

# OPT's special tokens and ids (<s>=0, <pad>=1, </s>=2, <unk>=3), and OPT's convention that the
# tokenizer prepends </s> as BOS and the same </s> ends a text: code written against BLIP-2's OPT
# works unchanged on the toy LM.
LM_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


@dataclass(frozen=True)
class ToyLM:
    folder: str
    metrics: dict = field(default_factory=dict)


def train_lm_tokenizer(texts: Sequence[str], folder: str | Path, preset: ToyPreset = ToyPreset()):
    """A byte-level BPE tokenizer (any text, no <unk>) saved so AutoTokenizer.from_pretrained loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=preset.lm_vocab_size, special_tokens=list(LM_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    raw.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=preset.lm_max_length,
    )
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def pretrain_lm(texts: Sequence[str], folder: str | Path, preset: ToyPreset = ToyPreset(),
                eval_texts: Sequence[str] | None = None) -> ToyLM:
    """Train a tiny OPT causal LM with next-token loss on raw captions; save model + tokenizer.

    Each text is `</s> text </s>` (OPT's BOS, then EOS so the LM learns where a caption ends).
    Empty texts carry no tokens and are left out of training; `metrics['texts']` counts the
    texts used. `eval_texts` get a held-out loss and next-token accuracy after training.
    """
    corpus = [t.strip() for t in texts if t and t.strip()]
    if not corpus:
        raise ConfigError("pretrain_lm: no non-empty texts to train on.")
    with _threads(preset.threads):
        return _pretrain_lm(corpus, Path(folder), preset, eval_texts)


def _pretrain_lm(corpus: list[str], folder: Path, preset: ToyPreset, eval_texts) -> ToyLM:
    from transformers import OPTConfig, OPTForCausalLM

    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_lm_tokenizer(corpus, folder, preset)
    torch.manual_seed(preset.seed)
    config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=preset.lm_width, word_embed_proj_dim=preset.lm_width,
        num_hidden_layers=preset.lm_layers, ffn_dim=4 * preset.lm_width, num_attention_heads=preset.lm_heads,
        max_position_embeddings=preset.lm_max_length + 64,  # room for Stage 2's query tokens in front
        pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0, attention_dropout=0.0,
    )
    model = OPTForCausalLM(config)

    def encode(batch_texts):
        enc = tokenizer([t + tokenizer.eos_token for t in batch_texts], padding=True, truncation=True,
                        max_length=preset.lm_max_length, return_tensors="pt")
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        return enc.input_ids, enc.attention_mask, labels

    def batch(idx) -> dict:
        texts = [corpus[i] for i in idx.tolist()]
        if preset.lm_repeat:  # every other row says its caption twice
            texts = [t + tokenizer.eos_token + t if j % 2 else t for j, t in enumerate(texts)]
        ids, mask, labels = encode(texts)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    data = _Batches(len(corpus), preset.lm_batch_size, preset.lm_steps, preset.seed, batch)
    losses = _pretrain(model, data, [{"params": list(model.parameters()), "weight_decay": 0.01}], preset.lm_lr,
                       preset.lm_warmup, preset.seed, grad_clip=1.0)
    model.eval()
    model.save_pretrained(str(folder))
    model.generation_config.save_pretrained(str(folder))
    tail = losses[-max(1, len(losses) // 10):]
    metrics = {"texts": len(corpus), "steps": preset.lm_steps, "loss_first": losses[0],
               "loss_last": sum(tail) / len(tail), "vocab_size": len(tokenizer),
               "parameters": sum(p.numel() for p in model.parameters())}
    if eval_texts:
        metrics["eval"] = lm_heldout(model, tokenizer, [t for t in eval_texts if t and t.strip()], preset.lm_max_length)
    metrics["seconds"] = time.perf_counter() - started
    _write_info(folder, "causal_lm", preset, metrics)
    return ToyLM(str(folder), metrics)


@torch.no_grad()
def lm_heldout(model, tokenizer, texts: Sequence[str], max_length: int = 48) -> dict:
    """Mean next-token loss and top-1 accuracy on `texts` (BOS excluded as a target, EOS included)."""
    enc = tokenizer([t + tokenizer.eos_token for t in texts], padding=True, truncation=True,
                    max_length=max_length, return_tensors="pt")
    logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits[:, :-1]
    targets = enc.input_ids[:, 1:]
    valid = enc.attention_mask[:, 1:].bool()
    loss = torch.nn.functional.cross_entropy(logits[valid], targets[valid]).item()
    accuracy = (logits.argmax(-1)[valid] == targets[valid]).float().mean().item()
    return {"loss": loss, "token_accuracy": accuracy, "texts": len(texts)}


# -- all three from an ingested run ---------------------------------------------------------------

TOY_DONE = "toy_pretrain.json"  # written last: its presence means the folder is complete


def run_pairs(root: str, run: str) -> tuple[list[tuple[bytes, str]], dict]:
    """(image bytes, web caption) of a run's distinct images that decode and have a caption, and counts
    of what was left out (exact duplicate bytes, empty captions, undecodable images)."""
    from PIL import Image

    from pipeline.run_store import RunStore
    from schemas import IMAGES

    store = RunStore(root, run)
    if not store.shards("images"):
        raise ConfigError(f"run '{run}' under {root} has no images/; run `capfilt ingest` for it first.")
    table = store.read("images", IMAGES).select(["sample_id", "image", "caption", "sha256"])
    pairs, seen = [], set()
    counts = {"images": table.num_rows, "duplicates": 0, "empty_caption": 0, "undecodable": 0}
    for row in table.to_pylist():
        key = row["sha256"] or row["sample_id"]
        if key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        caption = (row["caption"] or "").strip()
        if not caption:
            counts["empty_caption"] += 1
            continue
        try:
            Image.open(io.BytesIO(row["image"])).convert("RGB")
        except Exception:  # noqa: BLE001 - PIL raises many types; such rows are counted, not trained on
            counts["undecodable"] += 1
            continue
        pairs.append((row["image"], caption))
    counts["pairs"] = len(pairs)
    return pairs, counts


def pretrain_toy(root: str, run: str, out: str | Path, preset: ToyPreset = ToyPreset()) -> dict:
    """Train the toy preset's frozen pieces on a run's raw web pairs into `out`:
    `tokenizer/` (Q-Former WordPiece), `bert/` (masked-LM BERT the Q-Former starts from), `clip/`
    (open_clip local-dir) and `lm/` (causal LM).

    A folder already complete for the same run and preset is reused (a rerun of a flow resumes).
    """
    out = Path(out)
    done = out / TOY_DONE
    if done.exists():
        info = json.loads(done.read_text())
        if info.get("run") == run and info.get("preset") == asdict(preset):
            return {**info, "reused": True}
    pairs, counts = run_pairs(root, run)
    if len(pairs) < 2:
        raise ConfigError(f"run '{run}' under {root} has {len(pairs)} usable (image, caption) pairs ({counts}); "
                          f"the toy preset needs at least 2 to pretrain on.")
    return pretrain_toy_pairs(pairs, out, preset, about={"root": str(root), "run": run, "counts": counts})


def _lm_settings(preset: ToyPreset) -> dict:
    """What the LM depends on: its own fields and the seed (its tokenizer is its own)."""
    return {k: v for k, v in asdict(preset).items() if k.startswith("lm_") or k in ("seed", "threads")}


def _vision_settings(preset: ToyPreset) -> dict:
    """What the tokenizer, BERT and CLIP depend on: everything but the LM's fields."""
    return {k: v for k, v in asdict(preset).items() if not k.startswith("lm_")}


def pretrain_toy_pairs(pairs: Sequence[tuple[bytes, str]], out: str | Path, preset: ToyPreset = ToyPreset(),
                       about: dict | None = None, lm: bool = True,
                       eval_pairs: Sequence[tuple[bytes, str]] | None = None) -> dict:
    """The toy pieces from (image bytes, caption) pairs into `out`; `about` says where the pairs came
    from and is what a rerun must match (with the preset) to reuse a complete folder. A folder made
    from the same pairs with other LM settings keeps its tokenizer, BERT and CLIP (minutes of
    training) and trains the LM anew; and the other way round."""
    out = Path(out)
    about = dict(about or {})
    done = out / TOY_DONE
    before = json.loads(done.read_text()) if done.exists() else None
    same_pairs = before is not None and all(before.get(k) == v for k, v in about.items())
    if same_pairs and before.get("preset") == asdict(preset) and (before.get("lm") is not None or not lm):
        return {**before, "reused": True}
    keep_vision = same_pairs and _vision_settings(ToyPreset(**before["preset"])) == _vision_settings(preset)
    keep_lm = (same_pairs and lm and before.get("lm") is not None
               and _lm_settings(ToyPreset(**before["preset"])) == _lm_settings(preset))
    started = time.perf_counter()
    texts = [caption for _, caption in pairs]
    if keep_vision:
        bert, clip_metrics = before["bert"], before["clip"]
    else:
        train_text_tokenizer(texts, out / "tokenizer", preset)
        bert = pretrain_bert(texts, out / "bert", out / "tokenizer", preset)
        clip_metrics = pretrain_clip(pairs, out / "clip", preset, eval_pairs=eval_pairs).metrics
    if keep_lm:
        lm_metrics = before["lm"]
    else:
        lm_metrics = pretrain_lm(texts, out / "lm", preset).metrics if lm else None
    info = {**about, "preset": asdict(preset), "bert": bert, "clip": clip_metrics, "lm": lm_metrics,
            "seconds": time.perf_counter() - started,
            "kept": [piece for piece, kept in (("tokenizer+bert+clip", keep_vision), ("lm", keep_lm)) if kept]}
    out.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(info, indent=1, sort_keys=True))
    return {**info, "reused": False}


__all__ = [
    "pretrain_bert", "pretrain_toy", "pretrain_toy_pairs", "run_pairs",
    "ToyClip", "ToyLM", "ToyPreset", "clip_model_config", "clip_retrieval_top1", "lm_heldout", "pretrain_clip",
    "pretrain_lm", "train_lm_tokenizer", "train_text_tokenizer",
]
