"""The frozen LLM of Stage 2 and how text is laid out for it (one rule for training and generation).

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
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from capfilt.device import inference_dtype
from capfilt.errors import ConfigError, first_line

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
            f"--llm {spec}: cannot load a transformers config and tokenizer there ({first_line(exc)}). Give a "
            f"hub id such as facebook/opt-2.7b or a folder written by save_pretrained (model + tokenizer)."
        ) from exc
    kind = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
    cls = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(spec, dtype=dtype or inference_dtype(device))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--llm {spec}: not loadable as {cls.__name__} ({first_line(exc)}).") from exc
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
        self._last_prompt: tuple[str, list[int]] | None = None  # training repeats one prompt every batch

    def prompt_ids(self, prompt: str) -> list[int]:
        """What comes right after the soft prompt: the prompt with the tokenizer's specials."""
        if self._last_prompt is None or self._last_prompt[0] != prompt:
            self._last_prompt = (prompt, self.tokenizer(prompt, truncation=True, max_length=self.max_text_length).input_ids)
        return list(self._last_prompt[1])

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

    def batch(self, prompt: str, captions: list[str], splits: list[int] | None = None,
              siblings: list[str] = ()) -> dict[str, torch.Tensor]:
        """`collate` of `example(prompt, caption, split)` for every caption, with one tokenizer call
        per kind of text instead of one per caption and the padding done in one array operation.

        `siblings` (decoder-only, with the memo on): the other captions the batch's images may be
        drawn with in later epochs, tokenized in the same call as this batch's new captions."""
        if self.kind == "causal":
            prompt_ids = self.prompt_ids(prompt)
            sep = " " if prompt and not prompt.endswith(" ") else ""
            targets = self._words_batch([(sep if c else "") + c for c in captions],
                                        [(sep if c else "") + c for c in siblings])
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

    def _words_batch(self, texts: list[str], siblings: list[str] = ()) -> list[list[int]]:
        """`_words("", text)` of many texts (callers put the separator in the text); remembered
        per text when `self.memo` is a dict (the trainer's, with cached features), which learns
        the `siblings` too whenever it lacks one of the texts."""
        memo = self.memo if self.memo is not None else {}
        missing = [t for t in dict.fromkeys(texts) if t and t not in memo]
        if missing:  # the siblings join a call that has to be made anyway
            missing = [t for t in dict.fromkeys([*missing, *siblings]) if t and t not in memo]
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
