"""Does the demo world show data quality? Raw web pairs vs the oracle's true captions, Stage 1 only.

    uv run python benchmarks/testbed.py --root /tmp/tb --seeds 0 1 2 [--images 600] [--noise 0.4]
        [--heldout 600] [--stage1-steps 1000] [--pretrain-images 0]

For each seed: the demo's world and a clean held-out world, two curated runs written straight
from the world (no ingest, no Ray: the same images the demo would ingest) - `raw` (every image
with a non-empty web caption, as round 0's top-1 keeps) and `oracle` (true captions) - the toy
encoder (pretrained on the raw pairs as the toy preset does, or with --pretrain-images N once on a
separate pretraining world, as `capfilt toy pretrain --world-images N`), then the `capfilt train stage1` step with the toy preset's fields and
`capfilt eval --heldout` on each. Set OMP_NUM_THREADS=1 on shared cores. Prints held-out text->image R@1/R@5 (ITM rerank), the standard
error of R@1 and the wall time of each piece; writes <root>/testbed.json.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def curated_from_world(world_dir: Path, root: str, run: str, which: str) -> int:
    """Write run `run`'s curated/ from a world's files: web captions ('raw') or true ones ('oracle')."""
    import hashlib

    from pipeline.run_store import RunStore, ShardCounts
    from schemas import curated_outputs

    truth = pq.read_table(world_dir / "ground_truth.parquet").to_pylist()
    rows = []
    for r in truth:
        if r["kind"] != "image":
            continue
        caption = (r["web_caption"] if which == "raw" else r["true_caption"]) or ""
        if not caption.strip():
            continue  # round 0 drops empty captions
        data = (world_dir / "files" / f"{r['image_index']:06d}.jpg").read_bytes()
        sample_id = f"part-00000/{r['source_row']}"
        rows.append({"sample_id": sample_id, "caption_id": f"{sample_id}#{which}", "image": data, "image_format": "jpg",
                     "caption": caption, "caption_source": "web" if which == "raw" else "oracle", "rank": 0,
                     "sha256": hashlib.sha256(data).hexdigest(), "url": r["url"], "width": 64, "height": 64,
                     "run_id": run, "provenance": json.dumps({"testbed": which})})
    RunStore(root, run).commit_shard("select", "part-00000", which, outputs=curated_outputs(rows),
                                     counts=ShardCounts(rows_in=len(rows), kept=len(rows), rejected=0, rows_out=len(rows)))
    return len(rows)


def raw_pairs(world_dir: Path) -> list[tuple[bytes, str]]:
    truth = pq.read_table(world_dir / "ground_truth.parquet").to_pylist()
    return [((world_dir / "files" / f"{r['image_index']:06d}.jpg").read_bytes(), r["web_caption"])
            for r in truth if r["kind"] == "image" and (r["web_caption"] or "").strip()]


def heldout_pairs(world_dir: Path, n: int = 200) -> list[tuple[bytes, str]]:
    truth = pq.read_table(world_dir / "ground_truth.parquet").to_pylist()[:n]
    return [((world_dir / "files" / f"{r['image_index']:06d}.jpg").read_bytes(), r["true_caption"]) for r in truth]


def capfilt(*argv: str) -> float:
    started = time.perf_counter()
    subprocess.run(["capfilt", *argv], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--noise", type=float, default=0.4)
    ap.add_argument("--noise-kinds", default=None)
    ap.add_argument("--heldout", type=int, default=600)
    ap.add_argument("--stage1-steps", type=int, default=1000)  # the toy preset's
    ap.add_argument("--pretrain-images", type=int, default=0, help="0: toy encoder on the raw pairs (today's preset)")
    ap.add_argument("--pretrain-noise", type=float, default=0.4)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="toy preset field=value")
    ap.add_argument("--stage1", dest="stage1_sets", action="append", default=[], help="stage1 option=value")
    ap.add_argument("--arms", default="raw,oracle")
    args = ap.parse_args()

    from capfilt.presets import toy_preset
    from flows.steps import make
    from model.toy.preset import ToyPreset
    from model.toy.pretrain import pretrain_toy_pairs
    from model.toy.world import NOISE_KINDS, WorldConfig, make_world

    root = Path(args.root)
    overrides = {}
    for item in args.sets:
        k, v = item.split("=", 1)
        field_type = type(getattr(ToyPreset(), k))
        overrides[k] = field_type(v) if field_type is not bool else v.lower() in ("1", "true")
    preset = ToyPreset(**overrides)
    kinds = tuple(args.noise_kinds.split(",")) if args.noise_kinds else NOISE_KINDS
    results = []
    for seed in args.seeds:
        times = {}
        t = time.perf_counter()
        world_dir = root / "worlds" / f"seed{seed}-{args.images}-{args.noise}"
        if not (world_dir / "world.json").exists():
            make_world(world_dir, WorldConfig(images=args.images, seed=seed, noise=args.noise, noise_kinds=kinds))
        heldout_dir = root / "worlds" / f"heldout-seed{seed}-{args.heldout}"
        if not (heldout_dir / "world.json").exists():
            make_world(heldout_dir, WorldConfig(images=args.heldout, seed=seed + 7919, noise=0.0, bad_urls_per_kind=0,
                                                duplicates=0))
        times["worlds"] = time.perf_counter() - t
        t = time.perf_counter()
        tag = f"p{args.pretrain_images}-" + "-".join(f"{k}{v}" for k, v in sorted(overrides.items()))
        if args.pretrain_images:
            toy_dir = root / "models" / f"toy-{tag}-{args.pretrain_noise}"  # one per preset: shared by all seeds, like the cache
            pre_dir = root / "worlds" / f"pretrain-{args.pretrain_images}-{args.pretrain_noise}"
            if not (pre_dir / "world.json").exists():
                make_world(pre_dir, WorldConfig(images=args.pretrain_images, seed=104729, noise=args.pretrain_noise, bad_urls_per_kind=0, duplicates=0))
            info = pretrain_toy_pairs(raw_pairs(pre_dir), toy_dir, preset, lm=False,
                                      eval_pairs=heldout_pairs(heldout_dir))
        else:
            toy_dir = root / "models" / f"toy-seed{seed}-{tag}"
            info = pretrain_toy_pairs(raw_pairs(world_dir), toy_dir, preset, lm=False,
                                      eval_pairs=heldout_pairs(heldout_dir))
        times["toy_pretrain"] = time.perf_counter() - t
        # the preset's rule: uniform ITM negatives all run (--stage1 itm-random-negative-steps=200: hard after 200)
        stage1 = toy_preset(str(toy_dir)).stage1.replace(
            {"steps": args.stage1_steps, "itm_random_negative_steps": args.stage1_steps})
        stage1 = stage1.replace(dict(item.split("=", 1) for item in args.stage1_sets))
        negatives = f"rn{stage1.values['config.itm_random_negative_steps']}"
        row = {"seed": seed, "toy": str(toy_dir), "clip": {k: v for k, v in info.get("clip", {}).items() if k in ("eval", "loss_last", "seconds")}, "times": times}
        for arm in args.arms.split(","):
            run = f"{arm}-s{seed}-{args.images}-{args.noise}"
            if not (root / "runs" / run).exists():
                curated_from_world(world_dir, str(root), run, arm)
            out = root / "models" / (f"{run}-{tag}-st{args.stage1_steps}-{negatives}-"
                                     + "-".join(s.replace("=", "") for s in args.stage1_sets))
            if not (out / "eval.json").exists():
                t = time.perf_counter()  # the `capfilt train stage1` step, in this process
                step = make("train stage1", {**stage1.values, "root": str(root), "run": run, "out": str(out / "stage1")})
                step.execute(say=lambda line: None)
                times[f"{arm}_stage1"] = time.perf_counter() - t
                times[f"{arm}_eval"] = capfilt("eval", "--root", str(root), "--run", run, "--stage1", str(out / "stage1"),
                                               "--heldout", str(heldout_dir), "--max-images", str(args.heldout),
                                               "--out", str(out))  # writes out/eval.json
            ev = json.loads((out / "eval.json").read_text())
            t2i = ev["retrieval"]["itm"]["text_to_image"]
            r1 = t2i["r1"]
            row[arm] = {"R@1": r1, "R@5": t2i["r5"], "itc_R@1": ev["retrieval"]["itc"]["text_to_image"]["r1"],
                        "n": ev["retrieval"]["images"], "se": math.sqrt(r1 * (1 - r1) / ev["retrieval"]["images"])}
            print(json.dumps({"seed": seed, "arm": arm, "clip": row["clip"], **row[arm], "times": times}), flush=True)
        results.append(row)
    summary = {"args": vars(args), "seeds": results}
    arms = args.arms.split(",")
    for arm in arms:
        summary[f"mean_{arm}_R@1"] = sum(r[arm]["R@1"] for r in results) / len(results)
    (root / "testbed.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k.startswith("mean")}))


if __name__ == "__main__":
    sys.exit(main())
