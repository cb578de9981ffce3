"""The toy frozen LLM of Stage 2: a tiny OPT causal LM and its byte-level BPE tokenizer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from capfilt.errors import ConfigError

from .preset import ToyPreset, write_info
from .training import Batches, threads, train_in_memory


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
    with threads(preset.threads):
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

    data = Batches(len(corpus), preset.lm_batch_size, preset.lm_steps, preset.seed, batch)
    losses = train_in_memory(model, data, [{"params": list(model.parameters()), "weight_decay": 0.01}], preset.lm_lr,
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
    write_info(folder, "causal_lm", preset, metrics)
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
