"""Evaluation metrics: pure functions of rankings, captions and scores (no model, no run, no I/O).

  retrieval      recall_at_k of rankings, `relevance` (which texts and images match), `rerank` of
                 an ITC top-k by an ITM logit (BLIP-2 / LAVIS's compute_sim_matrix).
  captioning     BLEU-4 and CIDEr (pycocoevalcap's scorers) of one caption per image.
  attributes     on a synthetic world: how many of an image's attributes a caption gets right.
  filter         precision / recall of kept pairs and ROC-AUC of a score for clean vs corrupted.

pipeline/evaluate.py reads a run and the models and calls these; tests call them on crafted input.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from model.toy.scenes import ATTRIBUTE_VALUES, ATTRIBUTES

RECALL_KS = (1, 5, 10)


# -- retrieval ----------------------------------------------------------------------------------

def recall_at_k(ranked: Sequence[Sequence[int]], relevant: Sequence[set[int]], ks: Sequence[int] = RECALL_KS) -> dict:
    """Fraction of queries with a relevant item among their first k results, for each k."""
    if len(ranked) != len(relevant):
        raise ValueError(f"{len(ranked)} rankings for {len(relevant)} queries")
    if not len(ranked):
        return {f"r{k}": None for k in ks}
    return {f"r{k}": float(np.mean([bool(set(list(r[:k])) & rel) for r, rel in zip(ranked, relevant)])) for k in ks}


def relevance(texts: Sequence[str], text_image: Sequence[int], n_images: int) -> tuple[list[set[int]], list[set[int]]]:
    """(texts relevant to each image, images relevant to each text).

    A text is relevant to every image one of whose references it equals: two scenes with the
    same content share their caption, and ranking either first is right.
    """
    images_of_text: dict[str, set[int]] = {}
    for text, image in zip(texts, text_image):
        images_of_text.setdefault(text, set()).add(image)
    t2i = [images_of_text[t] for t in texts]
    i2t: list[set[int]] = [set() for _ in range(n_images)]
    for t, images in enumerate(t2i):
        for i in images:
            i2t[i].add(t)
    return i2t, t2i


def rerank(sims, k: int, itm_logit, score: str = "itm+itc") -> list[list[int]]:
    """Full rankings of each row of `sims` (queries x candidates): the ITC top-k re-ordered by
    `itm_logit + sim` (score "itm+itc", LAVIS's compute_sim_matrix) or by the ITM logit alone
    ("itm"), then the rest in ITC order. `itm_logit(queries, candidates)` gets every query's top k
    at once, (Q,) query indices and (Q, k) candidate indices, and returns their (Q, k) logits: the
    caller batches the pairs as its model likes."""
    import torch

    sims = torch.as_tensor(sims, dtype=torch.float32)
    order = sims.argsort(dim=1, descending=True, stable=True)
    k = min(k, sims.shape[1])
    if not k or not sims.shape[0]:
        return order.tolist()
    top = order[:, :k]
    value = itm_logit(torch.arange(sims.shape[0]), top).float().cpu() + (sims.gather(1, top) if score == "itm+itc" else 0)
    top = top.gather(1, value.argsort(dim=1, descending=True, stable=True))
    return torch.cat([top, order[:, k:]], dim=1).tolist()


# -- captioning ---------------------------------------------------------------------------------

def normalize_caption(text: str | None) -> str:
    """Lowercase, punctuation to spaces, single spaces.

    Stands in for pycocoevalcap's PTBTokenizer, which runs Stanford CoreNLP (Java); on plain
    English captions the two differ only on contractions and hyphens, so scores are close to,
    not identical with, published COCO numbers.
    """
    return " ".join(re.sub(r"[^0-9a-z]+", " ", (text or "").lower()).split())


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Corpus BLEU-4 and CIDEr(-D) of one candidate per image against its references.

    CIDEr's document frequencies come from these references (as in the COCO evaluation), so it
    is comparable only between systems scored on the same evaluation set.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference sets")
    if any(not refs for refs in references):
        raise ValueError("every image needs at least one reference caption")
    if not candidates:
        return {"bleu4": None, "cider": None, "images": 0}
    res = {i: [normalize_caption(c)] for i, c in enumerate(candidates)}
    gts = {i: [normalize_caption(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider), "images": len(candidates)}


# -- attributes (synthetic worlds) --------------------------------------------------------------

# Words of the world's phrasings that name a value under another word (model/toy/scenes.py's
# _POSITION_PHRASES: "in the middle", "in the upper part", ...).
_SYNONYMS = {"middle": ("position", "center"), "upper": ("position", "top"), "lower": ("position", "bottom")}
_WORD_VALUE = {value: (name, value) for name, values in ATTRIBUTE_VALUES.items() for value in values} | _SYNONYMS


def parse_attributes(caption: str | None) -> dict[str, str | None]:
    """The world attributes a caption names; None for an attribute named not at all or twice
    with different values (a caption that says "red blue circle" gets no color)."""
    found: dict[str, set[str]] = {name: set() for name in ATTRIBUTES}
    for word in normalize_caption(caption).split():
        if word in _WORD_VALUE:
            name, value = _WORD_VALUE[word]
            found[name].add(value)
    return {name: next(iter(values)) if len(values) == 1 else None for name, values in found.items()}


def caption_correct(caption: str | None, truth: dict) -> bool:
    """A caption is correct for an image when it names every attribute, each one rightly."""
    parsed = parse_attributes(caption)
    return all(parsed[name] == truth[name] for name in ATTRIBUTES)


def attribute_accuracy(captions: Sequence[str], truths: Sequence[dict]) -> dict:
    """Mean fraction of the attributes right per caption, the all-right rate, and per attribute."""
    if len(captions) != len(truths):
        raise ValueError(f"{len(captions)} captions for {len(truths)} ground-truth rows")
    if not captions:
        return {"attribute_accuracy": None, "exact_match": None, "per_attribute": {}, "captions": 0}
    right = np.array([[parse_attributes(c)[a] == t[a] for a in ATTRIBUTES] for c, t in zip(captions, truths)])
    return {
        "attribute_accuracy": float(right.mean()),
        "exact_match": float(right.all(axis=1).mean()),
        "per_attribute": {a: float(right[:, j].mean()) for j, a in enumerate(ATTRIBUTES)},
        "captions": len(captions),
    }


# -- filter quality (synthetic worlds) ----------------------------------------------------------

def precision_recall(kept: Sequence[bool], correct: Sequence[bool]) -> dict:
    """Precision of the kept pairs (correct among kept) and recall (kept among the correct)."""
    kept, correct = np.asarray(kept, bool), np.asarray(correct, bool)
    tp = int((kept & correct).sum())
    return {
        "precision": tp / int(kept.sum()) if kept.any() else None,
        "recall": tp / int(correct.sum()) if correct.any() else None,
        "kept": int(kept.sum()), "correct": int(correct.sum()), "kept_correct": tp, "pairs": len(kept),
    }


def score_auc(scores: Sequence[float | None], clean: Sequence[bool]) -> dict:
    """ROC-AUC of a score for ranking clean captions above corrupted ones (0.5 = no signal).

    Pairs without a score (None / NaN) are left out and counted in `unscored`.
    """
    from sklearn.metrics import roc_auc_score

    values = np.array([np.nan if s is None else s for s in scores], dtype=float)
    labels = np.asarray(clean, bool)
    ok = ~np.isnan(values)
    result = {"pairs": int(ok.sum()), "unscored": int((~ok).sum()), "clean": int(labels[ok].sum()),
              "corrupted": int((~labels[ok]).sum())}
    if result["clean"] == 0 or result["corrupted"] == 0:
        return {"auc": None, **result, "why": "needs both clean and corrupted captions with scores"}
    return {"auc": float(roc_auc_score(labels[ok], values[ok])), **result}


def filter_quality(pairs: Sequence[dict]) -> dict:
    """Filter metrics from scored pairs with keys kept, correct, caption_source, clip_score,
    itm_score and (web captions) corrupted."""
    result = {"all": precision_recall([p["kept"] for p in pairs], [p["correct"] for p in pairs])}
    for source in sorted({p["caption_source"] for p in pairs}):
        chosen = [p for p in pairs if p["caption_source"] == source]
        result[source] = precision_recall([p["kept"] for p in chosen], [p["correct"] for p in chosen])
    web = [p for p in pairs if p["caption_source"] == "web"]
    result["auc_clean_vs_corrupted_web"] = {
        column: score_auc([p[column] for p in web], [not p["corrupted"] for p in web]) for column in ("clip_score", "itm_score")
    }
    return result
