"""An out-of-fold filter: K models, each trained without one fold of the source's images, each
judging only the images of its own fold.

A filter trained on the pairs it then judges remembers them, corrupted ones included, and its
calibration (measured on images it never saw) no longer predicts what it keeps. Split by sample
id (model/data.py fold_of), fold f's images are scored by the model that never trained on them.

    DIR/config.json    {"model_type": "capfilt-folds", "folds": K, "models": ["fold-0/filter", ...]}
    DIR/fold-<f>/      the Stage 1 trained without fold f (stage1/) and its finetuned filter
                       (filter/), the one that judges fold f's images

`load_itm(DIR)` (model/scorers.py, through the registry) gives a FoldedItm. The score stage passes
each image's sample id (`keys`); an image given without one (a calibration picture, which no model
trained on) goes to the fold its pixels hash to.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from capfilt.errors import ConfigError

from .data import fold_of
from .registry import FOLDS_MODEL_TYPE
from .scorers import ItmScorer, load_itm

CONFIG = "config.json"


def write_folds(out: str | Path, models: list[str], **about) -> Path:
    """DIR/config.json naming the fold models (paths relative to DIR), fold f = models[f]."""
    path = Path(out) / CONFIG
    path.write_text(json.dumps({"model_type": FOLDS_MODEL_TYPE, "folds": len(models), "models": models, **about},
                               indent=1))
    return path


def read_folds(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text())
        models = [str(Path(folder) / m) for m in config["models"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--itm {folder}: {path} does not name the fold models ({exc}).") from exc
    if len(models) < 2 or config.get("folds") != len(models):
        raise ConfigError(f"--itm {folder}: {path} names {len(models)} models for {config.get('folds')} folds.")
    return {**config, "models": models}


def pixel_key(image) -> str:
    """The key of an image given without a sample id: a hash of its pixels."""
    return hashlib.sha1(np.asarray(image).tobytes()).hexdigest()


class FoldedItm(ItmScorer):
    """An ITM scorer that scores an image with the one fold model that never trained on it."""

    keyed = True

    def __init__(self, scorers: list[ItmScorer], id: str = "folds"):
        self.scorers, self.id = scorers, id

    def match_probability(self, images, texts, keys: list[str] | None = None) -> np.ndarray:
        return self.match_probability_of(images, list(range(len(images))), texts, keys)

    def match_probability_of(self, images, image_of, texts, keys: list[str] | None = None) -> np.ndarray:
        """keys[j]: images[j]'s sample id (the fold models were split by it); None: by pixels."""
        if keys is not None and len(keys) != len(images):
            raise ValueError(f"{len(keys)} keys for {len(images)} images")
        folds = len(self.scorers)
        fold = [fold_of(keys[j] if keys is not None else pixel_key(im), folds) for j, im in enumerate(images)]
        out = np.zeros(len(texts), np.float64)
        for f, scorer in enumerate(self.scorers):
            mine = [j for j in range(len(images)) if fold[j] == f]
            rows = [i for i, j in enumerate(image_of) if fold[j] == f]
            if not rows:
                continue
            local = {j: n for n, j in enumerate(mine)}
            out[rows] = scorer.match_probability_of([images[j] for j in mine], [local[image_of[i]] for i in rows],
                                                    [texts[i] for i in rows])
        return out


def load_folded_itm(folder: str, device: str = "auto") -> FoldedItm:
    config = read_folds(folder)
    return FoldedItm([load_itm(m, device) for m in config["models"]], id=str(Path(folder).resolve()))
