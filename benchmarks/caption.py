"""Caption stage throughput vs a bare batched `generate` loop and a naive one-image-at-a-time loop.

    uv run python benchmarks/caption.py [--images 192] [--batch-size 16] [--num-captions 4]

All use the same compute (--threads torch threads; the stage one actor with that many cores),
the same model, images and batch size, measured in one run. Builds a randomly initialised BLIP
big enough that one batch takes >= 0.2 s on CPU, writes a run with `images/` shards of rendered
scenes, then measures images/s of
  (a) the stage: `caption.run` end to end as a user runs it (executor "auto": a run this small
      goes to the driver process, pipeline/model_stage.py; model load, decode, generate, commit),
  (a') the stage on Ray ("ray"): the same end to end on one Ray actor (actor start, its imports
      and model load included; Ray itself is started before, and its time printed apart),
  (b) a bare loop: the same decoded images through processor + `model.generate` in batches,
  (c) naive: processor + `model.generate` one image at a time,
and prints a/b (target >= 0.85: the stage adds little over batched generation), a'/b (the Ray
path's start-up, reported) and b/c (target >= 3: batching pays).
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
from pipeline import caption  # noqa: E402
from pipeline.caption import CaptionConfig, decode_image  # noqa: E402
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
    shards = 4
    stores = {executor: RunStore(str(work / "root"), f"bench-{executor}") for executor in ("auto", "ray")}
    for store in stores.values():
        commit_image_shards(store, {f"s{i}": args.images // shards for i in range(shards)})
    n_images = (args.images // shards) * shards
    images = [decode_image(data) for data in stores["auto"].read("images").column("image").to_pylist()]
    captioner = load_captioner(folder, device="cpu")
    print(f"captioner: BLIP width {args.width}, {args.layers} layers, 96 px; {args.num_captions} captions x "
          f"{decoding.max_length} tokens; batch {args.batch_size}; torch threads {torch.get_num_threads()}")

    bare_generate(captioner, images[: args.batch_size], decoding, args.batch_size)  # warm-up
    start = time.perf_counter()
    bare_generate(captioner, images[: args.batch_size], decoding, args.batch_size)
    print(f"one batch of {args.batch_size}: {time.perf_counter() - start:.2f} s (must be >= 0.2 s)")

    naive_images = images[: args.naive_images]
    start = time.perf_counter()
    bare_generate(captioner, naive_images, decoding, 1)
    naive = len(naive_images) / (time.perf_counter() - start)

    def bare_s() -> float:
        start = time.perf_counter()
        bare_generate(captioner, images, decoding, args.batch_size)
        return time.perf_counter() - start

    # The bare loop runs before and after each stage run, and a stage is compared with the mean of
    # the two around it: on a machine shared with other work the speed drifts within minutes.
    bares = [bare_s()]
    stage = {}
    for executor, store in stores.items():
        ray_start = 0.0
        if executor == "ray":  # "local": a fresh Ray of our own, never a cluster someone else started
            started = time.perf_counter()
            ray_env.ensure_ray(address="local")
            ray_start = time.perf_counter() - started
        start = time.perf_counter()
        summary = caption.run(store, CaptionConfig(captioner=folder, decoding=decoding, batch_size=args.batch_size,
                                                   actors=1, cpus_per_actor=args.threads, executor=executor))
        total = time.perf_counter() - start
        assert summary.kept == n_images, summary.line()
        bares.append(bare_s())
        stage[executor] = {"end_to_end": n_images / total, "startup_s": total - summary.seconds + summary.startup_s,
                           "steady": n_images / (summary.seconds - summary.startup_s), "executor": summary.executor,
                           "bare": n_images / ((bares[-2] + bares[-1]) / 2)}
        print(f"    executor {executor}: {summary.line()}")
        print(f"    start-up until the first batch (model check, {'Ray job, actor process, ' if executor == 'ray' else ''}"
              f"model load): {stage[executor]['startup_s']:.1f} s" + (f"; Ray init before it {ray_start:.1f} s" if ray_start else ""))
    auto, on_ray = stage["auto"], stage["ray"]
    print(f"(a)  stage ({auto['executor']:5}) {auto['end_to_end']:7.2f} images/s end to end; {auto['steady']:.2f} after start-up")
    print(f"(a') stage (ray)   {on_ray['end_to_end']:7.2f} images/s end to end; {on_ray['steady']:.2f} once the actor runs")
    print(f"(b)  bare batched  {', '.join(f'{n_images / s:.2f}' for s in bares)} images/s (before (a), between, after (a'))")
    print(f"(c)  naive 1-by-1  {naive:7.2f} images/s")
    print(f"a/b  = {auto['end_to_end'] / auto['bare']:.2f} end to end (target >= 0.85), {auto['steady'] / auto['bare']:.2f} after start-up")
    print(f"a'/b = {on_ray['end_to_end'] / on_ray['bare']:.2f} end to end on Ray, {on_ray['steady'] / on_ray['bare']:.2f} once the actor runs")
    bare = n_images / (sum(bares) / len(bares))
    print(f"b/c  = {bare / naive:.2f} (target >= 3)")
    return {"images": n_images, "stage": auto["end_to_end"], "steady": auto["steady"], "executor": auto["executor"],
            "startup_s": auto["startup_s"], "bare": auto["bare"], "ray": on_ray["end_to_end"], "ray_steady": on_ray["steady"],
            "ray_startup_s": on_ray["startup_s"], "ray_bare": on_ray["bare"], "naive": naive}


def main():
    run(parser().parse_args())


if __name__ == "__main__":
    main()
