"""Ingest throughput: `capfilt ingest` vs the plain img2dataset CLI on the same URLs and server.

Both download the same synthetic world (no bad URLs, so no timeouts dominate) from the world's
server on 127.0.0.1 with the same settings (parquet output, image size, threads per process,
2 processes / 2 Ray CPUs, sha256). Both are timed end to end as command-line processes, start-up
included, and images/s is computed from the images each wrote. They run --repeats times,
interleaved (a burst of other load then hits both alike), and the fastest run of each counts.
Target: capfilt / img2dataset >= 0.9.

    uv run python benchmarks/ingest.py [--images 4000] [--shard-size 1000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.toy.server import WorldServer  # noqa: E402
from model.toy.world import WorldConfig, make_world  # noqa: E402


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, interleaved; the fastest counts")
    return parser


def run(args) -> dict:
    """Prints the figures and returns them (images/s of each)."""

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled")
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="capfilt-bench-") as tmp:
        tmp = Path(tmp)
        world = make_world(tmp / "world", WorldConfig(images=args.images, seed=0, bad_urls_per_kind=0, duplicates=0))
        source = world["source"]
        with WorldServer(tmp / "world"):
            best = {}  # name -> (images/s, images, seconds) of its fastest run
            for attempt in range(args.repeats):
                i2d_out = tmp / f"i2d-{attempt}"
                i2d_seconds = timed([
                    str(bin_dir / "img2dataset"), f"--url_list={source}", "--input_format=parquet",
                    "--url_col=URL", "--caption_col=TEXT", "--output_format=parquet",
                    f"--output_folder={i2d_out}", "--processes_count=2", f"--thread_count={args.threads}",
                    f"--image_size={args.image_size}", "--resize_mode=border",
                    f"--number_sample_per_shard={args.shard_size}", "--enable_wandb=False", "--timeout=10",
                    "--compute_hash=sha256",
                ], env)
                i2d_images = sum(
                    pq.read_table(p, columns=["status"]).column("status").to_pylist().count("success")
                    for p in i2d_out.glob("*.parquet")
                )
                run_id = f"bench-{attempt}"  # a run of its own each time: a rerun of one run skips its done shards
                capfilt_seconds = timed([
                    str(bin_dir / "capfilt"), "ingest", "--source", source, "--root", str(tmp / "root"),
                    "--run", run_id, "--shard-size", str(args.shard_size), "--allow-private-addresses",
                    "--threads", str(args.threads), "--image-size", str(args.image_size), "--no-progress",
                ], env)
                capfilt_images = sum(
                    pq.read_table(p, columns=["sample_id"]).num_rows
                    for p in (tmp / "root" / "runs" / run_id / "images").glob("*.parquet")
                )
                for name, images, seconds in (("i2d", i2d_images, i2d_seconds), ("capfilt", capfilt_images, capfilt_seconds)):
                    best[name] = max(best.get(name, (0.0,)), (images / seconds, images, seconds))
    (i2d_rate, i2d_images, i2d_seconds), (capfilt_rate, capfilt_images, capfilt_seconds) = best["i2d"], best["capfilt"]
    print(f"urls: {args.images}, shard size {args.shard_size}, {args.threads} threads, 2 processes; fastest of {args.repeats}")
    print(f"img2dataset CLI : {i2d_images} images in {i2d_seconds:.1f} s = {i2d_rate:.1f} images/s")
    print(f"capfilt ingest  : {capfilt_images} images in {capfilt_seconds:.1f} s = {capfilt_rate:.1f} images/s")
    print(f"ratio capfilt / img2dataset = {capfilt_rate / i2d_rate:.2f} (target >= 0.9)")
    return {"capfilt": capfilt_rate, "img2dataset": i2d_rate}


def main() -> None:
    run(parser().parse_args())


if __name__ == "__main__":
    main()
