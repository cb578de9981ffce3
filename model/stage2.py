"""BLIP-2 Stage 2: the Stage 1 Q-Former speaks to a frozen LLM through a soft visual prompt.

Read top to bottom:
  frozen image tokens ─► Q-Former (Stage 1 weights) ─► query outputs (B, Q, H)
  ─► language_projection (Linear H -> LLM width) ─► soft prompt, put before the text embeddings
  ─► frozen LLM: decoder-only (OPT, any AutoModelForCausalLM) with the LM loss, or
     encoder-decoder (Flan-T5 / T5, AutoModelForSeq2SeqLM) with the prefix-LM loss.
Only the Q-Former and the projection train; the LLM has no gradients and sits in bf16/fp16 on
GPU (fp32 on CPU).

How text is laid out (one rule for training and generation, `TextLayout`):
  decoder-only   LLM input  = [soft prompt ; tokenizer(prompt) ; caption tokens ; eos]
                 labels     = -100 on soft prompt, prompt and padding; caption tokens and eos.
                 (`caption_end` "newline": "\n" takes eos's place, LAVIS's and Salesforce's OPT.)
                 tokenizer(prompt) keeps the tokenizer's own specials (OPT's BOS `</s>`), which
                 is what `Blip2Processor` produces, so exported models generate the same tokens.
  encoder-dec.   the caption's words are split at a seeded random word index k in
                 [0, number of words - 1] (a pure function of (seed, epoch, image)):
                 encoder input = [soft prompt ; tokenizer(prompt + words[:k])]   (T5 adds `</s>`)
                 decoder target = tokenizer(words[k:]) + eos; padding -100.
                 k = 0 is plain captioning from the prompt, which is how generation runs.
                 (The paper's prefix LM; LAVIS never shipped a Stage 2 T5 pretraining script.)
  eos is appended explicitly: some tokenizers (OPT, GPT-2) never add it themselves.

Instruction-aware Q-Former (InstructBLIP, `instruction_aware=True`): the prompt / question,
tokenized with the Q-Former's BERT tokenizer, joins the queries in the Q-Former's self-attention
with the bidirectional mask (queries and instruction see each other); only the query outputs go
on to the LLM.

A Stage 2 checkpoint's model folder is `save_pretrained`-style: config.json (model_type
"capfilt-blip2-stage2", Q-Former config, LLM id/folder, vision spec), model.safetensors (the
trained Q-Former and projection only; the frozen LLM is referenced, not copied), and the two
tokenizers. `load_captioner(folder)` loads it as a Caption-stage captioner; `export_blip2`
writes a transformers `Blip2ForConditionalGeneration` folder when the vision encoder is a
Blip2VisionModel.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from capfilt.device import autocast, inference_dtype, pick_device
from capfilt.errors import ConfigError

from .captioners import Captioner, Decoding, SeededNucleusSampler
from .data import (
    Stage1Batches,
    feature_cache,
    hash_seed,
    image_features,
    pil_pixels,
    training_images,
)
from .losses import world
from .qformer import QFormer, QFormerConfig, bidirectional_mask, load_tokenizer
from .recipes import STAGE2 as STAGE2_RECIPES
from .recipes import resolve as resolve_recipe
from .trainer import Objective, fit, resolve_latest, run_on_ray_train, worker_device
from .vision import FrozenImageEncoder, TransformersEncoder, load_vision_encoder

MODEL_TYPE = "capfilt-blip2-stage2"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LLM_TOKENIZER_DIR = "llm_tokenizer"
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
VQA_PROMPT = "Question: {} Answer:"  # LAVIS's OPT/T5 VQA prompt


# -- the frozen LLM -----------------------------------------------------------------------------

def load_llm(spec: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer, kind) for a hub id or folder; kind is 'causal' or 'seq2seq'. Frozen, eval."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    device = torch.device(device)
    try:
        config = AutoConfig.from_pretrained(spec)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--llm {spec}: cannot load a transformers config and tokenizer there ({_first_line(exc)}). Give a "
            f"hub id such as facebook/opt-2.7b or a folder written by save_pretrained (model + tokenizer)."
        ) from exc
    kind = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
    cls = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(spec, dtype=dtype or inference_dtype(device))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--llm {spec}: not loadable as {cls.__name__} ({_first_line(exc)}).") from exc
    return freeze(model.to(device)), prepare_llm_tokenizer(tokenizer, spec), kind


def prepare_llm_tokenizer(tokenizer, where: str):
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"--llm {where}: its tokenizer has no eos token; captions need one to end. Set eos_token.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked by the attention mask, never by id
    return tokenizer


def freeze(model: nn.Module) -> nn.Module:
    # Deviation from LAVIS (which only sets requires_grad=False and so keeps OPT's dropout on):
    # the frozen LLM runs in eval mode like the frozen image encoder, so the soft prompt is
    # trained against the same function it is used with at generation time. `--llm-train-mode`
    # (recipe lavis) puts it in train mode while training (Blip2Stage2.llm_train_mode).
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# -- text layout ---------------------------------------------------------------------------------

def split_point(seed: int, epoch: int, index: int, caption: str) -> int:
    """Prefix-LM split: a word index in [0, words - 1], a pure function of (seed, epoch, image)."""
    words = len(caption.split())
    return int(np.random.default_rng([seed, epoch, index, 2]).integers(0, max(1, words)))


def caption_end_id(tokenizer, kind: str, caption_end: str) -> int:
    """The token that ends a caption in training and stops generation.

    "newline" is LAVIS's OPT convention (caption + "\n", generation stops at "\n"), which
    Salesforce's OPT checkpoints and transformers' conversion of them (text eos = "\n") carry;
    an encoder-decoder LLM (T5) always ends with its eos, as LAVIS's blip2_t5 does.
    """
    if caption_end == "eos" or kind != "causal":
        return tokenizer.eos_token_id
    ids = tokenizer("\n", add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ConfigError(f"--caption-end newline: this LLM's tokenizer writes '\\n' as {len(ids)} tokens, not one; "
                          f"use --caption-end eos.")
    return ids[0]


class TextLayout:
    """Token ids of prompts and captions for one LLM tokenizer (see the module docstring)."""

    def __init__(self, tokenizer, kind: str, max_text_length: int, caption_end: str = "eos"):
        self.tokenizer, self.kind, self.max_text_length = tokenizer, kind, max_text_length
        self.eos, self.pad = caption_end_id(tokenizer, kind, caption_end), tokenizer.pad_token_id
        self.memo: dict[str, list[int]] | None = None  # see _words_batch

    def prompt_ids(self, prompt: str) -> list[int]:
        """What comes right after the soft prompt: the prompt with the tokenizer's specials."""
        return self.tokenizer(prompt, truncation=True, max_length=self.max_text_length).input_ids

    def _words(self, prompt: str, text: str) -> list[int]:
        sep = " " if prompt and text and not prompt.endswith(" ") else ""
        ids = self.tokenizer(sep + text, add_special_tokens=False).input_ids if text else []
        return ids[: self.max_text_length - 1] + [self.eos]

    def example(self, prompt: str, caption: str, split: int = 0) -> dict[str, list[int]]:
        """One training example: `input_ids` after the soft prompt and `labels` (-100 = no loss)."""
        if self.kind == "causal":
            prompt_ids = self.prompt_ids(prompt)
            target = self._words(prompt, caption)
            return {"input_ids": prompt_ids + target, "labels": [-100] * len(prompt_ids) + target}
        words = caption.split()
        prefix = " ".join(words[:split])
        encoder_text = (prompt + (" " if prompt and prefix and not prompt.endswith(" ") else "") + prefix)
        return {"input_ids": self.prompt_ids(encoder_text), "labels": self._words("", " ".join(words[split:]))}

    def batch(self, prompt: str, captions: list[str], splits: list[int] | None = None) -> dict[str, torch.Tensor]:
        """`collate` of `example(prompt, caption, split)` for every caption, with one tokenizer call
        per kind of text instead of one per caption and the padding done in one array operation."""
        if self.kind == "causal":
            prompt_ids = self.prompt_ids(prompt)
            sep = " " if prompt and not prompt.endswith(" ") else ""
            targets = self._words_batch([(sep if c else "") + c for c in captions])
            inputs = [prompt_ids + t for t in targets]
            labels = [[-100] * len(prompt_ids) + t for t in targets]
        else:
            heads, tails = [], []
            for caption, split in zip(captions, splits):
                words = caption.split()
                prefix = " ".join(words[:split])
                heads.append(prompt + (" " if prompt and prefix and not prompt.endswith(" ") else "") + prefix)
                tails.append(" ".join(words[split:]))
            inputs = self.tokenizer(heads, truncation=True, max_length=self.max_text_length).input_ids
            labels = self._words_batch(tails)
        input_ids, attention_mask = _pad(inputs, self.pad)
        return {"input_ids": input_ids, "labels": _pad(labels, -100)[0], "attention_mask": attention_mask}

    def _words_batch(self, texts: list[str]) -> list[list[int]]:
        """`_words("", text)` of many texts (callers put the separator in the text); remembered
        per text when `self.memo` is a dict (the trainer's, with cached features)."""
        memo = self.memo if self.memo is not None else {}
        missing = [t for t in dict.fromkeys(texts) if t and t not in memo]
        if missing:
            memo.update(zip(missing, self.tokenizer(missing, add_special_tokens=False).input_ids))
        return [(memo[t] if t else [])[: self.max_text_length - 1] + [self.eos] for t in texts]

    def collate(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Right-padded tensors; labels are -100 on padding."""
        out = {}
        for key, fill in (("input_ids", self.pad), ("labels", -100)):
            width = max(len(e[key]) for e in examples)
            out[key] = torch.tensor([e[key] + [fill] * (width - len(e[key])) for e in examples])
            if key == "input_ids":
                out["attention_mask"] = torch.tensor([[1] * len(e[key]) + [0] * (width - len(e[key])) for e in examples])
        return out


def _pad(rows: list[list[int]], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ragged rows into one (B, longest) tensor; also the mask of real entries."""
    lengths = np.array([len(r) for r in rows])
    mask = np.arange(lengths.max()) < lengths[:, None]
    out = np.full(mask.shape, fill, dtype=np.int64)
    out[mask] = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(out), torch.from_numpy(mask.astype(np.int64))


# -- the model -----------------------------------------------------------------------------------

@dataclass
class Stage2ModelConfig:
    """What config.json of a Stage 2 model folder holds."""

    qformer: dict
    llm: str  # hub id or folder of the frozen LLM (absolute path when local)
    llm_kind: str  # causal | seq2seq
    llm_hidden_size: int
    vision: str | None = None  # the frozen encoder's spec (model/vision.py)
    instruction_aware: bool = False
    max_text_length: int = 32  # LLM tokens of a caption / prompt
    max_instruction_length: int = 32  # BERT tokens of an instruction (instruction-aware only)
    prompt: str = ""  # the prompt it was trained with: the default at generation
    caption_end: str = "eos"  # eos | newline: what ends a caption (decoder-only LLMs; see caption_end_id)
    model_type: str = MODEL_TYPE

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)


class Blip2Stage2(nn.Module):
    """Q-Former + language projection (trainable) in front of a frozen LLM."""

    def __init__(self, qformer: QFormer, llm: nn.Module, llm_tokenizer, config: Stage2ModelConfig, qformer_tokenizer=None):
        super().__init__()
        if config.instruction_aware and qformer_tokenizer is None:
            raise ConfigError("an instruction-aware Q-Former needs its BERT tokenizer (the Stage 1 model folder's).")
        self.config = config
        self.qformer = qformer
        self.language_projection = nn.Linear(qformer.config.hidden_size, config.llm_hidden_size)
        self.language_model = llm
        self.tokenizer = llm_tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        self.layout = TextLayout(llm_tokenizer, config.llm_kind, config.max_text_length, config.caption_end)
        self.set_trainable()

    def set_trainable(self) -> None:
        """Gradients only where Stage 2 uses them (DDP needs every trainable parameter used).

        Used: queries, ln_vision, the Q-Former's self/cross-attention and query feed-forward;
        with instructions also the word/position embeddings and the text feed-forward of every
        layer but the last (the last one's text outputs are dropped). Stage 1's heads (ITC
        projections, ITM, LM head, temperature) stay as they were.
        """
        last = self.qformer.config.num_hidden_layers - 1
        for name, p in self.qformer.named_parameters():
            used = name == "query_tokens" or name.startswith(("ln_vision.", "qformer.layernorm."))
            parts = name.split(".")
            if name.startswith("qformer.encoder.layer."):
                block = parts[4]
                used = block in ("attention", "crossattention", "intermediate_query", "output_query")
                if self.config.instruction_aware and block in ("intermediate", "output"):
                    used = int(parts[3]) < last
            if self.config.instruction_aware and name.startswith("embeddings."):
                used = True
            p.requires_grad_(used)

    llm_train_mode = False  # the frozen LLM follows train() (dropout on, LAVIS) or stays in eval (see `freeze`)

    def train(self, mode: bool = True) -> "Blip2Stage2":
        super().train(mode)
        self.language_model.train(mode and self.llm_train_mode)
        return self

    @property
    def device(self) -> torch.device:
        return self.language_projection.weight.device

    # -- soft prompt ---------------------------------------------------------------------------
    def instruction_tokens(self, instructions: list[str]):
        enc = self.qformer_tokenizer(list(instructions), padding="longest", truncation=True,
                                     max_length=self.config.max_instruction_length, return_tensors="pt")
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def soft_prompt(self, image_features: torch.Tensor, instructions: list[str] | None = None) -> torch.Tensor:
        """(B, Q, LLM width) from the frozen encoder's image tokens."""
        q = self.qformer
        tokens = q.prepare_image(image_features)
        queries = q.query_tokens.expand(tokens.shape[0], -1, -1)
        if not self.config.instruction_aware:
            # Called exactly as Blip2ForConditionalGeneration calls it, so exports match.
            hidden = q.qformer(query_embeds=queries, encoder_hidden_states=tokens).last_hidden_state
        else:
            if instructions is None:
                instructions = [self.config.prompt] * tokens.shape[0]
            ids, mask = self.instruction_tokens(instructions)
            embeds = q.embeddings(input_ids=ids, query_embeds=queries)
            n = queries.shape[1]
            hidden = q._encode(embeds, bidirectional_mask(n, mask), n, tokens)[:, :n, :]
        return self.language_projection(hidden)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(ids.to(self.device))

    # -- loss ----------------------------------------------------------------------------------
    def loss(self, image_features, input_ids, attention_mask, labels, instructions=None) -> torch.Tensor:
        """LM loss (decoder-only) or prefix-LM loss (encoder-decoder), mean over target tokens."""
        dtype = self.language_model.dtype
        prompt = self.soft_prompt(image_features, instructions)
        batch, n = prompt.shape[:2]
        ones = torch.ones(batch, n, dtype=attention_mask.dtype, device=self.device)
        embeds = torch.cat([prompt.to(dtype), self._embed(input_ids)], dim=1)
        mask = torch.cat([ones, attention_mask.to(self.device)], dim=1)
        if self.config.llm_kind == "causal":
            ignore = torch.full((batch, n), -100, dtype=labels.dtype, device=self.device)
            out = self.language_model(inputs_embeds=embeds, attention_mask=mask,
                                      labels=torch.cat([ignore, labels.to(self.device)], dim=1))
        else:
            out = self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels.to(self.device))
        return out.loss

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate_ids(self, image_features, prompts: list[str], *, num_beams=5, max_new_tokens=30, min_new_tokens=1,
                     num_return_sequences=1, repetition_penalty=1.0, top_p=None, seeds=None,
                     instructions: list[str] | None = None, length_penalty: float = 1.0) -> list[list[int]]:
        """New token ids (eos and padding removed), `num_return_sequences` rows per image in a row.

        Sampling (top_p set) draws with `SeededNucleusSampler`: row r uses seeds[r] only.
        """
        batch = image_features.shape[0]
        if instructions is None and self.config.instruction_aware:
            instructions = prompts
        prompt = self.soft_prompt(image_features, instructions).to(self.language_model.dtype)
        n = prompt.shape[1]
        ids = [self.layout.prompt_ids(p) for p in prompts]
        width = max(len(i) for i in ids)
        rows, masks, placeholders = [], [], []
        pad = self.layout.pad
        for b, row in enumerate(ids):
            fill = width - len(row)
            emb = self._embed(torch.tensor(row + [pad] * fill, dtype=torch.long))
            emb, padding = emb[:len(row)], emb[len(row):]
            if self.config.llm_kind == "causal":
                # left padding: generation continues right after the prompt
                rows.append(torch.cat([padding, prompt[b], emb]))
                masks.append([0] * fill + [1] * (n + len(row)))
                placeholders.append([pad] * (fill + n) + row)
            else:
                rows.append(torch.cat([prompt[b], emb, padding]))
                masks.append([1] * (n + len(row)) + [0] * fill)
        kwargs = dict(
            inputs_embeds=torch.stack(rows), attention_mask=torch.tensor(masks, device=self.device),
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
            num_return_sequences=num_return_sequences, repetition_penalty=repetition_penalty,
            eos_token_id=self.layout.eos, pad_token_id=pad, do_sample=False,
        )
        if length_penalty != 1.0 and num_beams > 1:
            kwargs["length_penalty"] = length_penalty  # beam scores / length**penalty (LAVIS's VQA: -1 for T5)
        if self.config.llm_kind == "causal":
            # Passed as Blip2ForConditionalGeneration passes them (placeholders where the queries
            # sit), so a repetition penalty sees the prompt in both; the output repeats them.
            kwargs["input_ids"] = torch.tensor(placeholders, device=self.device)
        if top_p is not None:
            from transformers import LogitsProcessorList

            if seeds is None or len(seeds) != batch * num_return_sequences:
                raise ValueError(f"sampling needs one seed per generated row ({batch * num_return_sequences})")
            kwargs.update(do_sample=True, top_p=1.0, top_k=0, temperature=1.0, num_beams=1,
                          logits_processor=LogitsProcessorList([SeededNucleusSampler(list(seeds), top_p)]))
        out = self.language_model.generate(**kwargs)
        if self.config.llm_kind == "causal":
            out = out[:, len(placeholders[0]):]
        return [_strip(row.tolist(), self.layout.eos, pad) for row in out]

    def decode(self, ids: list[list[int]]) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # -- persistence ---------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The Q-Former and projection weights (the LLM is frozen and referenced by config.llm)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("language_model.")}

    def save_pretrained(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.trainable_state_dict()
        state.pop("qformer.lm_head.decoder.weight", None)  # tied to the word embeddings
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / WEIGHTS_NAME))
        (folder / CONFIG_NAME).write_text(self.config.to_json())
        self.tokenizer.save_pretrained(str(folder / LLM_TOKENIZER_DIR))
        if self.qformer_tokenizer is not None:
            self.qformer_tokenizer.save_pretrained(str(folder / QFORMER_TOKENIZER_DIR))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu", llm: str | None = None) -> "Blip2Stage2":
        """Load a model folder written by `save_pretrained`; `llm` overrides where the LLM lives."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config = read_model_config(folder)
        if llm is not None:
            config.llm = llm
        device = torch.device(device)
        language_model, _, kind = load_llm(config.llm, device)
        if kind != config.llm_kind:
            raise ConfigError(f"{folder}: trained with a {config.llm_kind} LLM, but {config.llm} is {kind}.")
        from transformers import AutoTokenizer

        tokenizer = prepare_llm_tokenizer(AutoTokenizer.from_pretrained(str(folder / LLM_TOKENIZER_DIR)), config.llm)
        qtok = load_tokenizer(folder / QFORMER_TOKENIZER_DIR) if (folder / QFORMER_TOKENIZER_DIR).exists() else None
        model = cls(QFormer(QFormerConfig(**config.qformer)), language_model, tokenizer, config, qtok)
        state = load_file(str(folder / WEIGHTS_NAME))
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("language_model.") and k != "qformer.lm_head.decoder.weight"]
        if missing or result.unexpected_keys:
            raise ConfigError(f"{folder}: weights do not fit the config (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}).")
        return model.to(device)

    # -- transformers Blip2ForConditionalGeneration --------------------------------------------
    @classmethod
    def from_blip2(cls, id_or_path: str, device: str | torch.device = "cpu") -> tuple["Blip2Stage2", FrozenImageEncoder]:
        """(model, frozen encoder) from a Blip2ForConditionalGeneration checkpoint, e.g.
        Salesforce/blip2-opt-2.7b or Salesforce/blip2-flan-t5-xl (hub id or folder).

        Mapping: vision_model (minus post_layernorm) -> frozen Blip2VisionModel encoder,
        vision_model.post_layernorm -> qformer.ln_vision, query_tokens / qformer.* -> the Q-Former
        (same names), language_projection -> language_projection, language_model -> the LLM.
        """
        from transformers import AutoProcessor, Blip2ForConditionalGeneration

        device = torch.device(device)
        dtype = inference_dtype(device)
        try:
            hf = Blip2ForConditionalGeneration.from_pretrained(id_or_path, dtype=dtype)
            processor = AutoProcessor.from_pretrained(id_or_path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{id_or_path}: not a Blip2ForConditionalGeneration checkpoint with processor ({_first_line(exc)}).") from exc
        qc, vc, tc = hf.config.qformer_config, hf.config.vision_config, hf.config.text_config
        qconfig = QFormerConfig(
            vocab_size=qc.vocab_size, hidden_size=qc.hidden_size, num_hidden_layers=qc.num_hidden_layers,
            num_attention_heads=qc.num_attention_heads, intermediate_size=qc.intermediate_size,
            cross_attention_frequency=qc.cross_attention_frequency, max_position_embeddings=qc.max_position_embeddings,
            hidden_dropout_prob=qc.hidden_dropout_prob, attention_probs_dropout_prob=qc.attention_probs_dropout_prob,
            layer_norm_eps=qc.layer_norm_eps, num_query_tokens=hf.config.num_query_tokens,
            vision_width=vc.hidden_size, vision_layer_norm_eps=vc.layer_norm_eps, pad_token_id=qc.pad_token_id or 0,
        )
        qformer = QFormer(qconfig)
        state = {k: v for k, v in hf.state_dict().items()}
        mapped = {"query_tokens": state["query_tokens"]}
        for key, value in state.items():
            if key.startswith("qformer."):
                mapped[key] = value
            elif key.startswith("vision_model.post_layernorm."):
                mapped["ln_vision." + key.rsplit(".", 1)[1]] = value
        result = qformer.load_state_dict(mapped, strict=False)
        if result.unexpected_keys:
            raise ConfigError(f"{id_or_path}: Q-Former weights without a place: {result.unexpected_keys[:3]}.")
        kind = "causal" if hf.config.use_decoder_only_language_model else "seq2seq"
        tokenizer = prepare_llm_tokenizer(processor.tokenizer, str(id_or_path))
        config = Stage2ModelConfig(qformer=asdict(qconfig), llm=str(id_or_path), llm_kind=kind,
                                   llm_hidden_size=tc.hidden_size if kind == "causal" else tc.d_model,
                                   vision=str(id_or_path), caption_end=_checkpoint_caption_end(hf, tokenizer, kind, id_or_path))
        model = cls(qformer, freeze(hf.language_model), tokenizer, config)
        model.language_projection.load_state_dict(hf.language_projection.state_dict())
        # Blip2VisionModel's hidden_states[-1] is before post_layernorm (now ln_vision), as capfilt's
        # blip-2 encoders are read (model/vision.py).
        size = vc.image_size
        mean = tuple(getattr(processor.image_processor, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
        std = tuple(getattr(processor.image_processor, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
        from .vision import Preprocess

        encoder = TransformersEncoder(str(id_or_path), hf.vision_model, Preprocess(int(size), mean, std), -1).freeze()
        return model.to(device).float_trainable(), encoder.to(device)

    def float_trainable(self) -> "Blip2Stage2":
        self.qformer.float()
        self.language_projection.float()
        return self


def _checkpoint_caption_end(hf, tokenizer, kind: str, where) -> str:
    """Where a transformers BLIP-2 checkpoint's own `generate` stops: its language model's eos.

    Salesforce's OPT checkpoints end captions with "\n" (LAVIS trains caption + "\n"), and
    transformers' conversion sets the OPT text config's eos to "\n"; the tokenizer's eos stays
    `</s>`. Reading the generation config keeps that convention instead of the tokenizer's.
    """
    eos = hf.language_model.generation_config.eos_token_id
    if eos is None:
        eos = hf.config.text_config.eos_token_id
    ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    if kind != "causal" or ids == {tokenizer.eos_token_id} or None in ids:
        return "eos"
    try:
        newline = caption_end_id(tokenizer, kind, "newline")
    except ConfigError:
        newline = None
    if newline in ids:
        return "newline"
    raise ConfigError(f"{where}: its language model stops at token(s) {sorted(ids)}, neither the tokenizer's eos "
                      f"({tokenizer.eos_token_id}) nor '\\n'; capfilt cannot end its captions the same way.")


def _strip(ids: list[int], eos: int, pad: int) -> list[int]:
    """Tokens up to (not including) the first eos; padding dropped."""
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return [i for i in ids if i != pad]


def read_model_config(folder: Path) -> Stage2ModelConfig:
    path = folder / CONFIG_NAME
    if not path.exists():
        raise ConfigError(f"{folder}: no {CONFIG_NAME}; point at a Stage 2 checkpoint (trainer --out, step-*, or its model/).")
    data = json.loads(path.read_text())
    if data.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"{path}: model_type {data.get('model_type')!r} is not {MODEL_TYPE!r}.")
    if "checkpoint_of" in data:  # a marker in a trainer/step folder, not a model folder
        raise ConfigError(f"{folder}: a Stage 2 trainer folder; resolve it with resolve_checkpoint().")
    return Stage2ModelConfig(**data)


def resolve_checkpoint(folder: str | Path) -> tuple[Path, Path]:
    """(step folder or None-equivalent, model folder) for a trainer --out, a step-* or a model folder."""
    folder = resolve_latest(folder)
    model_dir = folder / "model" if (folder / "model" / CONFIG_NAME).exists() else folder
    if not (model_dir / WEIGHTS_NAME).exists():
        raise ConfigError(f"{folder}: no Stage 2 model here (expected {WEIGHTS_NAME} in it or in model/); "
                          f"pass a `capfilt train stage2 --out` folder, a step-* folder or its model/.")
    return folder, model_dir


def stage1_info(stage1: str | Path) -> tuple[Path, Path, dict]:
    """(step folder, model folder, stage1.json) of a Stage 1 checkpoint (trainer --out, step-* or model/)."""
    folder = resolve_latest(stage1)
    model_dir = folder / "model" if (folder / "model").is_dir() else folder
    info_path = folder / "stage1.json"
    if not (model_dir / "qformer_config.json").exists():
        raise ConfigError(f"--stage1 {stage1}: no Stage 1 Q-Former there (model/qformer_config.json); "
                          f"pass a `capfilt train stage1 --out` folder or one of its step-* folders.")
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return folder, model_dir, info


# -- training config -----------------------------------------------------------------------------

@dataclass
class Stage2Config:
    """Everything a Stage 2 run needs. The rows where the paper and LAVIS differ (model/recipes.py)
    are None by default and take `recipe`'s value; set one to override that row only."""

    root: str
    run: str
    stage1: str  # Stage 1 checkpoint: trainer --out, step-* or model folder
    llm: str  # hub id or folder: AutoModelForCausalLM or AutoModelForSeq2SeqLM + AutoTokenizer
    out: str
    vision: str | None = None  # default: the Stage 1 checkpoint's stage1.json "vision"
    prompt: str = ""  # LAVIS pretrains with no prompt; caption fine-tuning uses "a photo of"
    init_from: str | None = None  # a Stage 2 checkpoint whose Q-Former + projection to start from (finetuning)
    instruction_aware: bool = False
    steps: int = 10_000
    batch_size: int = 32
    grad_accumulation: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    recipe: str = "paper"  # paper | lavis: the defaults of the rows below
    min_lr: float | None = None
    warmup_steps: int | None = None
    warmup_lr: float | None = None
    lr_schedule: str | None = None  # cosine-step | cosine-epoch
    betas: tuple[float, float] | None = None
    grad_clip: float | None = None  # 0 = no clipping
    text_processing: str | None = None  # tokenizer | pre_caption
    llm_train_mode: bool | None = None  # the frozen LLM's dropout on (LAVIS) or off
    caption_end: str | None = None  # eos | newline (decoder-only LLMs; T5 always ends with eos)
    precision: str = "bf16"
    activation_checkpointing: bool = False
    augment: bool = True
    crop_min: float = 0.5
    flip: bool = True
    cache_features: bool = False
    max_text_length: int = 32
    holdout_images: int = 0
    seed: int = 0
    device: str = "auto"
    num_data_workers: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    resume: bool = True
    stop_at: int | None = None
    progress: bool = True

    def __post_init__(self):
        resolve_recipe(self, STAGE2_RECIPES)
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"--precision must be bf16, fp16 or fp32, got {self.precision!r}.")
        if self.cache_features and self.augment:
            raise ConfigError("--cache-features needs --no-augment: cached features are only valid when an "
                              "image's pixels are the same every epoch.")
        for name in ("steps", "batch_size", "grad_accumulation", "log_every", "checkpoint_every", "max_text_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if not 0 < self.crop_min <= 1:
            raise ConfigError(f"--crop-min must be in (0, 1], got {self.crop_min}.")
        if not 0 < self.min_lr <= self.lr:
            raise ConfigError(f"--min-lr must be in (0, --lr={self.lr}], got {self.min_lr}.")


class Stage2Batches(Stage1Batches):
    """Stage 1's data order, captions, crops and flips (pure functions of (seed, micro-batch)),
    with the captions laid out for the LLM; the prefix-LM split is seeded the same way."""

    def __init__(self, images, layout: TextLayout, preprocess, config: Stage2Config, rank=0, world_size=1):
        super().__init__(images, None, preprocess, config, rank, world_size)
        self.layout = layout
        if config.cache_features:  # as Stage 1 keeps token ids: tiny next to the features
            layout.memo = {}

    def __getitem__(self, micro: int) -> dict:
        cfg = self.config
        epoch = self.position(micro)["epoch"]
        indices, captions, pixels = self.samples(micro)
        splits = [split_point(cfg.seed, epoch, i, c) for i, c in zip(indices, captions)] if self.layout.kind != "causal" else None
        batch = {"image_ids": torch.tensor(indices), **self.layout.batch(cfg.prompt, captions, splits)}
        if pixels is not None:
            batch["pixels"] = pixels
        return batch


class Stage2Objective(nn.Module):
    """The trainable part as DDP's module; the frozen LLM is held outside it (never broadcast)."""

    def __init__(self, model: Blip2Stage2):
        super().__init__()
        self.qformer = model.qformer
        self.language_projection = model.language_projection
        self.__dict__["model"] = model  # not a submodule: DDP would otherwise broadcast the LLM

    def forward(self, image_features, input_ids, attention_mask, labels):
        return self.model.loss(image_features, input_ids, attention_mask, labels)

    def train(self, mode: bool = True) -> "Stage2Objective":
        super().train(mode)
        self.model.train(mode)  # the frozen LLM's mode follows Blip2Stage2.llm_train_mode
        return self


def build_model(config: Stage2Config, device: torch.device) -> tuple[Blip2Stage2, FrozenImageEncoder, str]:
    """(model with Stage 1 Q-Former and fresh projection, frozen encoder, vision spec)."""
    _, model_dir, info = stage1_info(config.stage1)
    vision = config.vision or info.get("vision")
    if not vision:
        raise ConfigError(f"--stage1 {config.stage1}: no stage1.json naming the image encoder; pass --vision.")
    encoder = load_vision_encoder(vision, device)
    qformer = QFormer.from_pretrained(model_dir, device)
    if qformer.config.vision_width != encoder.width:
        raise ConfigError(f"--vision {vision}: width {encoder.width}, but the Stage 1 Q-Former expects "
                          f"{qformer.config.vision_width}; use the encoder Stage 1 was trained with.")
    qtok = load_tokenizer(model_dir)
    llm, tokenizer, kind = load_llm(config.llm, device)
    llm_ref = str(Path(config.llm).resolve()) if Path(config.llm).exists() else config.llm
    hidden = llm.config.hidden_size if kind == "causal" else llm.config.d_model
    spec = Stage2ModelConfig(qformer=asdict(qformer.config), llm=llm_ref, llm_kind=kind, llm_hidden_size=hidden,
                             vision=vision, instruction_aware=config.instruction_aware,
                             max_text_length=config.max_text_length, prompt=config.prompt,
                             caption_end=config.caption_end)
    torch.manual_seed(config.seed)
    model = Blip2Stage2(qformer, llm, tokenizer, spec, qtok).to(device)
    model.llm_train_mode = config.llm_train_mode
    if config.init_from:
        _load_trainable(model, config.init_from)
    model.qformer.set_gradient_checkpointing(config.activation_checkpointing)
    return model, encoder, vision


def _load_trainable(model: Blip2Stage2, checkpoint: str) -> None:
    from safetensors.torch import load_file

    _, model_dir = resolve_checkpoint(checkpoint)
    result = model.load_state_dict(load_file(str(model_dir / WEIGHTS_NAME), device=str(model.device)), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("language_model.") and k != "qformer.lm_head.decoder.weight"]
    if missing or result.unexpected_keys:
        raise ConfigError(f"--init-from {checkpoint}: its weights do not fit this Stage 2 model (missing {missing[:3]}, "
                          f"unexpected {result.unexpected_keys[:3]}); give a checkpoint trained from the same Stage 1.")


# -- Stage 2 as an objective of the trainer core (model/trainer.py) ---------------------------------
# Checkpoints have Stage 1's layout: step-*/model, trainer.pt, stage2.json, and the "latest" pointer.

def _marker(path: Path) -> None:
    # load_captioner reads config.json's model_type; this marker makes trainer and step folders
    # loadable by the same call (they resolve to the latest model/ folder).
    (path / CONFIG_NAME).write_text(json.dumps({"model_type": MODEL_TYPE, "checkpoint_of": "stage2"}))


class Stage2Training(Objective):
    """The LM / prefix-LM loss through the frozen LLM: what Stage 2 plugs into `fit`. Only the
    Q-Former and the projection are saved and restored; the LLM is referenced by config.llm."""

    name = "stage2"

    def __init__(self, config: Stage2Config, model: Blip2Stage2, encoder, data: Stage2Batches, lineage: dict,
                 device: torch.device):
        self.config, self.model, self.encoder, self.data, self.lineage, self.device = config, model, encoder, data, lineage, device
        self.module = Stage2Objective(model)
        self.cache = feature_cache(encoder, data)

    def inputs(self, batch: dict, step: int) -> dict:
        return {"image_features": image_features(batch, self.encoder, self.cache, self.device),
                "input_ids": batch["input_ids"].to(self.device), "attention_mask": batch["attention_mask"].to(self.device),
                "labels": batch["labels"].to(self.device)}

    def loss(self, loss):
        return loss, {}

    def save(self, folder: Path, step: int, data_position: dict) -> None:
        config, model = self.config, self.model
        model.save_pretrained(folder / "model")
        (folder / "stage2.json").write_text(json.dumps({
            "config": asdict(config), "step": step, "data_position": data_position,
            "curated_run": {"root": config.root, "run": config.run}, "vision": model.config.vision,
            "stage1": str(Path(config.stage1).resolve()), "llm": model.config.llm,
            "lineage": self.lineage,  # which run, thresholds and models produced the training data
        }, indent=1, default=str))
        _marker(folder)
        _marker(folder.parent)

    def restore(self, folder: Path) -> None:
        from safetensors.torch import load_file

        model = self.model
        result = model.load_state_dict(load_file(str(folder / "model" / WEIGHTS_NAME), device=str(model.device)), strict=False)
        if result.unexpected_keys:
            raise ConfigError(f"{folder}: checkpoint weights {result.unexpected_keys[:3]} do not fit this model; "
                              f"was --out used for another Stage 2 configuration? Use a fresh --out or --no-resume.")


def train(config: Stage2Config, images: list | None = None, lineage: dict | None = None) -> dict:
    """Train (or resume) Stage 2; returns {'step', 'checkpoint', 'metrics'} of this process.

    `images` (CuratedImage-like, with its `lineage`) replaces the curated run as the data."""
    rank, world_size = world()
    device = worker_device(config.device)
    model, encoder, _ = build_model(config, device)
    images, lineage = training_images(config, images, lineage)
    data = Stage2Batches(images, model.layout, encoder.preprocess, config, rank, world_size)
    return fit(Stage2Training(config, model, encoder, data, lineage, device), config, device)


def train_distributed(config: Stage2Config, workers: int, use_gpu: bool | None = None) -> dict:
    """Run `train` on `workers` Ray Train workers (DDP); returns rank 0's {'step', 'checkpoint', 'metrics'}."""
    return run_on_ray_train(train, config, workers, use_gpu, "stage2")


# -- inference -----------------------------------------------------------------------------------

def _pil(image) -> "object":
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image)).convert("RGB")
    if isinstance(image, (str, Path)):
        return Image.open(image).convert("RGB")
    return image.convert("RGB")


def pixels_of(image, preprocess) -> torch.Tensor:
    """The plain-resize preprocessing of training (no crop, no flip) for bytes, a path or a PIL image."""
    return pil_pixels(_pil(image), preprocess)


@dataclass
class Stage2Generator:
    """A Stage 2 model with its frozen encoder: captions and answers for images, deterministically."""

    model: Blip2Stage2
    encoder: FrozenImageEncoder
    id: str = ""
    defaults: dict = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, folder: str | Path, vision: str | None = None, llm: str | None = None,
                        device: str = "auto") -> "Stage2Generator":
        """A trainer --out folder (latest step), a step-* folder, a model folder, or a transformers
        Blip2ForConditionalGeneration checkpoint (folder or hub id)."""
        device = pick_device(device)
        path = Path(folder)
        config = path / CONFIG_NAME
        hub_id = not path.exists()
        if hub_id and (path.is_absolute() or str(folder).startswith(".") or str(folder).count("/") > 1):
            raise ConfigError(f"--stage2 {folder}: no such folder; pass a `capfilt train stage2 --out` folder, "
                              f"a step-* folder or its model/, or a BLIP-2 hub id (e.g. Salesforce/blip2-opt-2.7b).")
        if hub_id or (config.exists() and json.loads(config.read_text()).get("model_type") == "blip-2"):
            model, encoder = Blip2Stage2.from_blip2(str(folder), device)
            return cls(model.eval(), encoder, str(folder))
        _, model_dir = resolve_checkpoint(folder)
        model = Blip2Stage2.from_pretrained(model_dir, device, llm=llm)
        spec = vision or model.config.vision
        if not spec:
            raise ConfigError(f"{folder}: the checkpoint names no image encoder; pass vision=.")
        return cls(model.eval(), load_vision_encoder(spec, device), str(folder))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def pixels(self, images) -> torch.Tensor:
        return torch.stack([pixels_of(im, self.encoder.preprocess) for im in images]).to(self.device)

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels)

    def generate_ids(self, images, prompts: list[str], **kwargs) -> list[list[int]]:
        with autocast(self.device):
            return self.model.generate_ids(self.features(self.pixels(images)), prompts, **kwargs)

    def caption(self, images, prompt: str | None = None, num_beams: int = 5, max_new_tokens: int = 30,
                min_new_tokens: int = 1, top_p: float | None = None, seed: int = 0,
                repetition_penalty: float = 1.0, first_index: int = 0, length_penalty: float = 1.0) -> list[str]:
        """One caption per image: beam search by default; `top_p` switches to nucleus sampling
        where image i (counted from `first_index`) draws from its own generator seeded by (seed, i)."""
        prompt = self.model.config.prompt if prompt is None else prompt
        seeds = [hash_seed(seed, first_index + i) for i in range(len(images))] if top_p is not None else None
        ids = self.generate_ids(images, [prompt] * len(images), num_beams=num_beams, max_new_tokens=max_new_tokens,
                                min_new_tokens=min_new_tokens, top_p=top_p, seeds=seeds,
                                repetition_penalty=repetition_penalty, length_penalty=length_penalty)
        return self.model.decode(ids)

    def answer(self, images, questions: list[str], num_beams: int = 5, max_new_tokens: int = 10,
               template: str = VQA_PROMPT, min_new_tokens: int = 1, length_penalty: float = 1.0) -> list[str]:
        """Short answers, one per (image, question), with LAVIS's "Question: {} Answer:" prompt."""
        if len(questions) != len(images):
            raise ConfigError(f"{len(images)} images but {len(questions)} questions; give one question per image.")
        prompts = [template.format(q) for q in questions]
        ids = self.generate_ids(images, prompts, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                min_new_tokens=min_new_tokens, length_penalty=length_penalty)
        return self.model.decode(ids)


class Stage2Captioner(Captioner):
    """A Stage 2 checkpoint as a Caption-stage captioner (`load_captioner(folder)`)."""

    def __init__(self, id_or_path: str, device: str = "auto"):
        self.generator = Stage2Generator.from_checkpoint(id_or_path, device=device)
        self.id = str(id_or_path)

    def prepare(self, images, prompt):
        gen = self.generator
        return {"pixels": gen.pixels(images), "prompt": prompt}

    @torch.no_grad()
    def generate(self, inputs, decoding: Decoding, seeds):
        gen = self.generator
        batch, n = inputs["pixels"].shape[0], decoding.num_captions
        if len(seeds) != batch or any(len(s) != n for s in seeds):
            raise ValueError(f"need {n} seeds for each of {batch} images")
        with autocast(gen.device):
            ids = gen.model.generate_ids(
                gen.features(inputs["pixels"]), [inputs["prompt"]] * batch, num_beams=decoding.num_beams,
                max_new_tokens=decoding.max_length, min_new_tokens=decoding.min_length, num_return_sequences=n,
                repetition_penalty=decoding.repetition_penalty,
                top_p=decoding.top_p if decoding.sampling else None,
                seeds=[s for per_image in seeds for s in per_image] if decoding.sampling else None,
            )
        texts = gen.model.decode(ids)
        return [texts[i * n:(i + 1) * n] for i in range(batch)]


def load_stage2_captioner(id_or_path: str, device: str = "auto") -> Captioner:
    return Stage2Captioner(id_or_path, device)


# -- export to transformers ----------------------------------------------------------------------

def export_blip2(checkpoint: str | Path, out: str | Path, vision: str | None = None) -> Path:
    """Write a transformers Blip2ForConditionalGeneration folder (model + Blip2Processor).

    Needs a Blip2VisionModel-compatible encoder (a blip-2 / blip_2_vision_model --vision);
    open_clip, CLIP and SigLIP towers have no place in that class. The LLM tokenizer gains an
    `<image>` token (as transformers' BLIP-2 repos have); it takes a spare embedding row when the
    LLM has one (OPT and T5 pad their vocabularies), else the embeddings grow by one row
    (transformers' mean initialisation; that token is never fed, only its row is scored).
    `ln_vision` becomes `vision_model.post_layernorm`, whose eps is the vision config's (1e-6 in
    BLIP-2 configs) where capfilt's ln_vision uses LAVIS's 1e-5: a difference far below what
    changes a token in the tests, but not bit-identical hidden states.
    """
    from transformers import (
        AutoConfig,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionModel,
        BlipImageProcessor,
    )

    _, model_dir = resolve_checkpoint(checkpoint)
    config = read_model_config(model_dir)
    spec = vision or config.vision
    if config.instruction_aware:
        raise ConfigError(f"{checkpoint}: an instruction-aware Q-Former is InstructBLIP, not "
                          f"Blip2ForConditionalGeneration; export is not supported for it.")
    if not spec or spec.startswith("open_clip:") or AutoConfig.from_pretrained(spec).model_type not in ("blip-2", "blip_2_vision_model"):
        raise ConfigError(
            f"{checkpoint}: its image encoder {spec!r} is not a Blip2VisionModel, so it cannot be written as "
            f"Blip2ForConditionalGeneration; train Stage 1 with a blip-2 vision model (--vision) to export."
        )
    model = Blip2Stage2.from_pretrained(model_dir, "cpu")
    encoder = load_vision_encoder(spec, "cpu", torch.float32)
    vision_model = encoder.model
    if not isinstance(vision_model, Blip2VisionModel):
        raise ConfigError(f"--vision {spec}: loaded as {type(vision_model).__name__}, not Blip2VisionModel.")
    tokenizer = model.tokenizer
    llm = model.language_model
    if "<image>" not in tokenizer.get_vocab():
        from transformers import AddedToken

        tokenizer.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    if image_token >= llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(image_token + 1)
    tokenizer.image_token = "<image>"

    q = model.qformer.config
    qformer_config = Blip2QFormerConfig(
        vocab_size=q.vocab_size, hidden_size=q.hidden_size, num_hidden_layers=q.num_hidden_layers,
        num_attention_heads=q.num_attention_heads, intermediate_size=q.intermediate_size,
        hidden_dropout_prob=q.hidden_dropout_prob, attention_probs_dropout_prob=q.attention_probs_dropout_prob,
        max_position_embeddings=q.max_position_embeddings, initializer_range=q.initializer_range,
        layer_norm_eps=q.layer_norm_eps, pad_token_id=q.pad_token_id, cross_attention_frequency=q.cross_attention_frequency,
        encoder_hidden_size=q.vision_width,
    )
    text_config = llm.config.to_dict()
    text_config.update(eos_token_id=model.layout.eos, pad_token_id=tokenizer.pad_token_id)
    vision_config = vision_model.config.to_dict()
    blip2_config = Blip2Config(
        vision_config=vision_config, qformer_config=qformer_config.to_dict(), text_config=text_config,
        num_query_tokens=q.num_query_tokens, image_token_index=image_token,
    )
    hf = Blip2ForConditionalGeneration(blip2_config)
    state = {}
    for key, value in vision_model.state_dict().items():
        if not key.startswith("post_layernorm."):
            state["vision_model." + key] = value
    for key, value in model.qformer.state_dict().items():
        if key.startswith("ln_vision."):
            state["vision_model.post_layernorm." + key.split(".", 1)[1]] = value
        elif key == "query_tokens" or (key.startswith("qformer.") and not _text_ffn(key)):
            state[key] = value
    for key, value in model.language_projection.state_dict().items():
        state["language_projection." + key] = value
    for key, value in llm.state_dict().items():
        state["language_model." + key] = value
    result = hf.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    tied = set(getattr(hf, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied]
    if missing or result.unexpected_keys:
        raise ConfigError(f"export: weights did not map (missing {missing[:4]}, unexpected {result.unexpected_keys[:4]}).")
    out = Path(out)
    hf.save_pretrained(str(out))
    p = encoder.preprocess
    image_processor = BlipImageProcessor(size={"height": p.image_size, "width": p.image_size},
                                         image_mean=list(p.mean), image_std=list(p.std))
    Blip2Processor(image_processor, tokenizer, num_query_tokens=q.num_query_tokens).save_pretrained(str(out))
    return out


def _text_ffn(key: str) -> bool:
    """The Q-Former's text feed-forward, which Blip2ForConditionalGeneration's Q-Former lacks."""
    parts = key.split(".")
    return len(parts) > 4 and parts[1] == "encoder" and parts[4] in ("intermediate", "output")
