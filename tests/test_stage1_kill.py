"""Acceptance: `capfilt train stage1` SIGKILLed after its first checkpoint and rerun reproduces
the uninterrupted run's losses and weights (a real kill, not --stop-at)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.qformer import QFormer
from stage1_world import make_clip_vision, make_curated_run, make_tokenizer

pytestmark = pytest.mark.slow

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_query_tokens=8,
            embed_dim=32, max_position_embeddings=64)
STEPS = 8


def start(args: list[str], log: Path) -> subprocess.Popen:
    # One thread each: two of these run side by side, and the same thread count on both sides
    # keeps CPU reductions in the same order.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "capfilt.cli", *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def losses(out: Path) -> list[dict]:
    keys = ("step", "loss", "itc", "itm", "itg", "itm_accuracy", "temp", "lr", "epoch", "batch_in_epoch")
    return [{k: r[k] for k in keys} for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_sigkilled_training_resumes_to_the_same_losses(tmp_path):
    make_curated_run(tmp_path / "data", "r1", images=24, seed=0)
    common = ["train", "stage1", "--root", str(tmp_path / "data"), "--run", "r1",
              "--vision", make_clip_vision(tmp_path / "clip"), "--tokenizer", str(make_tokenizer(tmp_path / "tok")),
              "--bert", "none", "--model-config", json.dumps(TINY), "--steps", str(STEPS), "--batch-size", "8",
              "--lr", "1e-3", "--warmup-steps", "4", "--log-every", "1", "--checkpoint-every", "2", "--device", "cpu"]
    # Augmentation stays on: crops, flips and dropout all have to come back in step after the kill.
    straight_out, killed_out = tmp_path / "straight", tmp_path / "killed"
    straight = start(common + ["--out", str(straight_out)], tmp_path / "straight.log")
    victim = start(common + ["--out", str(killed_out)], tmp_path / "victim.log")
    pointer = killed_out / "latest"
    deadline = time.monotonic() + 120
    while not pointer.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL, (tmp_path / "victim.log").read_text()[-2000:]
    killed_at = int(pointer.read_text().strip().split("-")[1])
    logged = losses(killed_out)[-1]["step"]
    assert killed_at < STEPS and logged < STEPS, "the run finished before the kill: nothing was resumed"

    resumed = start(common + ["--out", str(killed_out)], tmp_path / "resumed.log")
    assert resumed.wait(timeout=120) == 0, (tmp_path / "resumed.log").read_text()[-2000:]
    assert straight.wait(timeout=120) == 0, (tmp_path / "straight.log").read_text()[-2000:]

    a, b = losses(straight_out), losses(killed_out)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))  # lines past the checkpoint were dropped, once
    # Exact: both processes run the same fp32 CPU kernels on the same threads, and the checkpoint
    # restores weights, AdamW moments, LR schedule, torch and ITM-sampling RNG states and the data
    # position, so nothing differs; the log rounds to 6 decimals, and the weights must match bit
    # for bit too.
    assert a == b
    final = f"step-{STEPS:08d}"
    m1 = QFormer.from_pretrained(straight_out / final / "model").state_dict()
    m2 = QFormer.from_pretrained(killed_out / final / "model").state_dict()
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    print(f"killed with latest -> step {killed_at}, {logged} steps logged; resumed to {STEPS}")
