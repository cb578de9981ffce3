"""Curated data is streamed: peak memory of filter + Stage 1 data loading at 4x the data vs 1x.

    uv run python benchmarks/curated_memory.py                  # 1x = 4 shards x 400 images (~75 MB)
    uv run python benchmarks/curated_memory.py --images-per-shard 500 --shards 8

For each scale (1x, then 4x: four times the shards of the same size) it writes a run the way
ingest and score write one (images/ with incompressible 256x256 JPEGs, scores/ with a web and
three synthetic captions per image), then measures, in a fresh process, the peak RSS of:
the select stage (top-2 per image -> curated/ + curated_images/), the filter report, the
lineage the trainers record, and one epoch of Stage 1 data loading (`load_curated_images` +
`Stage1Batches`, every micro-batch decoded, cropped, tokenized). The baseline is the 1x run of
the same process recipe; the target is peak(4x) <= 1.2 x peak(1x). It also reports the bytes
curated_images/ saves over storing each image once per kept caption (the old layout), and, for
scale, the peak RSS of reading the 4x run's curated images whole (what the trainers did before).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def jpeg_pool(count: int, side: int, seed: int) -> list[bytes]:
    """Noise JPEGs: incompressible, so Parquet's zstd cannot hide the bytes (like real photos)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(count):
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
        pool.append(buffer.getvalue())
    return pool


def make_run(root: Path, shards: int, per_shard: int, pool: list[bytes]) -> None:
    import numpy as np
    import pyarrow as pa

    from pipeline.run_store import RunStore, ShardCounts
    from schemas import IMAGES, SCORES

    store = RunStore(str(root), "bench")
    rng = np.random.default_rng(0)
    words = "a red blue green circle square cross small large on the left right of black background".split()
    for s in range(shards):
        shard = f"{s:05d}"
        images, scores = [], []
        for i in range(per_shard):
            sid = f"{shard}/{i}"
            caption = " ".join(rng.choice(words, 8))
            images.append({"sample_id": sid, "url": f"http://example.com/{shard}/{i}.jpg", "caption": caption,
                           "image": pool[(s * per_shard + i) % len(pool)], "image_format": "jpg", "width": 256,
                           "height": 256, "original_width": 512, "original_height": 512, "license": "cc-by",
                           "punsafe": 0.01, "pwatermark": 0.02, "similarity": 0.3})
            for c, source in enumerate(("web", "synthetic", "synthetic", "synthetic")):
                scores.append({"sample_id": sid, "caption_id": f"{sid}#{c}", "caption_source": source,
                               "caption": caption if c == 0 else " ".join(rng.choice(words, 8)),
                               "clip_score": float(rng.uniform(0.1, 0.4)), "itm_score": float(rng.uniform())})
        store.commit_shard("ingest", shard, "bench", outputs={"images": (IMAGES, pa.Table.from_pylist(images))},
                           counts=ShardCounts(rows_in=per_shard, kept=per_shard))
        store.commit_shard("score", shard, "bench", outputs={"scores": (SCORES, pa.Table.from_pylist(scores))},
                           counts=ShardCounts(rows_in=len(scores), kept=len(scores)))


def measure(root: str, tokenizer: str) -> dict:
    """In this (fresh) process: filter + Stage 1 data loading; peak RSS after imports and at the end."""
    from model.train_stage1 import Stage1Batches, Stage1Config, load_curated_images
    from model.vision import Preprocess
    from pipeline.filter_report import write_filter_report
    from pipeline.lineage import curated_lineage
    from pipeline.run_store import RunStore
    from pipeline import select
    from pipeline.select import SelectConfig

    import transformers  # noqa: F401 - imported before the baseline reading, as training imports it

    baseline = rss_mb()
    store = RunStore(root, "bench")
    selected = select.run(store, SelectConfig(policies=("blip2",), top_k=2))
    write_filter_report(store)
    lineage = curated_lineage(root, "bench")
    after_filter = rss_mb()
    from transformers import AutoTokenizer

    images = load_curated_images(root, "bench")
    config = Stage1Config(root=root, run="bench", vision="unused", out=str(Path(root) / "out"), tokenizer=tokenizer,
                          batch_size=32, augment=True)
    data = Stage1Batches(images, AutoTokenizer.from_pretrained(tokenizer), Preprocess(224, (0.5,) * 3, (0.5,) * 3), config)
    pixels = 0
    for micro in range(data.per_epoch):  # one epoch: every image read once, in the trainer's order
        pixels += data[micro]["pixels"].shape[0]
    return {"baseline_rss_mb": round(baseline, 1), "after_filter_rss_mb": round(after_filter, 1),
            "peak_rss_mb": round(rss_mb(), 1), "kept_pairs": selected.kept, "images": lineage["curated_images"],
            "images_loaded": pixels}


def measure_eager(root: str) -> dict:
    """The reference: what holding a run's curated images in memory (the old trainers' read) costs."""
    import pyarrow.parquet as pq

    import transformers  # noqa: F401 - the same imports as `measure` before its baseline

    from model.train_stage1 import Stage1Batches  # noqa: F401

    baseline = rss_mb()
    rows = pq.read_table(Path(root) / "runs" / "bench" / "curated_images", columns=["sample_id", "image", "captions"]).to_pylist()
    return {"baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(rss_mb(), 1), "images": len(rows)}


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.parquet"))


def per_caption_bytes(root: Path) -> tuple[int, int]:
    """(image bytes stored once per kept caption, as the old layout did; stored once per image, as now)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(root / "runs" / "bench" / "curated_images", columns=["image", "captions"])
    sizes = pc.binary_length(pc.struct_field(table.column("image"), "bytes")).to_numpy()
    counts = pc.list_value_length(table.column("captions")).to_numpy()
    return int((sizes * counts).sum()), int(sizes.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=4, help="image shards at 1x (4x writes four times as many)")
    parser.add_argument("--images-per-shard", type=int, default=400)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # child mode: the run root to measure
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_eager(args.measure) if args.eager else measure(args.measure, args.tokenizer)))
        return
    from stage1_world import make_tokenizer

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = str(make_tokenizer(Path(tmp) / "tokenizer"))
        # 200 distinct images, cycled: images/ (whole-shard row groups) compresses the repeats,
        # so compare curated sizes with image_bytes_*, not with images_mb.
        pool = jpeg_pool(200, 256, seed=0)
        for scale in (1, 4):
            root = Path(tmp) / f"x{scale}"
            make_run(root, args.shards * scale, args.images_per_shard, pool)
            child = subprocess.run([sys.executable, __file__, "--measure", str(root), "--tokenizer", tokenizer],
                                   capture_output=True, text=True, check=True)
            result = json.loads(child.stdout.strip().splitlines()[-1])
            run = root / "runs" / "bench"
            old_bytes, image_bytes = per_caption_bytes(root)
            result.update(images_mb=round(disk_bytes(run / "images") / 2**20, 1),
                          curated_mb=round((disk_bytes(run / "curated") + disk_bytes(run / "curated_images")) / 2**20, 1),
                          image_bytes_per_caption_mb=round(old_bytes / 2**20, 1),
                          image_bytes_once_mb=round(image_bytes / 2**20, 1))
            result["growth_mb"] = round(result["peak_rss_mb"] - result["baseline_rss_mb"], 1)
            results[f"{scale}x"] = result
            if scale == 4:  # what the same data costs read whole, for scale
                child = subprocess.run([sys.executable, __file__, "--measure", str(root), "--eager"],
                                       capture_output=True, text=True, check=True)
                eager = json.loads(child.stdout.strip().splitlines()[-1])
                eager["growth_mb"] = round(eager["peak_rss_mb"] - eager["baseline_rss_mb"], 1)
                results["4x_read_whole_reference"] = eager
    ratio = results["4x"]["peak_rss_mb"] / results["1x"]["peak_rss_mb"]
    print(json.dumps({"benchmark": "curated_memory", "images_1x": args.shards * args.images_per_shard,
                      **results, "peak_rss_ratio_4x_vs_1x": round(ratio, 3), "target": "<= 1.2",
                      "pass": ratio <= 1.2}))


if __name__ == "__main__":
    main()
