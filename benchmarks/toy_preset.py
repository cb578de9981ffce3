"""Time the toy preset's pieces and measure what they reach on a synthetic world.

    uv run capfilt synth --out /tmp/toyw --images 600 --noise 0.4 --seed 3
    uv run python -m benchmarks.toy_preset --world /tmp/toyw --out /tmp/toy [--quick] [--holdout 100]

Trains on the world's web captions (corrupted ones included, as the demo would) of all images
but the last `--holdout`; the held-out images are scored with their TRUE captions. Prints one
JSON object: seconds per function, CLIP held-out top-1 both ways, LM loss first/last/held-out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyarrow.parquet as pq

from model.toy.clip import pretrain_clip
from model.toy.lm import pretrain_lm
from model.toy.preset import ToyPreset
from model.toy.tokenizer import train_text_tokenizer


def world_pairs(world: str | Path) -> list[dict]:
    """The world's distinct images with bytes, web caption and true caption (image order)."""
    world = Path(world)
    truth = pq.read_table(world / "ground_truth.parquet").to_pylist()
    rows = sorted((r for r in truth if r["kind"] == "image"), key=lambda r: r["image_index"])
    return [{**r, "image": (world / "files" / f"{r['image_index']:06d}.jpg").read_bytes()} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--holdout", type=int, default=100)
    args = parser.parse_args()
    preset = ToyPreset.quick() if args.quick else ToyPreset()
    rows = world_pairs(args.world)
    train, held = rows[:-args.holdout], rows[-args.holdout:]
    out = Path(args.out)
    result = {"preset": "quick" if args.quick else "default", "train_pairs": len(train), "holdout": len(held)}

    started = time.perf_counter()
    train_text_tokenizer([r["web_caption"] for r in train], out / "bert_tokenizer", preset)
    result["tokenizer_seconds"] = round(time.perf_counter() - started, 2)

    clip = pretrain_clip([(r["image"], r["web_caption"]) for r in train], out / "clip", preset,
                         eval_pairs=[(r["image"], r["true_caption"]) for r in held])
    result["clip"] = clip.metrics

    lm = pretrain_lm([r["web_caption"] for r in train], out / "lm", preset,
                     eval_texts=[r["true_caption"] for r in held])
    result["lm"] = lm.metrics
    print(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
