"""Q-Former architectures as data: named JSON files in model/configs/, built by one factory.

As open_clip's model_configs/*.json and factory.py: an architecture is a JSON object of
QFormerConfig fields, the model's own sizes (`qformer-base` is BLIP-2's: BERT-base, 12 layers,
32 queries, cross-attention every other layer; `qformer-toy` the toy preset's). What a run
decides comes on top as overrides: the tokenizer's vocabulary and special ids, the frozen image
encoder's width, the text length. A user's JSON file takes the same path as a shipped name, and
the fields a file leaves out keep QFormerConfig's defaults, which are `qformer-base`'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from capfilt.errors import ConfigError

from .qformer import SAVED_VISION, QFormer, QFormerConfig

CONFIG_DIR = Path(__file__).with_name("configs")
DEFAULT = "qformer-base"


def architectures() -> list[str]:
    """The names of the shipped architectures (model/configs/*.json)."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def architecture(spec: str | Path | Mapping, where: str = "architecture") -> dict:
    """The QFormerConfig fields an architecture sets, checked: `spec` is a shipped name, a JSON
    file, a JSON object's text, or a mapping of fields. `where` names the option in errors."""
    if isinstance(spec, Mapping):
        data, source = dict(spec), where
    elif str(spec).lstrip()[:1] in ("{", "["):  # JSON text, not a name or a path
        data, source = _parse(str(spec), where), where
    else:
        names = architectures()
        path = CONFIG_DIR / f"{spec}.json" if str(spec) in names else Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"{where} {str(spec)!r}: not a known architecture ({', '.join(names)}) nor a JSON "
                              f"file; give one of those names, or the path of a JSON object of Q-Former config fields.")
        source = f"{where} {path}"
        data = _parse(path.read_text(), source)
    # the same checks as a saved model's config: model_type if any, no unknown key, valid sizes
    try:
        QFormerConfig.from_json(json.dumps(data), where=source)
    except (ConfigError, TypeError) as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(source) else f"{source}: {message}") from None
    data.pop("model_type", None)
    data.pop(SAVED_VISION, None)  # a saved model's config is an architecture too; its encoder is not part of it
    return data


def _parse(text: str, where: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a JSON object of Q-Former config fields")
    return data


def qformer_config(spec: str | Path | Mapping = DEFAULT, **overrides) -> QFormerConfig:
    """The config of an architecture (see `architecture`) with `overrides` on top."""
    return QFormerConfig(**{**architecture(spec), **overrides})


def create(spec: str | Path | Mapping = DEFAULT, **overrides) -> QFormer:
    """A randomly initialised Q-Former of an architecture (see `architecture`), `overrides` on top:
    open_clip's create_model for capfilt's one trained model."""
    return QFormer(qformer_config(spec, **overrides))
