"""Every benchmark at a size that fits about 10 minutes on 2 cores, as one table of ratios.

    uv run python -m benchmarks                 # all rows
    uv run python -m benchmarks --only stage1   # rows whose stage starts with one of these words

Each row: the stage, what is compared, capfilt's figure, the baseline's figure measured in the
same run, the ratio (capfilt's speed over the baseline's, so higher is better), the target, and
MISS where the ratio misses it. The scripts behind the rows (benchmarks/*.py) take larger sizes
and print more detail; see each one's docstring. On a GPU the Stage 1 rows run there (bf16
autocast, SDPA) and a Stage 1 MFU row is added.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.pop("RAY_ADDRESS", None)  # a fresh local Ray, never someone's cluster


@dataclass
class Row:
    stage: str
    compared: str
    capfilt: str
    baseline: str
    ratio: float | None = None
    target: float | None = None  # minimum ratio; None = no target, reported only
    note: str = ""
    miss: bool | None = None  # for rows whose target is not a ratio

    def status(self) -> str:
        if self.miss is not None:
            return "MISS" if self.miss else "ok"
        if self.ratio is None or self.target is None:
            return ""
        return "MISS" if self.ratio < self.target else "ok"


def _args(module, *argv):
    return module.parser().parse_args([str(a) for a in argv])


def ingest_rows():
    from benchmarks import ingest

    r = ingest.run(_args(ingest, "--images", 600, "--shard-size", 300))
    return [Row("ingest", "capfilt ingest vs img2dataset CLI, 600 URLs (images/s)", f"{r['capfilt']:.1f}",
                f"{r['img2dataset']:.1f}", r["capfilt"] / r["img2dataset"], 0.9)]


def caption_rows():
    from benchmarks import caption

    r = caption.run(_args(caption, "--images", 600, "--naive-images", 16))
    return [Row("caption", "stage end to end vs bare batched generate, 600 images (images/s)", f"{r['stage']:.2f}",
                f"{r['bare']:.2f}", r["stage"] / r["bare"], 0.85, f"{r['executor']}, start-up {r['startup_s']:.1f} s"),
            Row("caption", "stage on one Ray actor, end to end vs bare batched generate", f"{r['ray']:.2f}",
                f"{r['ray_bare']:.2f}", r["ray"] / r["ray_bare"], None, f"start-up {r['ray_startup_s']:.1f} s"),
            Row("caption", "stage on Ray after start-up vs bare batched generate", f"{r['ray_steady']:.2f}",
                f"{r['ray_bare']:.2f}", r["ray_steady"] / r["ray_bare"], None)]


def score_rows():
    from benchmarks import score

    r = score.bench_score(_args(score, "--pairs", 1800, "--repeats", 2))
    p = score.bench_itm_preprocess(_args(score, "--repeats", 3))
    return [Row("score", "stage end to end vs bare batched forward, 600 images x 3 (pairs/s)", f"{r['stage']:.1f}",
                f"{r['stage_bare']:.1f}", r["stage"] / r["stage_bare"], 0.85,
                f"{r['stage_executor']}, start-up {r['stage_startup_s']:.1f} s"),
            Row("score", "stage on one Ray actor, end to end vs bare batched forward", f"{r['ray']:.1f}",
                f"{r['ray_bare']:.1f}", r["ray"] / r["ray_bare"], None, f"start-up {r['ray_startup_s']:.1f} s"),
            Row("score", "batch function vs bare batched forward", f"{r['batch_fn']:.1f}", f"{r['bare']:.1f}",
                r["batch_fn"] / r["bare"], 0.85),
            Row("score", "ITM preprocessing, 64 pairs of 22 images at 384 px: each image once vs each pair (s)",
                f"{p['once_s']:.2f}", f"{p['pairs_s']:.2f}", p["pairs_s"] / p["once_s"], None)]


def eval_rows():
    from benchmarks import evaluate

    r = evaluate.run(_args(evaluate, "--images", 600, "--k", 16))
    return [Row("eval", f"ITM re-ranking {way.replace('_to_', '->')}, 600 queries x top 16: passes of many pairs vs one "
                        "forward per query (s)", f"{r[way]['capfilt']:.2f}", f"{r[way]['baseline']:.2f}",
                r[way]["baseline"] / r[way]["capfilt"], None, f"same ranking for {r[way]['same']} of 600 queries")
            for way in ("image_to_text", "text_to_image")]


def dedup_rows():
    from benchmarks import score

    (r,) = score.bench_dedup(_args(score, "--dedup-sizes", 10000, "--repeats", 1))
    return [Row("dedup", "SemDeDup vs brute-force search, 10k embeddings (s)", f"{r['semdedup_s']:.2f}",
                f"{r['brute_s']:.2f}", r["brute_s"] / r["semdedup_s"], None, f"recall {r['recall']:.3f}")]


def stage1_lavis_rows():
    import torch

    from benchmarks import stage1_lavis

    r = stage1_lavis.measure(repeats=8, batch=16, autocast_dtype=torch.bfloat16 if torch.cuda.is_available() else None)
    rows = [Row("stage1", f"loss step vs LAVIS-equivalent, hidden 256 x 4, 32 queries, batch 16, {r['device']} (ms)",
                f"{r['capfilt_ms']:.1f}", f"{r['lavis_reference_ms']:.1f}", r["ratio"], 1.0)]
    if r.get("mfu") is not None:
        rows.append(Row("stage1", "MFU of the loss step (bf16, GPU)", f"{r['mfu']:.3f}", "-", None, None))
    return rows


def train_step_rows(stage: int):
    from benchmarks import train_step

    r = train_step.measure(stage, images=600, steps=train_step.STEPS)
    new, old = r["capfilt"], r["baseline"]
    name = f"stage{stage}"
    return [Row(name, f"toy step vs the trainer as it was (data path, loss, optimizer), demo config ({r['device']}, samples/s)",
                f"{new['samples_per_s']:.1f}", f"{old['samples_per_s']:.1f}", r["speedup"], 2.0),
            Row(name, "toy step: fraction of time outside forward/backward/optimizer (target <= 0.10)",
                f"{new['outside_fraction']:.3f}", f"{old['outside_fraction']:.3f}", None, None,
                miss=new["outside_fraction"] > 0.10)]


def feature_cache_rows():
    from benchmarks import train_stage1

    r = train_stage1.run(_args(train_stage1, "--images", 32, "--batch-size", 16, "--epochs", 2))
    cached, recompute = r["cached_features"], r["recompute_features"]
    return [Row("stage1", "feature cache vs recomputing the frozen ViT-S/16 (samples/s)",
                f"{cached['samples_per_s']:.1f}", f"{recompute['samples_per_s']:.1f}", r["cache_speedup"], None,
                "same losses" if r["same_losses"] else "LOSSES DIFFER")]


def memory_rows():
    import json
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent / "curated_memory.py"
    done = subprocess.run([sys.executable, str(script), "--shards", "2", "--images-per-shard", "200"],
                          capture_output=True, text=True, check=True)
    r = json.loads(done.stdout.strip().splitlines()[-1])
    return [Row("curate", "filter + Stage 1 data loading peak RSS, 4x vs 1x the data (target <= 1.2x)",
                f"{r['4x']['peak_rss_mb']:.0f} MB", f"{r['1x']['peak_rss_mb']:.0f} MB", r["peak_rss_ratio_4x_vs_1x"],
                None, "ratio at most 1.2x", miss=not r["pass"])]


def cli_rows():
    from benchmarks import cli_startup

    rows = cli_startup.measure(repeats=3)
    slowest = max(rows, key=lambda r: r["capfilt"])
    return [Row("cli", f"slowest of {len(rows)} `--help` / argument-error calls ({slowest['compared'].split(' vs ')[0]}) "
                       "vs python -c pass (target < 1.5 s)", f"{slowest['capfilt']:.2f} s", f"{slowest['baseline']:.2f} s",
                slowest["capfilt"] / slowest["baseline"], None, "seconds, not a ratio, are the target",
                miss=not all(r["ok"] for r in rows))]


SECTIONS = [
    ("ingest", ingest_rows), ("caption", caption_rows), ("score", score_rows), ("eval", eval_rows), ("dedup", dedup_rows),
    ("stage1", stage1_lavis_rows), ("stage1", lambda: train_step_rows(1)), ("stage2", lambda: train_step_rows(2)),
    ("stage1", feature_cache_rows), ("curate", memory_rows), ("cli", cli_rows),
]


def table(rows: list[Row]) -> str:
    header = ("stage", "compared", "capfilt", "baseline", "ratio", "target", "")
    lines = [header] + [(r.stage, r.compared + (f" [{r.note}]" if r.note else ""), r.capfilt, r.baseline,
                         "-" if r.ratio is None else f"{r.ratio:.2f}x",
                         "-" if r.target is None else f">= {r.target:.2f}x", r.status()) for r in rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="stages to run (ingest caption score eval dedup stage1 stage2 curate cli)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # every row's in-process side runs on one thread, as its baseline does
    rows: list[Row] = []
    started = time.perf_counter()
    for stage, section in SECTIONS:
        if args.only and stage not in args.only:
            continue
        try:
            rows += section()
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            rows.append(Row(stage, f"{getattr(section, '__name__', stage)} failed", "-", "-", None, None,
                            f"{type(exc).__name__}: {exc}"[:120], miss=True))
    print(f"\ncapfilt benchmarks ({time.perf_counter() - started:.0f} s)", file=sys.stdout)
    print(table(rows))


if __name__ == "__main__":
    main()
