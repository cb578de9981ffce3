"""Acceptance: `capfilt train stage1` on a curated synthetic run, killed and resumed, learns."""

from __future__ import annotations

import json

import pytest

from capfilt.cli import main
from stage1_world import make_clip_vision, make_curated_run, make_tokenizer

pytestmark = pytest.mark.slow

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_query_tokens=8,
            embed_dim=32, max_position_embeddings=64)


# From a random init (no BERT here) ITC first sits on the uniform plateau (loss log 16) and leaves
# it after a number of steps that depends on the seed and on float rounding: measured with this
# config, seeds 1/2/3 left it at about step 140/60/100 and seed 0 not within 200. Seed 2 leaves
# the most margin, and 300 steps leave room after it (measured: ITC 2.77 -> 1.59, held-out
# R@1 0.44); a change that moves the escape past ~200 steps for several seeds is a regression.
# ITM from scratch first learns only its label prior (1 match : 2 non-matches, loss 0.637) and
# needs a trained ITC for more (test_qformer says the same): it must not end above the prior.
SEED = 2


def test_train_stage1_cli_learns_and_resumes(tmp_path):
    from model.stage1_inference import Stage1Scorer, recall_at_1
    from model.train_stage1 import load_curated_images, split_holdout

    make_curated_run(tmp_path / "data", "r1", images=96, seed=0)
    out = tmp_path / "out"
    args = ["train", "stage1", "--root", str(tmp_path / "data"), "--from-run", "r1",
            "--vision", make_clip_vision(tmp_path / "clip"), "--out", str(out),
            "--tokenizer", str(make_tokenizer(tmp_path / "tok")), "--bert", "none", "--model-config", json.dumps(TINY),
            "--steps", "300", "--batch-size", "16", "--lr", "2e-3", "--warmup-steps", "20", "--no-augment",
            "--holdout-images", "16", "--log-every", "20", "--checkpoint-every", "50", "--seed", str(SEED)]
    main(args + ["--stop-at", "100"])  # killed at step 100
    main(args)  # resumed from the step-100 checkpoint
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(20, 301, 20))
    first, last = log[0], log[-1]
    assert last["itc"] < 0.85 * first["itc"] and last["itg"] < 0.6 * first["itg"]
    assert last["itm"] < 0.64  # at or below its label prior

    images = load_curated_images(str(tmp_path / "data"), "r1")
    _, held_out = split_holdout(images, 16, seed=SEED)
    scorer = Stage1Scorer.from_checkpoint(out)
    ranked = scorer.retrieve_images([im.captions[0] for im in held_out], [im.image for im in held_out], k=8)
    assert recall_at_1(ranked, list(range(16))) >= 4 / 16  # chance is 1/16
