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
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: benchmarks/ is not a package then

from benchmarks.train_stage1 import QFORMER, compare_feature_cache, encoder_folder  # noqa: E402
from model.stage2 import Stage2Config, train  # noqa: E402
from stage1_world import make_curated_run  # noqa: E402
from stage2_world import make_opt, make_stage1_checkpoint  # noqa: E402


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
        measured = compare_feature_cache(train, Stage2Config, base, common)
    print(json.dumps({
        "config": {"vision": f"CLIP ViT-S/16 (random), {args.image_size}px", "qformer": QFORMER,
                   "llm": args.llm or "OPT 4 layers x 256 (random)", "images": args.images,
                   "batch_size": args.batch_size, "epochs": args.epochs, "threads": torch.get_num_threads(),
                   "device": "cuda" if torch.cuda.is_available() else "cpu"},
        **measured,
    }))


if __name__ == "__main__":
    main()
