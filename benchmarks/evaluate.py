"""Evaluation's ITM re-ranking: passes of many pairs vs one forward per query, on a toy-sized Q-Former.

    uv run python benchmarks/evaluate.py [--images 600] [--k 16] [--repeats 2]

Builds a randomly initialised Q-Former of the toy preset's sizes (model/configs/qformer-toy.json)
over a tiny CLIP vision encoder, renders --images scenes of the synthetic world with one true
caption each, then re-ranks the ITC top k both ways (image->text, text->image) as `capfilt eval`
does (`pipeline/evaluate.stage1_retrieval`):
  (a) capfilt: every query's candidates through `Stage1Scorer.pair_logits`, 256 pairs a pass,
      each pass's distinct images' cross-attention keys and values projected once,
  (b) baseline: one Q-Former forward per query over its k candidates (the image copied k times
      image->text), as evaluation did before.
Prints seconds of each (best of --repeats), the ratio b/a, for how many queries both rank alike,
and their logits' largest difference (float rounding: the pairs are batched differently, so
candidates whose scores differ by less than that may swap; a random model has many such ties).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model.toy.scenes import render, true_caption  # noqa: E402
from pipeline.metrics import rerank  # noqa: E402


def per_query(scorer, tokens, ids, mask, image_to_text: bool):
    """The baseline: each query's k candidates in one forward of their own."""
    def logits(queries, cand):
        rows = []
        for q, c in zip(queries.tolist(), cand):
            n = len(c)
            if image_to_text:
                rows.append(scorer.model.itm_logits(tokens[q:q + 1].expand(n, -1, -1), ids[c], mask[c])[:, 1])
            else:
                rows.append(scorer.model.itm_logits(tokens[c], ids[q:q + 1].expand(n, -1), mask[q:q + 1].expand(n, -1))[:, 1])
        return torch.stack(rows)
    return logits


def batched(scorer, tokens, ids, mask, image_to_text: bool):
    def logits(queries, cand):
        rows = queries.repeat_interleave(cand.shape[1])
        pairs = (rows, cand.flatten()) if image_to_text else (cand.flatten(), rows)
        return scorer.pair_logits(tokens, ids, mask, *pairs).view(cand.shape)
    return logits


def run(args) -> dict:
    from model.qformer import QFormer, config_for_tokenizer, load_tokenizer
    from model.stage1_inference import Stage1Scorer
    from model.vision import load_vision_encoder
    from stage1_world import make_clip_vision, make_tokenizer, scenes

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="capfilt-bench-eval-"))
    tokenizer = load_tokenizer(make_tokenizer(work / "tok"))
    encoder = load_vision_encoder(make_clip_vision(work / "clip"), device="cpu")
    sizes = json.loads((Path(__file__).resolve().parents[1] / "model" / "configs" / "qformer-toy.json").read_text())
    torch.manual_seed(0)
    model = QFormer(config_for_tokenizer(tokenizer, **sizes, vision_width=encoder.width))
    with torch.no_grad():  # an untrained head's logits differ by ~1e-4 between pairs, below float rounding: spread them
        model.itm_head.weight.mul_(1000)
    scorer = Stage1Scorer(model, tokenizer, encoder, torch.device("cpu"))
    rng = np.random.default_rng(0)
    world = scenes(args.images, 0)
    images = [render(attrs, 32, rng) for attrs in world]
    texts = [true_caption(attrs) for attrs in world]
    with torch.no_grad():
        tokens = scorer._tokens(images)
        ids, mask = scorer._text(texts)
        sims = torch.einsum("td,nqd->tnq", model.text_features(ids, mask), model.image_features(tokens)).amax(dim=-1)
        result = {"images": args.images, "k": args.k}
        for way, image_to_text, matrix in (("image_to_text", True, sims.T), ("text_to_image", False, sims)):
            times, ranked, logits = {}, {}, {}
            top = matrix.argsort(dim=1, descending=True, stable=True)[:, :args.k]
            for name, make in (("capfilt", batched), ("baseline", per_query)):
                fn = make(scorer, tokens, ids, mask, image_to_text)
                logits[name] = fn(torch.arange(len(top)), top)
                best = float("inf")
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    ranked[name] = rerank(matrix, args.k, fn)
                    best = min(best, time.perf_counter() - started)
                times[name] = best
            same = sum(a == b for a, b in zip(ranked["capfilt"], ranked["baseline"]))
            diff = float((logits["capfilt"] - logits["baseline"]).abs().max())
            print(f"{way}: {args.images} queries x top {args.k}: passes of many pairs {times['capfilt']:.2f} s, one forward "
                  f"per query {times['baseline']:.2f} s ({times['baseline'] / times['capfilt']:.2f}x); same ranking for "
                  f"{same} of {len(top)} queries (the rest: near-ties within rounding); largest logit difference {diff:.1e} (logits' spread {float(logits['baseline'].std()):.2f})")
            result[way] = {**times, "same": same, "max_logit_diff": diff}
    return result


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--k", type=int, default=16, help="ITC top k re-ranked (capfilt eval --rerank-k)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    return parser


def main():
    run(parser().parse_args())


if __name__ == "__main__":
    main()
