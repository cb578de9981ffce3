"""Tiny, real building blocks for the Stage 1 tests: a WordPiece tokenizer, frozen encoders
saved and loaded the way real ones are, and a curated run of synthetic scenes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from model.toy.scenes import ATTRIBUTE_VALUES, render, true_caption
from pipeline.run_store import RunStore, ShardCounts
from schemas import curated_outputs

TINY_OPEN_CLIP = "capfilt-test-ViT-tiny"
IMAGE_SIZE = 32


def make_tokenizer(folder: Path):
    """A BERT WordPiece tokenizer over the synthetic world's words, saved like a hub tokenizer."""
    from transformers import BertTokenizerFast

    words = set("a an the of on at to in near upper lower middle photo background".split())
    for values in ATTRIBUTE_VALUES.values():
        words.update(values)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", "."] + sorted(words)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def make_bert(folder: Path, tokenizer_folder: Path, hidden: int = 64, layers: int = 2) -> Path:
    """A tiny BertForMaskedLM checkpoint, standing in for bert-base-uncased."""
    from transformers import BertConfig, BertForMaskedLM

    vocab = len((tokenizer_folder / "vocab.txt").read_text().split())
    config = BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=64,
    )
    BertForMaskedLM(config).save_pretrained(str(folder))
    return folder


def make_open_clip(folder: Path) -> str:
    """Register a tiny open_clip ViT config and save random weights; returns the --vision spec."""
    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 3, "width": 48, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    config_file = folder / f"{TINY_OPEN_CLIP}.json"
    config_file.write_text(json.dumps(config))
    open_clip.add_model_config(config_file)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
    checkpoint = folder / "tiny_open_clip.pt"
    torch.save(model.state_dict(), checkpoint)
    return f"open_clip:{TINY_OPEN_CLIP}@{checkpoint}"


def make_clip_vision(folder: Path) -> str:
    """A tiny transformers CLIPVisionModel saved with save_pretrained; returns the --vision spec."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
        image_size=IMAGE_SIZE, patch_size=8,
    )
    CLIPVisionModel(config).save_pretrained(str(folder))
    return str(folder)


def jpeg(img) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def scenes(n: int, seed: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    return [{k: str(v[rng.integers(len(v))]) for k, v in ATTRIBUTE_VALUES.items()} for _ in range(n)]


def make_curated_run(root: Path, run: str, images: int = 24, seed: int = 0, captions_per_image: int = 2,
                     shards: int = 2) -> list[dict]:
    """Commit a curated run of synthetic scenes (each with `captions_per_image` kept captions)."""
    rng = np.random.default_rng(seed)
    store = RunStore(str(root), run)
    world = scenes(images, seed)
    rows = []
    for i, attrs in enumerate(world):
        data = jpeg(render(attrs, IMAGE_SIZE, rng))
        caption = true_caption(attrs)
        variants = [caption, caption.replace(" of a ", ", ").replace(" background", " background .")]
        for c in range(captions_per_image):
            rows.append({
                "sample_id": f"img{i:04d}", "caption_id": f"img{i:04d}#syn{c}", "image": data,
                "image_format": "jpg", "caption": variants[c % len(variants)], "caption_source": "synthetic",
                "run_id": run, "width": IMAGE_SIZE, "height": IMAGE_SIZE,
            })
    per_shard = -(-len(rows) // shards)
    for s in range(shards):
        part = rows[s * per_shard:(s + 1) * per_shard]
        table = pa.Table.from_pylist(part)
        store.commit_shard("select", f"{s:05d}", "h", outputs=curated_outputs(table),
                           counts=ShardCounts(rows_in=len(part), kept=len(part)))
    return world
