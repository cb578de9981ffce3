"""One registry of model families: a checkpoint's `model_type` (its config.json) -> how it loads as a
captioner, as an ITM scorer, or as both.

    model_type             captioner                                ITM scorer
    blip                   BlipCaptioner                            BlipForImageTextRetrieval
    blip-2                 Blip2Captioner                           Blip2ForImageTextRetrieval
    capfilt-blip2-stage2   capfilt's Stage 2 (model/blip2_generate)  -
    capfilt-qformer        -                                        capfilt's Stage 1 (model/stage1_inference)
    capfilt-folds          -                                        out-of-fold Stage 1 filters (model/folds)

A loader is named "module:name" and imported when a checkpoint of its family is loaded, so the table
imports nothing (no torch at start-up) and no file imports another through it. `load_captioner`
(model/captioners.py) and `load_itm` (model/scorers.py) read a checkpoint's model_type and come here;
another family plugs in with `register(model_type, kind, loader)`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from capfilt.errors import ConfigError, first_line

# Written by capfilt's own models into their config (model/qformer.py and model/blip2.py MODEL_TYPE, spelled
# here so that the table imports neither).
STAGE1_MODEL_TYPE = "capfilt-qformer"
STAGE2_MODEL_TYPE = "capfilt-blip2-stage2"
FOLDS_MODEL_TYPE = "capfilt-folds"

# kind -> (the option that names such a model, what one is called, where to find one)
KINDS = {
    "captioner": ("--captioner", "captioner", "Pass a folder written by save_pretrained or a hub id such as "
                  "Salesforce/blip-image-captioning-large (hub ids need network access or a filled HF cache)."),
    "itm": ("--itm", "ITM scorer", "Give a hub id, a folder written by save_pretrained or a `capfilt train stage1 "
            "--out` folder."),
}

FAMILIES: dict[str, dict[str, str | Callable[[str, str], Any]]] = {
    "blip": {"captioner": "model.captioners:BlipCaptioner", "itm": "model.scorers:blip_itm"},
    "blip-2": {"captioner": "model.captioners:Blip2Captioner", "itm": "model.scorers:blip2_itm"},
    STAGE2_MODEL_TYPE: {"captioner": "model.blip2_generate:load_stage2_captioner"},
    STAGE1_MODEL_TYPE: {"itm": "model.scorers:stage1_itm"},
    FOLDS_MODEL_TYPE: {"itm": "model.folds:load_folded_itm"},
}


def register(model_type: str, kind: str, loader: Callable[[str, str], Any]) -> None:
    """Load checkpoints whose config.json says `model_type` as a `kind` with `loader(id_or_path, device)`."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: one of {', '.join(KINDS)}")
    FAMILIES.setdefault(model_type, {})[kind] = loader


def families(kind: str) -> list[str]:
    """The model types that load as a `kind`."""
    return sorted(model_type for model_type, loaders in FAMILIES.items() if kind in loaders)


def model_type(kind: str, id_or_path: str, config: dict | None = None) -> str:
    """The model_type of a checkpoint (hub id or folder), read from its config.json without loading any
    weights (or from `config` when the caller found it), checked to load as a `kind`."""
    option, noun, hint = KINDS[kind]
    if config is None:
        from transformers import PretrainedConfig

        try:
            config, _ = PretrainedConfig.get_config_dict(id_or_path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{option} {id_or_path!r}: no model config found ({first_line(exc)}). {hint}") from exc
        if not config:  # a folder without config.json reads as {}
            raise ConfigError(f"{option} {id_or_path!r}: no model config found (no config.json there). {hint}")
    found = config.get("model_type")
    if found not in families(kind):
        raise ConfigError(f"{option} {id_or_path!r}: model_type {found!r} is not a known {noun}; "
                          f"known: {', '.join(families(kind))}.")
    return found


def load(kind: str, model_type: str, id_or_path: str, device: str = "auto"):
    """A checkpoint of a known `model_type` loaded as a `kind`, on `device`."""
    loader = FAMILIES[model_type][kind]
    if isinstance(loader, str):
        module, name = loader.split(":")
        loader = getattr(importlib.import_module(module), name)
    return loader(id_or_path, device)
