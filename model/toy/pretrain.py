"""All the toy pieces (tokenizer, BERT, CLIP, LM, and a Stage 1 and Stage 2 where the preset asks) from an ingested
run's or a world's pairs, in one folder."""

from __future__ import annotations

import io
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Sequence

from capfilt.environment import usable_cpus
from capfilt.errors import ConfigError

from .bert import pretrain_bert
from .clip import pretrain_clip
from .lm import pretrain_lm
from .preset import ToyPreset
from .stage1 import pretrain_stage1
from .stage2 import pretrain_stage2
from .tokenizer import train_text_tokenizer


TOY_DONE = "toy_pretrain.json"  # written last: its presence means the folder is complete


def run_pairs(root: str, run: str) -> tuple[list[tuple[bytes, str]], dict]:
    """(image bytes, web caption) of a run's distinct images that decode and have a caption, and counts
    of what was left out (exact duplicate bytes, empty captions, undecodable images)."""
    from PIL import Image

    from pipeline.run_store import RunStore
    from schemas import IMAGES

    store = RunStore(root, run)
    if not store.shards("images"):
        raise ConfigError(f"run '{run}' under {root} has no images/; run `capfilt ingest` for it first.")
    table = store.read("images", IMAGES).select(["sample_id", "image", "caption", "sha256"])
    pairs, seen = [], set()
    counts = {"images": table.num_rows, "duplicates": 0, "empty_caption": 0, "undecodable": 0}
    for row in table.to_pylist():
        key = row["sha256"] or row["sample_id"]
        if key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        caption = (row["caption"] or "").strip()
        if not caption:
            counts["empty_caption"] += 1
            continue
        try:
            Image.open(io.BytesIO(row["image"])).convert("RGB")
        except Exception:  # noqa: BLE001 - PIL raises many types; such rows are counted, not trained on
            counts["undecodable"] += 1
            continue
        pairs.append((row["image"], caption))
    counts["pairs"] = len(pairs)
    return pairs, counts


def pretrain_toy(root: str, run: str, out: str | Path, preset: ToyPreset = ToyPreset()) -> dict:
    """Train the toy preset's frozen pieces on a run's raw web pairs into `out`:
    `tokenizer/` (Q-Former WordPiece), `bert/` (masked-LM BERT the Q-Former starts from), `clip/`
    (open_clip local-dir) and `lm/` (causal LM).

    A folder already complete for the same run and preset is reused (a rerun of a flow resumes).
    """
    out = Path(out)
    done = out / TOY_DONE
    if done.exists():
        info = json.loads(done.read_text())
        if info.get("run") == run and info.get("preset") == asdict(preset):
            return {**info, "reused": True}
    pairs, counts = run_pairs(root, run)
    if len(pairs) < 2:
        raise ConfigError(f"run '{run}' under {root} has {len(pairs)} usable (image, caption) pairs ({counts}); "
                          f"the toy preset needs at least 2 to pretrain on.")
    return pretrain_toy_pairs(pairs, out, preset, about={"root": str(root), "run": run, "counts": counts})


def _lm_settings(preset: ToyPreset) -> dict:
    """What the LM depends on: its own fields and the seed (its tokenizer is its own)."""
    return {k: v for k, v in asdict(preset).items() if k.startswith("lm_") or k in ("seed", "threads")}


def _vision_settings(preset: ToyPreset) -> dict:
    """What the tokenizer, BERT and CLIP depend on: everything but the LM's and the Stages' fields."""
    return {k: v for k, v in asdict(preset).items() if not k.startswith(("lm_", "stage1_", "stage2_"))}


def _stage1_settings(preset: ToyPreset) -> dict:
    """What the pretrained Stage 1 depends on besides the tokenizer, BERT and CLIP it reads."""
    return {k: v for k, v in asdict(preset).items() if k.startswith("stage1_") or k in ("seed", "threads")}


def _stage1_of(before: dict) -> dict:
    """The settings a folder's pretrained Stage 1 was trained with (older folders: its preset's)."""
    return before["stage1"].get("settings") or _stage1_settings(ToyPreset(**before["preset"]))


def _stage2_settings(preset: ToyPreset, stage1: dict) -> dict:
    """What the pretrained Stage 2 depends on besides its pairs: its steps, the Stage 1 it starts
    from and the LM it reads."""
    return {"stage2_steps": preset.stage2_steps, "stage1": stage1, "lm": _lm_settings(preset)}


def pretrain_toy_pairs(pairs: Sequence[tuple[bytes, str]], out: str | Path, preset: ToyPreset = ToyPreset(),
                       about: dict | None = None, lm: bool = True,
                       eval_pairs: Sequence[tuple[bytes, str]] | None = None, extra_texts: Sequence[str] = (),
                       clip_pairs: Sequence[tuple[bytes, str]] | None = None,
                       caption_pairs: Sequence[tuple[bytes, str]] | None = None) -> dict:
    """The toy pieces from (image bytes, caption) pairs into `out`; the CLIP from `clip_pairs` instead
    when given (a contrastive model needs more images than the text pieces need texts), the Stage 2
    (`preset.stage2_steps`) from `caption_pairs` (a captioner learns what its captions say). `about` says
    where the pairs came from and is what a rerun must match (with the preset) to reuse a complete folder. A folder made
    from the same pairs with other LM settings keeps its tokenizer, BERT and CLIP (minutes of
    training) and trains the LM anew; and the other way round."""
    out = Path(out)
    about = dict(about or {})
    done = out / TOY_DONE
    before = json.loads(done.read_text()) if done.exists() else None
    same_pairs = before is not None and all(before.get(k) == v for k, v in about.items())
    if same_pairs and before.get("preset") == asdict(preset) and (before.get("lm") is not None or not lm):
        return {**before, "reused": True}
    keep_vision = same_pairs and _vision_settings(ToyPreset(**before["preset"])) == _vision_settings(preset)
    keep_lm = (same_pairs and lm and before.get("lm") is not None
               and _lm_settings(ToyPreset(**before["preset"])) == _lm_settings(preset))
    # a pretrained Stage 1 of these pieces is kept where its settings are asked for, or where none is
    # asked for (the bootstrap flow trains it in a second step, beside round 0's trainings: its first
    # step, which asks for none, must not undo it on a rerun)
    keep_stage1 = (keep_vision and before.get("stage1") is not None
                   and (preset.stage1_steps == 0 or _stage1_of(before) == _stage1_settings(preset)))
    stage1_settings = _stage1_of(before) if keep_stage1 else _stage1_settings(preset)
    # so is its Stage 2, which also reads the LM
    keep_stage2 = (keep_stage1 and keep_lm and before.get("stage2") is not None
                   and (preset.stage2_steps == 0 or before["stage2"].get("settings")
                        == _stage2_settings(preset, stage1_settings)))
    if preset.stage2_steps and not keep_stage2 and not (caption_pairs and (keep_stage1 or preset.stage1_steps)):
        raise ConfigError("toy preset: stage2_steps needs caption pairs and a Stage 1 to start from (stage1_steps > 0); "
                          "the toy Stage 2 is pretrained on a pretraining world's clean pairs (--world-images).")
    started = time.perf_counter()
    texts = [caption for _, caption in pairs] + list(extra_texts)  # the text pieces also read `extra_texts`
    train_lm = lm and not keep_lm
    with _side_process(train_lm and not keep_vision, preset.threads) as side:
        # The LM reads only the texts: on a machine with a core to spare it trains in a second
        # process while this one trains the tokenizer, BERT and CLIP (models this small do not get
        # faster with a second intra-op thread: Stage 1 ran 300 steps in 28.0 s on 1 thread and
        # 27.7 s on 2), and the result is the same, each piece seeded on its own.
        lm_job = side.submit(_lm_metrics, texts, out / "lm", preset) if side and train_lm else None
        if keep_vision:
            bert, clip_metrics = before["bert"], before["clip"]
        else:
            train_text_tokenizer(texts, out / "tokenizer", preset)
            bert = pretrain_bert(texts, out / "bert", out / "tokenizer", preset)
            clip_metrics = pretrain_clip(clip_pairs or pairs, out / "clip", preset, eval_pairs=eval_pairs).metrics
        # the Stage 1 reads the CLIP, tokenizer and BERT, and learns from the CLIP's pairs
        stage1 = ({**before["stage1"], "settings": stage1_settings} if keep_stage1 else
                  {**pretrain_stage1(clip_pairs or pairs, out, preset), "settings": stage1_settings}
                  if preset.stage1_steps else None)
        if not train_lm:
            lm_metrics = before["lm"] if keep_lm else None
        elif lm_job is not None:
            lm_metrics = {**lm_job.result(), "process": "beside the CLIP's"}
        else:
            lm_metrics = _lm_metrics(texts, out / "lm", preset)
        # the Stage 2 starts from the Stage 1 and reads the LM
        stage2 = (before["stage2"] if keep_stage2 else
                  {**pretrain_stage2(caption_pairs, out, preset), "settings": _stage2_settings(preset, stage1_settings)}
                  if preset.stage2_steps else None)
    info = {**about, "preset": asdict(preset), "bert": bert, "clip": clip_metrics, "lm": lm_metrics, "stage1": stage1,
            "stage2": stage2, "seconds": time.perf_counter() - started,
            "kept": [piece for piece, kept in (("tokenizer+bert+clip", keep_vision), ("lm", keep_lm),
                                               ("stage1", keep_stage1), ("stage2", keep_stage2)) if kept]}
    out.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(info, indent=1, sort_keys=True))
    return {**info, "reused": False}


def _lm_metrics(texts: Sequence[str], folder: Path, preset: ToyPreset) -> dict:
    return pretrain_lm(texts, folder, preset).metrics


@contextmanager
def _side_process(wanted: bool, threads: int) -> Iterator[ProcessPoolExecutor | None]:
    """A one-worker process pool (spawned: a fresh interpreter, no forked torch state) when asked
    and when this process may use twice the pieces' intra-op threads; else None."""
    if not (wanted and usable_cpus() >= 2 * threads):
        yield None
        return
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
