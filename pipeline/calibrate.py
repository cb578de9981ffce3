"""Calibrating BLIP's filter: the threshold that gives the precision a user asks for.

    held-out annotated images ─► matched pairs (each image, each of its captions)
                              ─► mismatched pairs: another image's caption (random) and the
                                 other image's caption whose text is closest to it (hard)
    ─► each scorer's score of every pair (ITM match probability; CLIP similarity)
    ─► curve (threshold, precision, recall, fpr)
    ─► the lowest threshold whose precision reaches the target ─► calibration.json

Precision depends on how many of the judged captions match at all, which the held-out set cannot
know: the curve is computed with a stated prior of matched pairs (`match_prior`, default 0.5),
precision = prior * recall / (prior * recall + (1 - prior) * fpr), with the mismatched pairs'
false-positive rate taken over random and hard negatives in equal numbers. A hard negative is the
other images' caption most similar in text to a matched caption (character trigrams, so any
language or script), searched among every annotated caption, the finetuning part's too (a larger
pool holds closer texts): a caption that changes a word or two, the web's hardest noise. It is chosen
without any scorer, so the ITM and the CLIP are measured on the same pairs and neither is handed
the negatives it alone finds hardest; it never depends on the caption grammar. A negative
identical (ignoring case) to one of the image's own captions is not a negative and is skipped.

With both scorers calibrated, `choose` keeps the one that reaches the target precision with the
more recall (`best`), or the one the user names: the filter is whichever the measurement favours.
Recall within what the held-out pairs can tell (`clearly_more`) is a tie. With `best`, the select
stage then judges each caption source with the filter's scorer unless another keeps clearly more
of it at the target precision at the share of matches the source's own scores imply
(`for_source_best`): a scorer blind to the kind of noise a source has cannot empty it.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from capfilt.errors import ConfigError

FILE_NAME = "calibration.json"
DEFAULT_TARGET_PRECISION = 0.9
DEFAULT_MATCH_PRIOR = 0.5


@dataclass(frozen=True)
class Calibration:
    threshold: float | None  # None: the target precision is out of reach (see `check`)
    target_precision: float
    predicted_precision: float | None
    predicted_recall: float | None
    match_prior: float
    positives: int
    negatives: dict  # {"random": n, "hard": n}
    curve: tuple = ()  # rows {threshold, precision, recall, fpr}, thresholds descending
    scorer: str | None = None
    annotated: dict | None = None
    score: str = "itm"  # the score column it thresholds: itm (itm_score) or clip (clip_score)
    split: dict | None = None
    extra: dict = field(default_factory=dict)
    # every held-out pair's score by kind (positive, random, hard, swap): what `estimated_prior`
    # compares a run's own scores with; left out of `summary` (provenance)
    held_out: dict = field(default_factory=dict)

    # -- choosing a threshold ---------------------------------------------------------------------
    def at(self, target_precision: float | None = None, match_prior: float | None = None) -> "Calibration":
        """The same measurements for another target precision or prior (no re-scoring)."""
        target = self.target_precision if target_precision is None else target_precision
        prior = self.match_prior if match_prior is None else match_prior
        curve = _with_precision(self.curve, prior)
        threshold, precision, recall = _pick(curve, target)
        return replace(self, threshold=threshold, target_precision=target, match_prior=prior,
                       predicted_precision=precision, predicted_recall=recall, curve=curve)

    def check(self) -> "Calibration":
        """Itself when a threshold was found, else ConfigError saying what is reachable and what to do."""
        if self.threshold is not None:
            return self
        best = max(self.curve, key=lambda r: (r["precision"], r["recall"]), default=None)
        reach = (f"the best it reaches is {best['precision']:.3f} (threshold {best['threshold']:.4f}, recall "
                 f"{best['recall']:.3f})" if best else "no pair passes any threshold")
        raise ConfigError(
            f"calibration: precision {self.target_precision} is out of reach for this filter: on {self.positives} matched "
            f"and {sum(self.negatives.values())} mismatched held-out pairs, with a match prior of {self.match_prior}, "
            f"{reach}. Lower --target-precision, state a higher --match-prior if most of your captions match, or "
            f"finetune the filter longer or on more annotated images."
        )

    def summary(self, points: int = 21) -> dict:
        """Everything but the full curve (sampled to `points` rows): what provenance carries."""
        data = asdict(self)
        data.pop("held_out")
        curve = list(self.curve)
        if len(curve) > points:
            curve = [curve[round(i * (len(curve) - 1) / (points - 1))] for i in range(points)]
        data["curve"] = curve
        return data

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=list)

    @classmethod
    def from_json(cls, text: str, where: str = "calibration") -> "Calibration":
        try:
            data = json.loads(text)
            data["curve"] = tuple(data.get("curve") or ())
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"{where}: not a capfilt calibration file ({exc}); write one with "
                              f"`capfilt finetune filter`.") from exc


def _with_precision(curve, prior: float) -> tuple:
    if not 0.0 < prior < 1.0:
        raise ConfigError(f"--match-prior must be in (0, 1), got {prior}.")
    rows = []
    for r in curve:
        passed = prior * r["recall"] + (1 - prior) * r["fpr"]
        rows.append({**r, "precision": prior * r["recall"] / passed if passed > 0 else 0.0})
    return tuple(rows)


def _pick(curve, target: float) -> tuple[float | None, float | None, float | None]:
    """The lowest threshold (of those any positive passes) whose precision reaches `target`."""
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"--target-precision must be in (0, 1], got {target}.")
    reaching = [r for r in curve if r["recall"] > 0 and r["precision"] >= target]
    if not reaching:
        return None, None, None
    best = min(reaching, key=lambda r: r["threshold"])
    return best["threshold"], best["precision"], best["recall"]


def curve_of(positive: np.ndarray, negative: np.ndarray) -> tuple:
    """(threshold, recall, fpr) at every distinct score, thresholds descending; keep = score >= threshold."""
    positive, negative = np.sort(np.asarray(positive, np.float64)), np.sort(np.asarray(negative, np.float64))
    if len(positive) == 0 or len(negative) == 0:
        raise ConfigError("calibration needs matched and mismatched pairs; the held-out part is too small "
                          "(raise --holdout-fraction or give more annotated images).")
    thresholds = np.unique(np.concatenate([positive, negative]))[::-1]
    recall = (len(positive) - np.searchsorted(positive, thresholds, side="left")) / len(positive)
    fpr = (len(negative) - np.searchsorted(negative, thresholds, side="left")) / len(negative)
    return tuple({"threshold": float(t), "recall": float(r), "fpr": float(f)} for t, r, f in zip(thresholds, recall, fpr))


def calibrate(positive, negative, target_precision: float = DEFAULT_TARGET_PRECISION,
              match_prior: float = DEFAULT_MATCH_PRIOR, negatives: dict | None = None, **about) -> Calibration:
    """A Calibration from matched (`positive`) and mismatched (`negative`) ITM scores; its threshold
    is None when the target is out of reach (call `.check()` to raise the explaining error)."""
    base = Calibration(None, target_precision, None, None, match_prior, len(positive),
                       negatives or {"all": len(negative)}, curve_of(positive, negative), **about)
    return base.at()


# -- pairs from held-out annotated images ---------------------------------------------------------

def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _trigram_vectors(texts: list[str], dim: int = 4096) -> np.ndarray:
    """Unit vectors of hashed character-trigram counts: a text similarity for any language."""
    out = np.zeros((len(texts), dim), np.float32)
    for row, text in enumerate(texts):
        padded = f" {_norm(text)} "
        for k in range(len(padded) - 2):
            out[row, zlib.crc32(padded[k:k + 3].encode()) % dim] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-9)


def calibration_pairs(images, seed: int = 0, other_texts: Sequence[str] = ()) -> dict[str, list[tuple[int, str]]]:
    """{'positive', 'random', 'hard', 'swap'}: lists of (image index, caption), at most one negative
    of each kind per matched caption. Hard: the caption closest in text to the matched one among
    the other held-out images' captions and `other_texts` (captions of annotated images that are
    not held out, e.g. the finetuning part's: more texts to search, harder negatives)."""
    if len(images) < 2:
        raise ConfigError(f"calibration needs at least 2 held-out images, got {len(images)}; raise --holdout-fraction.")
    rng = np.random.default_rng([seed, 11])
    captions = [(i, c) for i, im in enumerate(images) for c in im.captions]
    own = [{_norm(c) for c in im.captions} for im in images]
    random_neg, hard = [], []
    for i, _ in captions:
        for _ in range(32):
            j, text = captions[int(rng.integers(len(captions)))]
            if j != i and _norm(text) not in own[i]:
                random_neg.append((i, text))
                break
    pool = captions + [(-1, text) for text in other_texts]  # -1: no held-out image's own caption
    vectors = _trigram_vectors([c for _, c in pool])
    for start in range(0, len(captions), 1024):  # a large annotated set never needs an N x N matrix at once
        sims = vectors[start:min(start + 1024, len(captions))] @ vectors.T
        for row, (i, _) in enumerate(captions[start:start + 1024]):
            for t in np.argsort(-sims[row], kind="stable"):
                j, text = pool[t]
                if j != i and _norm(text) not in own[i]:
                    hard.append((i, text))
                    break
    return {"positive": captions, "random": random_neg, "hard": hard, "swap": swap_negatives(images, captions, rng)}


def swap_negatives(images, captions: list[tuple[int, str]], rng) -> list[tuple[int, str]]:
    """One-word swaps: each matched caption with one of its words replaced by a word the set's
    captions use in the same place (after the same word, or before it) and that none of the
    image's own captions uses: "a small red circle" -> "a small blue circle". The web's hardest
    noise changes one word; nearest other captions rarely do in a small set. Words are what
    whitespace separates, so a script without spaces gets none (the other kinds still measure it).
    Never a text identical to one of the image's own captions; at most one per matched caption."""
    after, before = {}, {}  # word -> words seen after it / before it, in any caption of the set
    for _, text in captions:
        words = ["\x02", *_norm(text).split(), "\x03"]
        for left, right in zip(words, words[1:]):
            after.setdefault(left, set()).add(right)
            before.setdefault(right, set()).add(left)
    own_words = [{w for c in im.captions for w in _norm(c).split()} for im in images]
    own = [{_norm(c) for c in im.captions} for im in images]
    out = []
    for i, text in captions:
        words = _norm(text).split()
        if len(words) < 2:  # swapping a one-word text's word replaces the text: a random negative, not a swap
            continue
        options = []
        for k, word in enumerate(words):
            left = words[k - 1] if k else "\x02"
            right = words[k + 1] if k + 1 < len(words) else "\x03"
            follows = after.get(left, set()) - own_words[i] - {"\x03"}
            precedes = before.get(right, set()) - own_words[i] - {"\x02"}
            fits = (follows & precedes) or (follows | precedes)  # both neighbours where the set has one
            options += [(k, w) for w in sorted(fits)]
        rng.shuffle(options)
        for k, word in options:
            swapped = " ".join(words[:k] + [word] + words[k + 1:])
            if swapped not in own[i]:
                out.append((i, swapped))
                break
    return out


def score_pairs(score_fn, pictures: list, pairs: list[tuple[int, str]], batch_size: int = 64) -> np.ndarray:
    """`score_fn(images, texts)` of every (image index, caption) pair, in batches."""
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        out.append(np.asarray(score_fn([pictures[i] for i, _ in chunk], [t for _, t in chunk]), np.float64))
    return np.concatenate(out) if out else np.zeros(0)


def calibrate_scores(score_fn, images, target_precision: float = DEFAULT_TARGET_PRECISION,
                     match_prior: float = DEFAULT_MATCH_PRIOR, seed: int = 0, score: str = "itm",
                     other_texts: Sequence[str] = (), **about) -> Calibration:
    """Calibrate a pair score (`score_fn(images, texts)`, higher = more likely a match) on held-out
    annotated images; `score` names the column the threshold applies to (itm or clip);
    `other_texts` widen the search for hard negatives (`calibration_pairs`)."""
    from pipeline.caption import decode_image

    pictures = [decode_image(im.image) for im in images]
    pairs = calibration_pairs(images, seed, other_texts)
    scores = {kind: score_pairs(score_fn, pictures, rows) for kind, rows in pairs.items()}
    # Random and hard negatives weigh equally in the false-positive rate, whatever their counts.
    n = min(len(scores["random"]), len(scores["hard"])) or max(len(scores["random"]), len(scores["hard"]))
    negative = np.concatenate([np.resize(scores["random"], n) if len(scores["random"]) else np.zeros(0),
                               np.resize(scores["hard"], n) if len(scores["hard"]) else np.zeros(0)])
    extra = {kind: {"mean": float(v.mean()) if len(v) else None, "n": int(len(v))} for kind, v in scores.items()}
    extra["hard_negative_texts"] = sum(len(im.captions) for im in images) + len(other_texts)  # searched for hard ones
    extra["roc_auc_random"] = roc_auc(scores["positive"], scores["random"])
    extra["roc_auc_hard"] = roc_auc(scores["positive"], scores["hard"])
    # One-word swaps are measured, not mixed into the false-positive rate: how much of a source's
    # noise changes one word is unknown, and a toy ITM that tells them apart barely (ROC-AUC 0.6)
    # would reach no precision at all. The report shows it: what the filter cannot see.
    extra["roc_auc_swap"] = roc_auc(scores["positive"], scores["swap"])
    return calibrate(scores["positive"], negative, target_precision, match_prior,
                     negatives={"random": len(scores["random"]), "hard": len(scores["hard"])},
                     extra=extra, score=score, held_out={k: [round(float(x), 6) for x in v] for k, v in scores.items()},
                     **about)


def calibrate_itm(itm_scorer, images, target_precision: float = DEFAULT_TARGET_PRECISION,
                  match_prior: float = DEFAULT_MATCH_PRIOR, seed: int = 0, other_texts: Sequence[str] = (),
                  **about) -> Calibration:
    """Calibrate an ITM scorer (`match_probability(images, texts)`) on held-out annotated images."""
    return calibrate_scores(itm_scorer.match_probability, images, target_precision, match_prior, seed, "itm",
                            other_texts, **about)


def calibrate_clip(clip_scorer, images, target_precision: float = DEFAULT_TARGET_PRECISION,
                   match_prior: float = DEFAULT_MATCH_PRIOR, seed: int = 0, other_texts: Sequence[str] = (),
                   **about) -> Calibration:
    """Calibrate a CLIP (`pair_scores(images, texts)`, the score stage's clip_score) the same way."""
    return calibrate_scores(clip_scorer.pair_scores, images, target_precision, match_prior, seed, "clip",
                            other_texts, **about)


# -- a caption source's own share of matches ----------------------------------------------------------

HELD_OUT_KINDS = ("positive", "random", "hard", "swap")
PRIOR_BINS = 10


def estimated_prior(calibration: Calibration, scores) -> dict | None:
    """The share of a run's captions (their `scores`, one source's) that match their image, estimated
    from the scores alone: their histogram fitted as a mixture of the held-out pairs' histograms
    (matched, random, nearest-text and one-word-swap mismatches; least squares, weights >= 0 summing
    to 1, on the deciles of all held-out scores). {'prior', 'weights', 'captions'}; None when the
    calibration holds no held-out scores (written before they were kept) or there are no scores."""
    held = {k: np.asarray(calibration.held_out.get(k) or [], np.float64) for k in HELD_OUT_KINDS}
    kinds = [k for k in HELD_OUT_KINDS if len(held[k])]
    values = np.asarray([v for v in scores if v is not None and not np.isnan(v)], np.float64)
    if "positive" not in kinds or len(kinds) < 2 or not len(values):
        return None
    edges = np.quantile(np.concatenate([held[k] for k in kinds]), np.linspace(0, 1, PRIOR_BINS + 1)[1:-1])

    def histogram(x):
        return np.bincount(np.searchsorted(edges, x, side="right"), minlength=PRIOR_BINS) / len(x)

    weights = _simplex_least_squares(np.stack([histogram(held[k]) for k in kinds], axis=1), histogram(values))
    found = dict(zip(kinds, (round(float(w), 4) for w in weights)))
    return {"prior": found["positive"], "weights": found, "captions": int(len(values))}


def _simplex_least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a w - b|| over w >= 0, sum(w) = 1: exact, by trying every support (a few columns)."""
    from itertools import combinations

    best, best_w = np.inf, None
    k = a.shape[1]
    for size in range(1, k + 1):
        for support in combinations(range(k), size):
            cols = a[:, list(support)]
            # the equality-constrained least squares on this support (its KKT system)
            kkt = np.block([[2 * cols.T @ cols, np.ones((size, 1))], [np.ones((1, size)), np.zeros((1, 1))]])
            w = np.linalg.lstsq(kkt, np.concatenate([2 * cols.T @ b, [1.0]]), rcond=None)[0][:size]
            if (w >= -1e-12).all():
                error = float(np.sum((cols @ w - b) ** 2))
                if error < best:
                    best, best_w = error, np.zeros(k)
                    best_w[list(support)] = np.clip(w, 0, None)
    return best_w


def for_source(calibration: Calibration, scores) -> tuple[Calibration | None, dict | None]:
    """(the calibration a caption source's captions are judged with, the estimate behind it).

    The stated prior holds unless the source's own scores say fewer of its captions match: then
    the threshold is re-picked for the source's estimated mixture (`estimated_prior`): at each
    threshold, precision = w_match * recall / (w_match * recall + the sum over the mismatch kinds
    of w_kind * the share of that kind's held-out pairs passing). Each kind's share is counted with
    one false positive more than the held-out set saw (add-one): above the highest held-out
    mismatch the measured rate is 0, and any share would reach any precision; n mismatches
    measure it only down to about 1/n. One-word swaps count here as the source's mixture says,
    though the stated curve leaves them out: a source the fit calls mostly swaps gets the
    threshold above its swaps. A source whose share admits no threshold reaching the target
    precision gets None (none of its captions is kept).
    The estimate only ever makes the filter stricter: never a threshold below the stated one, so a
    weak captioner's captions cannot lower the precision of what is kept, and a source better than
    stated keeps the stated threshold."""
    estimate = estimated_prior(calibration, scores)
    if estimate is None or estimate["prior"] >= calibration.match_prior:
        return calibration, estimate
    if estimate["prior"] <= 0:
        return None, estimate
    held = {k: np.sort(np.asarray(calibration.held_out.get(k) or [], np.float64)) for k in estimate["weights"]}
    mismatches = [(k, w) for k, w in estimate["weights"].items() if k != "positive" and w > 0]
    curve = []
    for row in calibration.curve:
        t = row["threshold"]
        passing = {k: len(held[k]) - int(np.searchsorted(held[k], t, side="left")) for k in held}
        true = estimate["prior"] * row["recall"]
        false = sum(w * (passing[k] + 1) / (len(held[k]) + 1) for k, w in mismatches)
        curve.append({**row, "precision": true / (true + false) if true + false > 0 else 0.0})
    reaching = [r for r in curve if r["recall"] > 0 and r["precision"] >= calibration.target_precision
                and (calibration.threshold is None or r["threshold"] >= calibration.threshold)]
    if not reaching:
        return None, estimate
    best = min(reaching, key=lambda r: r["threshold"])
    return replace(calibration, threshold=best["threshold"], predicted_precision=best["precision"],
                   predicted_recall=best["recall"], match_prior=estimate["prior"], curve=tuple(curve)), estimate


def for_source_best(calibrations: Sequence[Calibration], scores: dict) -> tuple[Calibration | None, dict | None]:
    """`for_source` with each calibrated scorer (the filter's choice first) on the source's scores of
    that scorer (`scores`: {score: values}); the source is judged by the filter's own choice unless
    another keeps clearly more of it at the target precision (predicted recall at the share its own
    scores imply, `clearly_more`), or the filter's own reaches no threshold for it.

    A scorer can be blind to a source's noise in a way the held-out set does not show: an ITM that
    scores one-word changes as high as matches fits a source of matches as one of one-word swaps
    (estimated share 0: nothing kept), where the CLIP, whose held-out swaps score lower, sees the
    matches. Each scorer's estimate only ever makes it stricter, so the choice keeps the precision
    each promises. The estimate returned names the scorer (`score`) and carries every scorer's
    (`by_score`: prior and predicted recall, None where it reaches no threshold)."""
    tried = []
    for calibration in calibrations:
        values = [v for v in scores.get(calibration.score) or () if v is not None and not np.isnan(v)]
        if values:
            tried.append((calibration, *for_source(calibration, values)))
    if not tried:
        return (calibrations[0] if calibrations else None), None
    by_score = {c.score: {"prior": e["prior"] if e else None,
                          "predicted_recall": found.predicted_recall if found is not None else None}
                for c, found, e in tried}
    reaching = [t for t in tried if t[1] is not None]
    calibration, found, estimate = reaching[0] if reaching else tried[0]  # the filter's own choice where it reaches
    for other in reaching[1:]:  # another only where it keeps clearly more (`clearly_more`)
        if clearly_more(other[1], found):
            calibration, found, estimate = other
    if estimate is not None:
        estimate = {**estimate, "score": calibration.score, "by_score": by_score}
    return found, estimate


SCORES = ("itm", "clip")
CHOICES = ("best", *SCORES)


def check_filter_score(prefer: str, has_clip: bool) -> None:
    """ConfigError unless `prefer` (--filter-score) is a choice the given scorers can satisfy."""
    if prefer not in CHOICES:
        raise ConfigError(f"--filter-score {prefer!r}: choose from {', '.join(CHOICES)}.")
    if prefer == "clip" and not has_clip:
        raise ConfigError("--filter-score clip needs --clip (the CLIP the filter stage scores with).")


def separation(calibration: Calibration) -> float:
    """Mean ROC-AUC over the kinds of mismatched held-out pairs it was measured on (random,
    nearest-text, one-word swaps): how well the score tells a matched pair from each kind."""
    aucs = [calibration.extra.get(f"roc_auc_{kind}") for kind in ("random", "hard", "swap")]
    aucs = [a for a in aucs if a is not None]
    return sum(aucs) / len(aucs) if aucs else 0.0


def clearly_more(a: Calibration, b: Calibration) -> bool:
    """Whether `a` reaches its target precision with more recall than `b` by more than their held-out
    matched pairs can tell: two standard errors of the difference of two proportions over them (12
    held-out images, 60 pairs: 1.0 against 0.95 is 3 pairs, within it). One that reaches it beats one
    that does not."""
    if a.predicted_recall is None:
        return False
    if b.predicted_recall is None:
        return True
    n = min(a.positives, b.positives) or 1
    p = (a.predicted_recall + b.predicted_recall) / 2
    return a.predicted_recall - b.predicted_recall > 2 * (2 * p * (1 - p) / n) ** 0.5


def choose(calibrations: dict[str, Calibration], prefer: str = "best") -> Calibration:
    """The calibration the filter uses: `prefer` (itm / clip), or with `best` the one reaching the
    target precision with the most recall; where the others' recall is not clearly less
    (`clearly_more`: a few dozen held-out pairs make recall coarse), the one of those that separates
    matched pairs from every kind of mismatched one better (`separation`: one-word swaps included,
    which the precision leaves out), then ITM, BLIP's filter. The others' figures travel in its
    `extra['alternatives']`."""
    check_filter_score(prefer, "clip" in calibrations)
    if prefer != "best":
        chosen = calibrations[prefer]
    else:
        most = max(calibrations.values(), key=lambda c: c.predicted_recall if c.predicted_recall is not None else -1.0)
        tied = [k for k, c in calibrations.items() if not clearly_more(most, c)]
        chosen = calibrations[max(tied, key=lambda k: (round(separation(calibrations[k]), 6), k == "itm",
                                                       calibrations[k].predicted_recall or -1.0))]
    alternatives = {k: {"threshold": c.threshold, "predicted_precision": c.predicted_precision,
                        "predicted_recall": c.predicted_recall, "roc_auc_random": c.extra.get("roc_auc_random"),
                        "roc_auc_hard": c.extra.get("roc_auc_hard"), "roc_auc_swap": c.extra.get("roc_auc_swap")}
                    for k, c in calibrations.items()}
    return replace(chosen, extra={**chosen.extra, "chosen_by": prefer, "alternatives": alternatives})


def roc_auc(positive, negative) -> float | None:
    """P(a matched pair scores above a mismatched one), ties counting half."""
    positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if len(positive) == 0 or len(negative) == 0:
        return None
    negative = np.sort(negative)
    below = np.searchsorted(negative, positive, side="left")
    ties = np.searchsorted(negative, positive, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(positive) * len(negative)))


# -- files ------------------------------------------------------------------------------------------

def write_calibration(calibration: Calibration, path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(calibration.to_json())
    return path


def find_calibration(path: str | Path) -> Path | None:
    """calibration.json at `path`, in the folder `path`, or in a step folder's trainer folder."""
    path = Path(path)
    if path.is_file():
        return path
    candidates = [path / FILE_NAME]
    if path.name.startswith("step-"):
        candidates.append(path.parent / FILE_NAME)
    if path.name == "model" and path.parent.name.startswith("step-"):
        candidates.append(path.parent.parent / FILE_NAME)
    return next((c for c in candidates if c.is_file()), None)


def load_calibration(path: str | Path, option: str = "--calibration") -> Calibration:
    found = find_calibration(path)
    if found is None:
        raise ConfigError(f"{option} {path}: no {FILE_NAME} there; run `capfilt finetune filter --annotated ... --out "
                          f"DIR` (it calibrates on the held-out part) and pass DIR, or its calibration.json.")
    return Calibration.from_json(found.read_text(), str(found))


def load_alternatives(path: str | Path, calibration: Calibration) -> tuple[Calibration, ...]:
    """The other scorers' calibrations written beside `path`'s calibration.json by `capfilt finetune
    filter` (calibration-<score>.json), where the filter's scorer was chosen by measurement (`--filter-score
    best`); () where the user named one, or none is there."""
    if (calibration.extra or {}).get("chosen_by") != "best":
        return ()
    found = find_calibration(path)
    if found is None:
        return ()
    out = []
    for score in SCORES:
        other = found.parent / f"calibration-{score}.json"
        if score != calibration.score and other.is_file():
            out.append(Calibration.from_json(other.read_text(), str(other)))
    return tuple(out)


def calibrate_on_annotated(itm: str, annotated: str, out: str | Path, target_precision: float = DEFAULT_TARGET_PRECISION,
                           match_prior: float = DEFAULT_MATCH_PRIOR, seed: int = 0, device: str = "auto") -> Calibration:
    """Calibrate an ITM model as it is (hub id, BLIP/BLIP-2 folder or capfilt Stage 1; no finetuning,
    so every annotated image may serve) on a clean annotated set; writes `out` (calibration.json).
    Raises ConfigError, after writing the curve, when the target precision is out of reach."""
    from model.scorers import load_itm
    from pipeline.annotated import read_annotated

    data = read_annotated(annotated)
    calibration = calibrate_itm(load_itm(itm, device), data.images, target_precision, match_prior, seed,
                                scorer=itm, annotated=data.describe())
    write_calibration(calibration, out)
    return calibration.check()
