"""Captioners: image-to-text models behind one small interface, loaded by hub id or local folder.

A `Captioner` turns a batch of decoded images into N captions each, under a `Decoding` (nucleus
sampling or beam search, lengths, repetition penalty, optional prompt) and one seed per caption.
`load_captioner(id_or_path)` reads the checkpoint's `config.json`, picks the family registered for
its `model_type` (BLIP, BLIP-2, capfilt's own Stage 2) in the one registry of model families
(model/registry.py) and loads it with `from_pretrained`, the same call for a hub id and a folder
written by `save_pretrained`.

Sampling is done by `SeededNucleusSampler`, not by transformers' global-RNG `multinomial`: every
generated row draws from its own `torch.Generator` seeded from (run seed, sample id, caption
index), so a caption depends only on its image and its seed, never on which other images share
the batch, how Ray split the data, or whether the run was resumed.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from capfilt.device import autocast, inference_dtype, pick_device
from capfilt.errors import ConfigError, first_line

from . import registry
from .decoding import Decoding


def caption_seed(seed: int, sample_id: str, index: int) -> int:
    """The seed of one synthetic caption: a stable 63-bit hash of (run seed, sample id, index)."""
    digest = hashlib.sha256(f"{seed}\x1f{sample_id}\x1f{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class SeededNucleusSampler(LogitsProcessor):
    """Nucleus sampling where generated row r draws from its own generator seeded with seeds[r].

    It returns scores that are -inf everywhere except the sampled token, so the distribution
    transformers' sampling step then draws from is one-hot: its global RNG cannot change the
    outcome. One uniform draw per row per step keeps each row's random stream independent of
    the rest of the batch (and of when other rows finish).
    """

    def __init__(self, seeds: list[int], top_p: float):
        self.top_p = top_p
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise RuntimeError(f"sampler has {len(self.generators)} seeds for {scores.shape[0]} rows")
        probs = torch.softmax(scores.float(), dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        nucleus = torch.where(mass_before < self.top_p, sorted_probs, torch.zeros_like(sorted_probs))
        cdf = nucleus.cumsum(dim=-1)
        uniforms = torch.stack([torch.rand((), generator=g) for g in self.generators]).to(cdf.device)
        targets = (uniforms * cdf[:, -1]).unsqueeze(-1)
        picked = torch.searchsorted(cdf, targets, right=True).clamp_(max=cdf.shape[-1] - 1)
        # a zero-probability slot can only be hit by rounding at the very top; step back into the nucleus
        picked = torch.minimum(picked, (nucleus > 0).sum(dim=-1, keepdim=True) - 1)
        tokens = order.gather(-1, picked)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, tokens, 0.0)


class Captioner(ABC):
    """An image-to-text model: decoded RGB images in, N captions per image out."""

    id: str

    @abstractmethod
    def prepare(self, images: list[Image.Image], prompt: str) -> dict[str, torch.Tensor]:
        """Preprocess a batch once (resize, normalise, tokenize the prompt) onto the model's device."""

    @abstractmethod
    def generate(self, inputs: dict[str, torch.Tensor], decoding: Decoding, seeds: list[list[int]]) -> list[list[str]]:
        """Captions for a prepared batch: seeds[i][j] seeds caption j of image i."""

    def caption(self, images: list[Image.Image], decoding: Decoding, seeds: list[list[int]]) -> list[list[str]]:
        if not images:
            return []
        return self.generate(self.prepare(images, decoding.prompt), decoding, seeds)


class HFCaptioner(Captioner):
    """A transformers image-to-text model with its processor (BLIP, BLIP-2, ...)."""

    model_class: type

    def __init__(self, id_or_path: str, device: str = "auto"):
        from transformers import AutoProcessor

        self.id = id_or_path
        self.device = pick_device(device)
        self.dtype = inference_dtype(self.device)
        try:
            self.processor = AutoProcessor.from_pretrained(id_or_path)
            self.model = self.model_class.from_pretrained(id_or_path, dtype=self.dtype)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"--captioner {id_or_path!r}: could not load the {self.model_class.__name__} and its "
                f"processor ({first_line(exc)}). Use a folder written by save_pretrained (model + "
                f"processor) or a hub id."
            ) from exc
        self.model.to(self.device).eval()

    def prepare(self, images, prompt):
        inputs = self.processor(images=images, text=[prompt] * len(images), return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    @abstractmethod
    def prompt_tokens_in_output(self, input_ids: torch.Tensor) -> int:
        """How many leading positions of `generate`'s output repeat the (image +) prompt tokens."""

    @torch.inference_mode()
    def generate(self, inputs, decoding, seeds):
        batch = inputs["pixel_values"].shape[0]
        n = decoding.num_captions
        if len(seeds) != batch or any(len(s) != n for s in seeds):
            raise ValueError(f"need {n} seeds for each of {batch} images")
        kwargs = dict(
            max_new_tokens=decoding.max_length,
            min_new_tokens=decoding.min_length,
            repetition_penalty=decoding.repetition_penalty,
            num_return_sequences=n,
            do_sample=False,
            num_beams=decoding.num_beams,
        )
        if decoding.sampling:
            # generate() needs do_sample for N sequences per input; the real draw happens in
            # SeededNucleusSampler, so transformers' own warpers are switched off (a one-hot
            # distribution passes them unchanged anyway)
            kwargs.update(do_sample=True, top_p=1.0, top_k=0, temperature=1.0)
            # generate() repeats each image n times in a row: row i*n + j is caption j of image i
            row_seeds = [s for per_image in seeds for s in per_image]
            kwargs["logits_processor"] = LogitsProcessorList([SeededNucleusSampler(row_seeds, decoding.top_p)])
        with autocast(self.device):
            output = self.model.generate(**inputs, **kwargs)
        skip = self.prompt_tokens_in_output(inputs["input_ids"])
        texts = self.processor.batch_decode(output[:, skip:], skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        return [texts[i * n : (i + 1) * n] for i in range(batch)]


class BlipCaptioner(HFCaptioner):
    """BLIP (`BlipForConditionalGeneration`), e.g. Salesforce/blip-image-captioning-large."""

    @property
    def model_class(self):
        from transformers import BlipForConditionalGeneration

        return BlipForConditionalGeneration

    def prompt_tokens_in_output(self, input_ids):
        # BLIP's generate drops the tokenizer's trailing [SEP] and swaps [CLS] for its BOS
        return input_ids.shape[1] - 1


class Blip2Captioner(HFCaptioner):
    """BLIP-2 (`Blip2ForConditionalGeneration`) with a decoder-only (OPT) or encoder-decoder (T5) LLM."""

    @property
    def model_class(self):
        from transformers import Blip2ForConditionalGeneration

        return Blip2ForConditionalGeneration

    def prompt_tokens_in_output(self, input_ids):
        # a decoder-only LLM returns the image tokens + prompt before the caption; T5 only the caption
        return input_ids.shape[1] if self.model.config.use_decoder_only_language_model else 0


def captioner_model_type(id_or_path: str) -> str:
    """The `model_type` of a captioner checkpoint (folder or hub id), read without loading any weights."""
    return registry.model_type("captioner", id_or_path)


def load_captioner(id_or_path: str, device: str = "auto") -> Captioner:
    """Load a captioner by hub id or local folder, onto the GPU when there is one."""
    return registry.load("captioner", captioner_model_type(id_or_path), id_or_path, device)


def save_random_captioner(
    folder: str,
    family: str = "blip",
    width: int = 32,
    layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    num_query_tokens: int = 4,
) -> str:
    """Write a randomly initialised BLIP or BLIP-2 captioner (model + processor) to `folder`.

    For tests, benchmarks and demos without a model hub: the tokenizer is trained on the
    synthetic world's captions (WordPiece for BLIP's BERT decoder, byte-level BPE for BLIP-2's
    OPT), and the folder loads through `load_captioner(folder)` like a downloaded checkpoint.
    """
    import itertools

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BlipImageProcessor

    from model.toy.scenes import ATTRIBUTE_VALUES, true_caption

    corpus = [true_caption(dict(zip(ATTRIBUTE_VALUES, v))) for v in itertools.product(*ATTRIBUTE_VALUES.values())]
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    vision = dict(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, initializer_range=0.02,
    )
    if family == "blip":
        from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipProcessor

        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
        raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        raw.normalizer = normalizers.BertNormalizer(lowercase=True)
        raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        raw.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
        raw.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        raw.decoder = decoders.WordPiece()
        tokenizer = BertTokenizerFast(
            tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]",
        )
        processor = BlipProcessor(image_processor, tokenizer)
        config = BlipConfig(
            vision_config=vision,
            text_config=dict(
                vocab_size=len(tokenizer), hidden_size=width, encoder_hidden_size=width,
                intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2,
                projection_dim=width, max_position_embeddings=128, bos_token_id=5, eos_token_id=3,
                sep_token_id=3, pad_token_id=0,
            ),
            projection_dim=width,
            image_text_hidden_size=width,
        )
        model = BlipForConditionalGeneration(config)
    elif family == "blip-2":
        from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, GPT2TokenizerFast

        raw = Tokenizer(models.BPE())
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.train_from_iterator(
            corpus,
            trainers.BpeTrainer(
                vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>", "<image>"],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            ),
        )
        raw.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 1)])
        raw.decoder = decoders.ByteLevel()
        tokenizer = GPT2TokenizerFast(
            tokenizer_object=raw, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
        )
        tokenizer.image_token = "<image>"
        processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)
        config = Blip2Config(
            vision_config=vision,
            qformer_config=dict(
                vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=layers, num_attention_heads=2,
                intermediate_size=2 * width, encoder_hidden_size=width, cross_attention_frequency=1,
                max_position_embeddings=128,
            ),
            text_config=dict(
                model_type="opt", vocab_size=len(tokenizer), hidden_size=width, word_embed_proj_dim=width,
                num_hidden_layers=layers, ffn_dim=2 * width, num_attention_heads=2,
                max_position_embeddings=128 + num_query_tokens, bos_token_id=1, eos_token_id=1, pad_token_id=0,
            ),
            num_query_tokens=num_query_tokens,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        )
        model = Blip2ForConditionalGeneration(config)
    else:
        raise ConfigError(f"unknown captioner family {family!r}: use 'blip' or 'blip-2'.")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)
