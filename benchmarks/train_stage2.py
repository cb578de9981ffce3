"""Stage 2 training throughput: samples/s and peak memory, with the frozen encoder's features
cached (they never change without augmentation) against recomputing them every epoch.

    uv run python benchmarks/train_stage2.py                     # stated config below, CPU or GPU
    uv run python benchmarks/train_stage2.py --llm facebook/opt-125m --images 256 --batch-size 32

Stated config: a random ViT-S/16-sized CLIP vision tower at 224 px, a 4-layer x 256 Q-Former
with 32 queries (untrained Stage 1 checkpoint), a random 4-layer x 256 OPT (or --llm), captions of
the synthetic world, augmentation off in both runs, the same data, model and steps; both runs in
the same process, so the ratio compares like with like. Prints one JSON line.
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

from model.stage2 import Stage2Config, train  # noqa: E402
from stage1_world import make_curated_run  # noqa: E402
from stage2_world import make_opt, make_stage1_checkpoint  # noqa: E402

QFORMER = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
               num_query_tokens=32, embed_dim=128, max_position_embeddings=64)


def encoder_folder(folder: Path, image_size: int) -> str:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                              image_size=image_size, patch_size=16)
    CLIPVisionModel(config).save_pretrained(str(folder))
    return str(folder)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; process-wide high-water mark


def timed_run(base: Path, name: str, common: dict, cache: bool) -> dict:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    config = Stage2Config(out=str(base / name), cache_features=cache, **common)
    start = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - start
    samples = config.steps * config.batch_size
    return {"seconds": round(seconds, 2), "samples_per_s": round(samples / seconds, 2),
            "last_loss": result["metrics"][-1]["loss"], "peak_memory_mb": round(peak_memory_mb(), 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llm", default=None, help="LLM id/folder; default: a random 4-layer x 256 OPT")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        make_curated_run(base / "data", "bench", images=args.images, seed=0, captions_per_image=2)
        vision = encoder_folder(base / "encoder", args.image_size)
        import stage2_world

        stage2_world.TINY_QFORMER = QFORMER  # the stated Q-Former size
        stage1 = make_stage1_checkpoint(base / "stage1", vision)
        if args.llm:
            llm = args.llm
        else:
            stage2_world.pretrain = lambda *a, **k: None  # cost, not quality, is measured
            llm = make_opt(base / "opt", width=256, layers=4)
        common = dict(root=str(base / "data"), run="bench", stage1=str(stage1), llm=llm,
                      steps=args.epochs * (args.images // args.batch_size), batch_size=args.batch_size,
                      warmup_steps=1, augment=False, log_every=1, checkpoint_every=10**9, progress=False)
        recompute = timed_run(base, "recompute", common, cache=False)
        cached = timed_run(base, "cached", common, cache=True)
    print(json.dumps({
        "config": {"vision": f"CLIP ViT-S/16 (random), {args.image_size}px", "qformer": QFORMER,
                   "llm": args.llm or "OPT 4 layers x 256 (random)", "images": args.images,
                   "batch_size": args.batch_size, "epochs": args.epochs, "threads": torch.get_num_threads(),
                   "device": "cuda" if torch.cuda.is_available() else "cpu"},
        "recompute_features": recompute,
        "cached_features": cached,
        "cache_speedup": round(recompute["seconds"] / cached["seconds"], 2),
        "same_losses": recompute["last_loss"] == cached["last_loss"],
    }))


if __name__ == "__main__":
    main()
