"""The main job: `capfilt demo --quick` end to end (world served on 127.0.0.1, embedded Ray and Prefect)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_quick_bootstraps_evaluates_and_writes_the_report(tmp_path):
    # As a user runs it: its own process, its own temporary Prefect server and local Ray.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PREFECT_API_URL")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    done = subprocess.run([str(Path(sys.executable).parent / "capfilt"), "demo", "--quick", "--root", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed = done.stdout
    report = tmp_path / "runs" / "demo-quick" / "report"
    assert f"report: {report / 'index.html'}" in printed
    for column in ("raw-r0", "capfilt-r1", "oracle"):
        assert column in printed
    assert "text->image R@1 (ITM rerank)" in printed and "kept-pair precision" in printed
    page = (report / "index.html").read_text()
    for part in ('id="verdict"', 'id="comparison"', "Funnel", "scores_hist.png", "training_curves.png",
                 "Headline metrics", "../../demo-quick-r1/report/filter.html"):
        assert part in page
    for image in ("scores_hist.png", "training_curves.png"):
        assert (report / image).stat().st_size > 1000
    evaluations = json.loads((report / "evaluation.json").read_text())
    assert set(evaluations) == {"raw-r0", "capfilt-r1", "oracle"}
    for name, ev in evaluations.items():
        assert ev["eval_set"]["source"] == "heldout_world" and ev["eval_set"]["images"] == 200
        t2i = ev["retrieval"]["itm"]["text_to_image"]
        assert 0 <= t2i["r1"] <= t2i["r5"] <= t2i["r10"] <= 1
        assert ev["captioning"]["images"] == 200 and 0 <= ev["attributes"]["attribute_accuracy"] <= 1
    # both rounds' filters judged against the ground truth; round 1's ITM scored every web caption
    r1, r0 = evaluations["capfilt-r1"]["filter"], evaluations["raw-r0"]["filter"]
    assert r0["all"]["pairs"] > 0 and r1["all"]["kept"] > 0
    assert r1["auc_clean_vs_corrupted_web"]["itm_score"]["auc"] is not None
