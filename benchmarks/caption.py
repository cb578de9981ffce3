"""Caption stage throughput vs a bare batched `generate` loop and a naive one-image-at-a-time loop.

    uv run python benchmarks/caption.py [--images 192] [--batch-size 16] [--num-captions 4]

All three use the same compute (--threads torch threads; the stage one actor with that many
cores). Builds a randomly initialised BLIP big enough that one batch takes >= 0.2 s on CPU, writes a run
with `images/` shards of rendered scenes, then measures images/s of
  (a) the stage: `run_caption` end to end (Ray actor start, model load, decode, generate, commit),
  (b) a bare loop: the same decoded images through processor + `model.generate` in batches,
  (c) naive: processor + `model.generate` one image at a time,
and prints a/b (target >= 0.85: the stage adds little over batched generation) and b/c
(target >= 3: batching pays).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pipeline.ray_env as ray_env  # noqa: E402  (before ray)
import torch  # noqa: E402
from caption_helpers import commit_image_shards  # noqa: E402

from model.captioners import Decoding, load_captioner, save_random_captioner  # noqa: E402
from pipeline.caption import CaptionConfig, decode_image, run_caption  # noqa: E402
from pipeline.run_store import RunStore  # noqa: E402


def bare_generate(captioner, images, decoding, batch_size):
    """processor + generate with transformers' own sampling, batch by batch (the ceiling)."""
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        inputs = captioner.prepare(chunk, decoding.prompt)
        with torch.inference_mode():
            captioner.model.generate(
                **inputs, do_sample=True, top_p=decoding.top_p, num_return_sequences=decoding.num_captions,
                max_new_tokens=decoding.max_length, min_new_tokens=decoding.min_length,
            )


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--naive-images", type=int, default=32, help="images for the (slow) naive loop")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-captions", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for (b), (c) and the stage's one actor")
    return parser


def run(args) -> dict:
    """Prints the figures and returns them (images/s): stage end to end, stage after start-up, bare, naive."""
    # same compute for all three: the stage runs one actor reserving --threads cores
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="capfilt-bench-caption-"))
    folder = save_random_captioner(str(work / "blip"), "blip", width=args.width, layers=args.layers, image_size=96, patch_size=16)
    decoding = Decoding(num_captions=args.num_captions, max_length=20, min_length=20, seed=0)
    store = RunStore(str(work / "root"), "bench")
    shards = 4
    commit_image_shards(store, {f"s{i}": args.images // shards for i in range(shards)})
    n_images = (args.images // shards) * shards
    images = [decode_image(data) for data in store.read("images").column("image").to_pylist()]
    captioner = load_captioner(folder, device="cpu")
    print(f"captioner: BLIP width {args.width}, {args.layers} layers, 96 px; {args.num_captions} captions x "
          f"{decoding.max_length} tokens; batch {args.batch_size}; torch threads {torch.get_num_threads()}")

    bare_generate(captioner, images[: args.batch_size], decoding, args.batch_size)  # warm-up
    start = time.perf_counter()
    bare_generate(captioner, images[: args.batch_size], decoding, args.batch_size)
    print(f"one batch of {args.batch_size}: {time.perf_counter() - start:.2f} s (must be >= 0.2 s)")

    start = time.perf_counter()
    bare_generate(captioner, images, decoding, args.batch_size)
    bare = n_images / (time.perf_counter() - start)

    naive_images = images[: args.naive_images]
    start = time.perf_counter()
    bare_generate(captioner, naive_images, decoding, 1)
    naive = len(naive_images) / (time.perf_counter() - start)

    # "local": a fresh Ray of our own, never a cluster someone else started with `ray start`
    ray_env.ensure_ray(address="local")
    start = time.perf_counter()
    summary = run_caption(store, CaptionConfig(
        captioner=folder, decoding=decoding, batch_size=args.batch_size, actors=1, cpus_per_actor=args.threads
    ))
    stage = n_images / (time.perf_counter() - start)
    assert summary.captioned == n_images, summary.line()

    steady = n_images / (summary.captioning_s - summary.startup_s)
    print(f"    {summary.line()}")
    print(f"    stage startup (Ray job, actor process, model load) until the first batch: {summary.startup_s:.1f} s")
    print(f"(a) stage        {stage:7.2f} images/s end to end; {steady:.2f} images/s once the actor runs")
    print(f"(b) bare batched {bare:7.2f} images/s")
    print(f"(c) naive 1-by-1 {naive:7.2f} images/s")
    print(f"a/b = {stage / bare:.2f} end to end, {steady / bare:.2f} after startup (target >= 0.85)")
    print(f"b/c = {bare / naive:.2f} (target >= 3)")
    return {"images": n_images, "stage": stage, "steady": steady, "bare": bare, "naive": naive,
            "startup_s": summary.startup_s}


def main():
    run(parser().parse_args())


if __name__ == "__main__":
    main()
