"""Evaluation: retrieval, captioning, attribute accuracy and filter quality of a run.

`run_eval` reads a run, picks an evaluation set, loads the models, runs them (`stage1_retrieval`,
`generate_captions`) and hands what they return to the pure metrics of pipeline/metrics.py:

  retrieval      R@1/5/10 image->text and text->image with a Stage 1 checkpoint: ITC ranking,
                 then the ITC top-k re-ranked by ITM logit + ITC similarity (BLIP-2 / LAVIS).
  captioning     BLEU-4 and CIDEr (pycocoevalcap's scorers) of one generated caption per image.
  attributes     on a synthetic world: how many of an image's attributes a caption gets right.
  filter         on a synthetic world: precision / recall of the kept pairs and ROC-AUC of each
                 score column for telling clean web captions from corrupted ones.

Evaluation set: a held-out synthetic world (`heldout`: a world folder no model trained on, its
true captions as clean references) when given; otherwise the images the Stage 1 checkpoint held out of training (stage1.json records
`holdout_images`, and `split_holdout` picks the same ones again) when there are any; otherwise
the run's own images, flagged `in_sample` in the output. References are the ground truth's true
captions when a sidecar is given (clean), otherwise the run's curated captions.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from capfilt.errors import ConfigError
from model.toy.scenes import ATTRIBUTES
from pipeline.metrics import (attribute_accuracy, caption_correct, caption_scores, filter_quality, recall_at_k,
                              relevance, rerank)


# -- running the models --------------------------------------------------------------------------

def stage1_retrieval(scorer, images: list[bytes], texts: list[str], text_image: list[int], k: int = 16,
                     batch_size: int = 64, score: str = "itm+itc") -> dict:
    """R@1/5/10 both ways with a `Stage1Scorer`, by ITC alone and by ITC then ITM re-ranking of the top k.

    Image tokens and text ids are computed once and shared by both directions (the scorer's
    `retrieve_images` recomputes them per call and has no image->text counterpart).
    """
    import torch

    with torch.no_grad():
        tokens = torch.cat([scorer._tokens(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
        image_feats = scorer.model.image_features(tokens)  # (N, Q, D)
        ids, mask = scorer._text(texts)
        text_feats = scorer.model.text_features(ids, mask)  # (T, D)
        # BLIP-2's ITC similarity of an image and a text: the best of its query tokens
        sims = torch.einsum("td,nqd->tnq", text_feats, image_feats).amax(dim=-1).float().cpu()  # (T, N)

        # ITM re-ranking scores every query's top k in passes of many pairs (Stage1Scorer.pair_logits)
        def i2t_logit(queries, cand):
            return scorer.pair_logits(tokens, ids, mask, queries.repeat_interleave(cand.shape[1]), cand.flatten()).view(cand.shape)

        def t2i_logit(queries, cand):
            return scorer.pair_logits(tokens, ids, mask, cand.flatten(), queries.repeat_interleave(cand.shape[1])).view(cand.shape)

        i2t_rel, t2i_rel = relevance(texts, text_image, len(images))
        itc_i2t = sims.T.argsort(dim=1, descending=True, stable=True).tolist()
        itc_t2i = sims.argsort(dim=1, descending=True, stable=True).tolist()
        return {
            "images": len(images), "texts": len(texts), "rerank_k": k, "rerank_score": score,
            "itc": {"image_to_text": recall_at_k(itc_i2t, i2t_rel), "text_to_image": recall_at_k(itc_t2i, t2i_rel)},
            "itm": {"image_to_text": recall_at_k(rerank(sims.T, k, i2t_logit, score), i2t_rel),
                    "text_to_image": recall_at_k(rerank(sims, k, t2i_logit, score), t2i_rel)},
        }


def generate_captions(captioner, images: list[bytes], decoding, seed: int = 0, batch_size: int = 16) -> list[str]:
    """One caption per image (the first of `decoding.num_captions`), seeded per image index."""
    from PIL import Image

    from model.captioners import caption_seed

    captions = []
    for start in range(0, len(images), batch_size):
        batch = [Image.open(io.BytesIO(b)).convert("RGB") for b in images[start:start + batch_size]]
        seeds = [[caption_seed(seed, str(start + i), j) for j in range(decoding.num_captions)] for i in range(len(batch))]
        captions += [c[0] for c in captioner.caption(batch, decoding, seeds)]
    return captions


# -- orchestration ------------------------------------------------------------------------------

@dataclass
class EvalImage:
    sample_id: str
    url: str | None
    image: bytes
    references: list[str]
    truth: dict | None = None


@dataclass(frozen=True)
class EvalConfig:
    root: str
    run: str
    stage1: str | None = None
    captioner: str | None = None
    truth: str | None = None
    max_images: int = 200
    rerank_k: int = 16
    rerank_score: str = "itm+itc"  # itm+itc (LAVIS) | itm
    num_beams: int = 3
    max_length: int = 30
    min_length: int = 1
    seed: int = 0
    device: str = "auto"
    clip_config: str | None = None  # open_clip configs to register first (a toy CLIP named in stage1.json)
    heldout: str | None = None  # a synthetic world folder: a clean evaluation set no model has seen

    def __post_init__(self):
        if self.max_images < 1 or self.rerank_k < 0 or self.num_beams < 1:
            raise ConfigError(f"--max-images and --num-beams must be >= 1 and --rerank-k >= 0 (got --max-images "
                              f"{self.max_images}, --num-beams {self.num_beams}, --rerank-k {self.rerank_k}).")
        if not (self.stage1 or self.captioner or self.truth):
            raise ConfigError("nothing to evaluate: give --stage1 (retrieval), --captioner (captions) and/or "
                              "--truth (filter quality on a synthetic world).")
        if self.rerank_score not in ("itm+itc", "itm"):
            raise ConfigError(f"--rerank-score must be itm+itc or itm, got {self.rerank_score!r}.")
        if not 1 <= self.min_length <= self.max_length:
            raise ConfigError(f"--min-new-tokens must be in [1, --max-new-tokens={self.max_length}], got {self.min_length}.")


def load_truth(path: str) -> dict[str, dict]:
    """Ground-truth rows of real images and their exact duplicates, by URL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not Path(path).exists():
        raise ConfigError(f"--truth {path}: no such file; a synthetic world writes ground_truth.parquet.")
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"--truth {path}: not a readable Parquet file ({exc}); point it at a synthetic world's "
                          f"ground_truth.parquet.") from exc
    missing = [c for c in ("url", "kind", "corrupted", "true_caption", *ATTRIBUTES) if rows and c not in rows[0]]
    if missing:
        raise ConfigError(f"--truth {path}: not a synthetic world's sidecar (no column(s) {missing}).")
    return {r["url"]: r for r in rows if r["kind"] in ("image", "duplicate")}


def _stage1_holdout(stage1: str) -> tuple[list[EvalImage], dict] | None:
    """The images a Stage 1 run kept out of training, or None when it kept none."""
    from model.data import load_curated_images, split_holdout
    from model.stage1_inference import stage1_checkpoint
    from pipeline.run_store import RunStore
    from schemas import CURATED

    info = stage1_checkpoint(stage1, f"--stage1 {stage1}").info  # its stage1.json: training config, curated run
    if not info:
        return None
    config = info.get("config", {})
    holdout = int(config.get("holdout_images") or 0)
    if not holdout:
        return None
    root, run = info["curated_run"]["root"], info["curated_run"]["run"]
    _, held = split_holdout(load_curated_images(root, run), holdout, int(config.get("seed", 0)))
    table = RunStore(root, run).read("curated", CURATED).select(["sample_id", "url"])
    url_of = dict(zip(table.column("sample_id").to_pylist(), table.column("url").to_pylist()))
    images = [EvalImage(im.sample_id, url_of.get(im.sample_id), im.image, list(dict.fromkeys(im.captions))) for im in held]
    return images, {"source": "stage1_holdout", "run": run, "in_sample": False}


def _run_images(root: str, run: str) -> list[EvalImage]:
    """Distinct images of a run (images/ when it was ingested, else curated/) with curated captions."""
    import pyarrow.compute as pc

    from pipeline.curated import read_columns
    from pipeline.run_store import RunStore
    from schemas import CURATED_IMAGES, IMAGES

    store = RunStore(root, run)
    curated = read_columns(store, "curated", ["sample_id", "caption"])
    captions: dict[str, list[str]] = {}
    for sid, caption in zip(curated.column("sample_id").to_pylist(), curated.column("caption").to_pylist()):
        captions.setdefault(sid, []).append(caption)
    if store.shards("images"):
        table = store.read("images", IMAGES).select(["sample_id", "url", "image", "sha256"])
    else:  # curated_images/ holds each image once, its bytes in the `image` struct
        table = store.read("curated_images", CURATED_IMAGES).select(["sample_id", "url", "image", "sha256"])
        table = table.set_column(2, "image", pc.struct_field(table.column("image"), "bytes"))
    images, seen = [], set()
    for row in table.to_pylist():
        key = row["sha256"] or row["sample_id"]
        if row["sample_id"] in seen or key in seen:
            continue  # exact duplicates would be two right answers that look like one
        seen.update((row["sample_id"], key))
        images.append(EvalImage(row["sample_id"], row["url"], row["image"], list(dict.fromkeys(captions.get(row["sample_id"], [])))))
    if not images:
        raise ConfigError(f"run '{run}' under {root} has no images or curated rows to evaluate on; run ingest/filter first.")
    return sorted(images, key=lambda im: im.sample_id)


def world_images(world: str) -> list[EvalImage]:
    """A synthetic world's distinct images with their true captions and attributes (clean references)."""
    import pyarrow.parquet as pq

    folder = Path(world)
    sidecar = folder / "ground_truth.parquet"
    if not sidecar.exists():
        raise ConfigError(f"--heldout {world}: not a synthetic world folder (no ground_truth.parquet); "
                          f"make one with `capfilt synth --out DIR --noise 0`.")
    images = []
    for row in sorted((r for r in pq.read_table(sidecar).to_pylist() if r["kind"] == "image"),
                      key=lambda r: r["image_index"]):
        path = folder / "files" / f"{row['image_index']:06d}.jpg"
        if not path.exists():
            raise ConfigError(f"--heldout {world}: image file {path} of {row['url']} is missing.")
        images.append(EvalImage(f"heldout/{row['image_index']}", row["url"], path.read_bytes(), [row["true_caption"]], row))
    if not images:
        raise ConfigError(f"--heldout {world}: the world has no images.")
    return images


def evaluation_set(config: EvalConfig, truth: dict[str, dict] | None) -> tuple[list[EvalImage], dict]:
    if config.heldout:
        images, info = world_images(config.heldout), {"source": "heldout_world", "world": config.heldout,
                                                     "in_sample": False, "references": "true_caption"}
        return _subsample(images, info, config)
    held = _stage1_holdout(config.stage1) if config.stage1 else None
    images, info = held or (_run_images(config.root, config.run),
                            {"source": "run_images", "run": config.run, "in_sample": True})
    if truth is not None:
        known = [im for im in images if im.url in truth and truth[im.url]["kind"] == "image"]
        info["without_truth"] = len(images) - len(known)  # duplicates and URLs the world does not know
        images = [EvalImage(im.sample_id, im.url, im.image, [truth[im.url]["true_caption"]], truth[im.url]) for im in known]
        info["references"] = "true_caption"
    else:
        info["without_references"] = sum(not im.references for im in images)
        images = [im for im in images if im.references]
        info["references"] = "curated_captions"
    return _subsample(images, info, config)


def _subsample(images: list[EvalImage], info: dict, config: EvalConfig) -> tuple[list[EvalImage], dict]:
    if len(images) > config.max_images:
        pick = np.random.default_rng([config.seed, 11]).permutation(len(images))[:config.max_images]
        images = [images[i] for i in sorted(pick)]
        info["subsampled_to"] = config.max_images
    info["images"] = len(images)
    return images, info


def filter_pairs(root: str, run: str, truth: dict[str, dict]) -> list[dict]:
    """Every scored pair of a run whose image the ground truth knows, with kept/correct/corrupted."""
    from pipeline.run_store import RunStore
    from schemas import CURATED, IMAGES, SCORES

    store = RunStore(root, run)
    scores = store.read("scores", SCORES)
    if scores.num_rows == 0:
        raise ConfigError(f"run '{run}' under {root} has no scores/; run `capfilt filter` for it to measure filter quality.")
    kept = set(store.read("curated", CURATED).column("caption_id").to_pylist())
    images = store.read("images", IMAGES).select(["sample_id", "url"])
    url_of = dict(zip(images.column("sample_id").to_pylist(), images.column("url").to_pylist()))
    pairs = []
    for row in scores.select(["sample_id", "caption_id", "caption_source", "caption", "clip_score", "itm_score"]).to_pylist():
        known = truth.get(url_of.get(row["sample_id"]))
        if known is None:
            continue
        pairs.append({**row, "kept": row["caption_id"] in kept, "correct": caption_correct(row["caption"], known),
                      "corrupted": bool(known["corrupted"]) if row["caption_source"] == "web" else None})
    return pairs


def run_eval(config: EvalConfig) -> dict:
    """All metrics the inputs allow, as one JSON-ready dict."""
    from model.captioners import Decoding

    truth = load_truth(config.truth) if config.truth else None
    result: dict = {"run": config.run, "root": config.root, "stage1": config.stage1, "captioner": config.captioner,
                    "truth": config.truth}
    if truth is not None:
        pairs = filter_pairs(config.root, config.run, truth)
        result["filter"] = {"pairs_with_truth": len(pairs), **filter_quality(pairs)}
    if not (config.stage1 or config.captioner):
        return result
    images, info = evaluation_set(config, truth)
    result["eval_set"] = info
    if not images:
        raise ConfigError(f"no evaluation images with references ({json.dumps(info)}).")
    if config.clip_config:
        from model.scorers import register_clip_config

        register_clip_config(config.clip_config)
    if config.stage1:
        from model.stage1_inference import Stage1Scorer

        scorer = Stage1Scorer.from_checkpoint(config.stage1, device=config.device)
        texts = [r for im in images for r in im.references]
        text_image = [i for i, im in enumerate(images) for _ in im.references]
        result["retrieval"] = stage1_retrieval(scorer, [im.image for im in images], texts, text_image, config.rerank_k,
                                               score=config.rerank_score)
    if config.captioner:
        from model.captioners import load_captioner

        decoding = Decoding(num_captions=1, num_beams=config.num_beams, max_length=config.max_length,
                            min_length=config.min_length,
                            seed=config.seed)
        captions = generate_captions(load_captioner(config.captioner, config.device), [im.image for im in images],
                                     decoding, config.seed)
        result["captioning"] = {**caption_scores(captions, [im.references for im in images]),
                                "decoding": json.loads(decoding.to_json()),
                                "samples": [{"sample_id": im.sample_id, "caption": c, "references": im.references}
                                            for im, c in list(zip(images, captions))[:5]]}
        if all(im.truth is not None for im in images):
            result["attributes"] = attribute_accuracy(captions, [im.truth for im in images])
    return result


def summary_lines(result: dict) -> list[str]:
    """A short human table of the headline numbers."""
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    lines = []
    if "eval_set" in result:
        s = result["eval_set"]
        lines.append(f"eval set: {s['images']} images from {s['source']} ({'in-sample' if s['in_sample'] else 'held out'}), "
                     f"references: {s['references']}")
    if "retrieval" in result:
        r = result["retrieval"]
        lines.append(f"{'retrieval':<24} {'R@1':>6} {'R@5':>6} {'R@10':>6}")
        for how in ("itc", "itm"):
            for way in ("image_to_text", "text_to_image"):
                m = r[how][way]
                lines.append(f"  {how} {way:<19} {f(m['r1']):>6} {f(m['r5']):>6} {f(m['r10']):>6}")
    if "captioning" in result:
        c = result["captioning"]
        lines.append(f"captioning: BLEU-4 {f(c['bleu4'])}  CIDEr {f(c['cider'])}  ({c['images']} images)")
    if "attributes" in result:
        a = result["attributes"]
        lines.append(f"attributes: accuracy {f(a['attribute_accuracy'])}  all-correct {f(a['exact_match'])}")
    if "filter" in result:
        q = result["filter"]
        lines.append(f"filter: precision {f(q['all']['precision'])}  recall {f(q['all']['recall'])}  "
                     f"({q['all']['kept']} kept of {q['all']['pairs']} pairs with truth)")
        for column, auc in q["auc_clean_vs_corrupted_web"].items():
            lines.append(f"  ROC-AUC {column:<10} {f(auc['auc'])}  ({auc['clean']} clean / {auc['corrupted']} corrupted web captions)")
    return lines
