"""The toy bert-base-uncased: a small BERT pretrained with masked-LM on the captions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from capfilt.errors import ConfigError

from .preset import ToyPreset, write_info
from .training import Batches, threads, train_in_memory


def pretrain_bert(texts: Sequence[str], folder: str | Path, tokenizer_folder: str | Path,
                  preset: ToyPreset = ToyPreset()) -> dict:
    """A small BertForMaskedLM trained with masked-LM on `texts` (transformers' 15% masking
    collator), saved with its tokenizer: what `capfilt train stage1 --bert FOLDER` initialises
    the Q-Former from, as BLIP-2 does from bert-base-uncased. Returns its metrics."""
    corpus = [t.strip() for t in texts if t and t.strip()]
    if not corpus:
        raise ConfigError("pretrain_bert: no non-empty texts to train on.")
    with threads(preset.threads):
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
    data = Batches(len(corpus), preset.bert_batch_size, preset.bert_steps, preset.seed,
                    lambda idx: dict(collator([{"input_ids": ids[i]} for i in idx.tolist()])))
    losses = train_in_memory(model, data, [{"params": list(model.parameters()), "weight_decay": 0.01}], preset.bert_lr,
                       preset.bert_warmup, preset.seed, grad_clip=1.0)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    tail = losses[-max(1, len(losses) // 10):]
    metrics = {"texts": len(corpus), "steps": preset.bert_steps, "loss_first": losses[0],
               "loss_last": sum(tail) / len(tail), "parameters": sum(p.numel() for p in model.parameters()),
               "seconds": time.perf_counter() - started}
    write_info(folder, "bert_mlm", preset, metrics)
    return metrics
