"""The toy preset's pretrained Stage 2: the toy captioner trained by Stage 2's own trainer
(model/stage2.py) from the pretrained Stage 1 (stage1.py) and the toy LM, on the pretraining
world's pairs that the world did not corrupt.

It stands in for a public BLIP-2 captioning checkpoint, a model pretrained on other, cleaned data
(BLIP-2's was pretrained on CapFilt-ed captions). BLIP's captioner finetuned from it writes captions
it learnt from clean text; finetuned from the round's own Stage 2, which learnt the source's web
captions (40% corrupted in the demo world), it names the attributes of a scene about half the time
(README, "A captioner that never learnt the source's noise").
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Sequence

from .preset import STAGE2_RECIPE, TOY_STAGE1, TOY_STAGE2, ToyPreset
from .training import threads


def pretrain_stage2(pairs: Sequence[tuple[bytes, str]], out: str | Path, preset: ToyPreset) -> dict:
    """Stage 2 (LM loss through the frozen toy LM) on (image bytes, caption) pairs into `out`/stage2,
    from the Stage 1 in `out`/stage1, with the toy preset's Stage 2 recipe and `preset.stage2_steps`
    steps. Returns its figures."""
    from ..data import CuratedImage
    from ..stage2 import Stage2Config, train

    out = Path(out)
    folder = out / TOY_STAGE2
    shutil.rmtree(folder, ignore_errors=True)  # a folder of other settings would be resumed, not retrained
    steps = preset.stage2_steps
    images = [CuratedImage(f"toy-pretrain/{i}", image, [caption]) for i, (image, caption) in enumerate(pairs)]
    config = Stage2Config(root=str(out), run="", out=str(folder), stage1=str(out / TOY_STAGE1), llm=str(out / "lm"),
                          steps=steps, **STAGE2_RECIPE, log_every=50, checkpoint_every=steps, seed=preset.seed,
                          progress=False)
    started = time.perf_counter()
    with threads(preset.threads):
        result = train(config, images=images, lineage={"toy_pretrain": str(out), "pairs": len(images)})
    last = result["metrics"][-1] if result["metrics"] else {}
    return {"steps": result["step"], "pairs": len(images), "checkpoint": result["checkpoint"],
            "loss_last": last.get("loss"), "seconds": time.perf_counter() - started}
