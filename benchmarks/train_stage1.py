"""Stage 1 training throughput: samples/s and peak memory, and the speedup of caching the frozen
encoder's features (they never change without augmentation) against recomputing them every epoch.

    uv run python benchmarks/train_stage1.py                      # stated config below, CPU or GPU
    uv run python benchmarks/train_stage1.py --vision open_clip:ViT-B-16@openai --images 512

Both runs use the same data, model and steps (augmentation off in both, so the comparison is only
the encoder's work); the baseline is measured in the same process. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from model.train_stage1 import Stage1Config, train  # noqa: E402
from stage1_world import make_curated_run, make_tokenizer  # noqa: E402

QFORMER = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
               num_query_tokens=32, embed_dim=128, max_position_embeddings=64)


def encoder_folder(folder: Path, image_size: int) -> str:
    """A ViT-S/16-sized CLIP vision tower with random weights (the cost, not the quality, matters)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                              image_size=image_size, patch_size=16)
    CLIPVisionModel(config).save_pretrained(str(folder))
    return str(folder)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; process-wide high-water mark


def compare_feature_cache(train, config_class, base: Path, common: dict) -> dict:
    """A trainer run twice on the same data, model and steps: the frozen encoder's features recomputed
    every epoch, then cached. Each run's time, throughput, last loss and peak memory; the speedup;
    whether the losses are the same. Stage 1's and Stage 2's benchmarks both measure it."""
    runs = {}
    for name, cache in (("recompute", False), ("cached", True)):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        config = config_class(out=str(base / name), cache_features=cache, **common)
        start = time.perf_counter()
        result = train(config)
        seconds = time.perf_counter() - start
        samples = config.steps * config.batch_size
        runs[name] = {"seconds": round(seconds, 2), "samples_per_s": round(samples / seconds, 2),
                      "last_loss": result["metrics"][-1]["loss"], "peak_memory_mb": round(peak_memory_mb(), 1)}
    recompute, cached = runs["recompute"], runs["cached"]
    return {"recompute_features": recompute, "cached_features": cached,
            "cache_speedup": round(recompute["seconds"] / cached["seconds"], 2),
            "same_losses": recompute["last_loss"] == cached["last_loss"]}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vision", default=None, help="encoder spec; default: a random ViT-S/16-sized CLIP")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    return parser


def run(args) -> dict:
    """Prints one JSON line and returns it as a dict."""

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        make_curated_run(base / "data", "bench", images=args.images, seed=0, captions_per_image=2)
        vision = args.vision or encoder_folder(base / "encoder", args.image_size)
        common = dict(root=str(base / "data"), run="bench", vision=vision, tokenizer=str(make_tokenizer(base / "tok")),
                      bert=None, model=QFORMER, steps=args.epochs * (args.images // args.batch_size),
                      batch_size=args.batch_size, warmup_steps=1, augment=False, log_every=1,
                      checkpoint_every=10**9, progress=False)
        measured = compare_feature_cache(train, Stage1Config, base, common)
    result = {
        "config": {"vision": args.vision or "CLIP ViT-S/16 (random), 224px", "qformer": QFORMER,
                   "images": args.images, "batch_size": args.batch_size, "epochs": args.epochs,
                   "device": "cuda" if torch.cuda.is_available() else "cpu"},
        **measured,
    }
    print(json.dumps(result))
    return result


def main() -> None:
    run(parser().parse_args())


if __name__ == "__main__":
    main()
