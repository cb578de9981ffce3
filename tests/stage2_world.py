"""Tiny, real building blocks for the Stage 2 tests: a tiny OPT and a tiny T5 with tokenizers
trained on the synthetic world's captions, a tiny Blip2VisionModel, and a Stage 1 checkpoint
folder (an untrained Q-Former + stage1.json), all saved and loaded the way real ones are."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from stage1_world import IMAGE_SIZE, make_tokenizer

from model.toy.scenes import ATTRIBUTE_VALUES, true_caption

TINY_QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    num_query_tokens=4, embed_dim=16, max_position_embeddings=64)


def corpus() -> list[str]:
    captions = [true_caption(dict(zip(ATTRIBUTE_VALUES, v))) for v in itertools.product(*ATTRIBUTE_VALUES.values())]
    return captions + ["a photo of", "Question: what color? Answer:"]


def make_opt(folder: Path, width: int = 32, layers: int = 2, pretrain_steps: int = 100) -> str:
    """A tiny OPTForCausalLM with a byte-level BPE tokenizer that prepends `</s>` (as OPT's does).

    Its embedding matrix has spare rows past the tokenizer, as facebook/opt-* have (50272 vs 50265).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2TokenizerFast, OPTConfig, OPTForCausalLM

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "</s>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 1)])
    raw.decoder = decoders.ByteLevel()
    tokenizer = GPT2TokenizerFast(tokenizer_object=raw, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=(len(tokenizer) + 8 + 15) // 16 * 16, hidden_size=width, word_embed_proj_dim=width,
                       num_hidden_layers=layers, ffn_dim=2 * width, num_attention_heads=2, max_position_embeddings=128,
                       bos_token_id=1, eos_token_id=1, pad_token_id=0)
    model = OPTForCausalLM(config)
    pretrain(model, tokenizer, seq2seq=False, steps=pretrain_steps)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def make_gpt2_without_pad(folder: Path, width: int = 32) -> str:
    """A tiny GPT2LMHeadModel whose tokenizer has only an eos token (no pad, no BOS added): the
    weakest tokenizer the Stage 2 contract accepts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.decoder = decoders.ByteLevel()
    tokenizer = GPT2TokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=width, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def make_t5(folder: Path, width: int = 32, layers: int = 2, pretrain_steps: int = 100) -> str:
    """A tiny T5ForConditionalGeneration with a word-level tokenizer that appends `</s>` (as T5's does)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.train_from_iterator(corpus(), trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    raw.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    raw.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer) + 8, d_model=width, d_kv=8, d_ff=2 * width, num_layers=layers,
                      num_heads=4, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, dropout_rate=0.0)
    model = T5ForConditionalGeneration(config)
    pretrain(model, tokenizer, seq2seq=True, steps=pretrain_steps)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def pretrain(model, tokenizer, seq2seq: bool, steps: int = 100, batch: int = 32) -> None:
    """A few steps of language modelling on the world's captions, so the frozen LLM speaks the
    captions' language (a random LLM ignores its input, and a soft prompt could not steer it)."""
    import numpy as np

    texts = corpus()
    rng = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        chosen = [texts[i] for i in rng.integers(0, len(texts), batch)]
        if seq2seq:
            # half the rows: prefix -> rest, split at a random word (the Stage 2 prefix-LM task);
            # the other half: caption -> the same caption, so the decoder learns to read what the
            # encoder holds (what a soft prompt uses)
            cuts = [rng.integers(0, len(t.split())) for t in chosen]
            copy = rng.random(len(chosen)) < 0.5
            sources = [t if c else " ".join(t.split()[:k]) for t, k, c in zip(chosen, cuts, copy)]
            targets = [t if c else " ".join(t.split()[k:]) for t, k, c in zip(chosen, cuts, copy)]
            enc = tokenizer(sources, padding=True, return_tensors="pt")
            tgt = tokenizer(targets, padding=True, return_tensors="pt")
            labels = tgt.input_ids.masked_fill(tgt.attention_mask == 0, -100)
            loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        else:
            # each caption said twice: the LM learns positions past a short soft prompt's length
            # and to take a caption from its context (what a soft prompt uses)
            rows = [t + tokenizer.eos_token + t for t in chosen]
            enc = tokenizer([t + tokenizer.eos_token for t in rows], padding=True, return_tensors="pt")
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def make_blip2_vision(folder: Path, width: int = 48) -> str:
    """A tiny transformers Blip2VisionModel (what Blip2ForConditionalGeneration holds); --vision spec."""
    from transformers import Blip2VisionConfig, Blip2VisionModel

    torch.manual_seed(0)
    config = Blip2VisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                               num_attention_heads=3, image_size=IMAGE_SIZE, patch_size=8,
                               initializer_range=0.02)  # the default 1e-10 makes every image look the same
    Blip2VisionModel(config).save_pretrained(str(folder))
    return str(folder)


def make_stage1_checkpoint(folder: Path, vision: str, tokenizer_folder: Path | None = None, seed: int = 0) -> Path:
    """A Stage 1 step folder as `capfilt train stage1` writes it: model/ (Q-Former + tokenizer) and
    stage1.json naming the encoder. The Q-Former is untrained (Stage 2 only needs its shape)."""
    from model.qformer import QFormer, config_for_tokenizer, load_tokenizer
    from model.vision import load_vision_encoder

    tokenizer = load_tokenizer(tokenizer_folder or make_tokenizer(folder.parent / f"{folder.name}-tok"))
    width = load_vision_encoder(vision).width
    torch.manual_seed(seed)
    model = QFormer(config_for_tokenizer(tokenizer, **TINY_QFORMER, vision_width=width))
    step = folder / "step-00000000"
    model.save_pretrained(step / "model", tokenizer=tokenizer)
    (step / "stage1.json").write_text(json.dumps({"vision": vision, "step": 0}))
    (folder / "latest").write_text(step.name)
    return folder
