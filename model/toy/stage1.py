"""The toy preset's pretrained Stage 1: the toy Q-Former trained by Stage 1's own trainer
(model/train_stage1.py) on the pretraining world's pairs, the ones the toy CLIP learnt from.

It stands in for a public BLIP-2 Stage 1 checkpoint: a model pretrained on other data. BLIP's
filter finetuned from it has never learnt the pairs it judges; finetuned from the round's own
Stage 1, which saw each of the source's pairs about a hundred times, noise included, it remembers
them (README, "Why the filter's ITM stays below 0.95").
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Sequence

from .preset import STAGE1_RECIPE, TOY_STAGE1, ToyPreset
from .training import threads


def pretrain_stage1(pairs: Sequence[tuple[bytes, str]], out: str | Path, preset: ToyPreset) -> dict:
    """Stage 1 (ITC + ITM + ITG) on (image bytes, caption) pairs into `out`/stage1, with the toy
    preset's Stage 1 recipe (capfilt/presets.py) and `preset.stage1_steps` steps, reading the toy
    CLIP, tokenizer and BERT already in `out`. Returns its figures."""
    from ..data import CuratedImage
    from ..factory import architecture
    from ..train_stage1 import Stage1Config, train

    out = Path(out)
    folder = out / TOY_STAGE1
    shutil.rmtree(folder, ignore_errors=True)  # a folder of other settings would be resumed, not retrained
    steps = preset.stage1_steps
    images = [CuratedImage(f"toy-pretrain/{i}", image, [caption]) for i, (image, caption) in enumerate(pairs)]
    # run "": trained on pairs in memory, on no curated run (--folds, which retrains a Stage 1's run, says so)
    config = Stage1Config(root=str(out), run="", out=str(folder), vision=f"open_clip:local-dir:{out / 'clip'}",
                          tokenizer=str(out / "tokenizer"), bert=str(out / "bert"), model=architecture("qformer-toy"),
                          steps=steps, itm_random_negative_steps=steps, **STAGE1_RECIPE, log_every=50,
                          checkpoint_every=steps, seed=preset.seed, progress=False)
    started = time.perf_counter()
    with threads(preset.threads):
        result = train(config, images=images, lineage={"toy_pretrain": str(out), "pairs": len(images)})
    last = result["metrics"][-1] if result["metrics"] else {}
    return {"steps": result["step"], "pairs": len(images), "checkpoint": result["checkpoint"],
            "loss_last": last.get("loss"), "itm_accuracy_last": last.get("itm_accuracy"),
            "seconds": time.perf_counter() - started}
