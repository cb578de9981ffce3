"""How captions are generated: one small config object, importable without torch (the CLI's
defaults and a flow's early checks read it before any model is loaded)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from capfilt.errors import ConfigError


@dataclass(frozen=True)
class Decoding:
    """How captions are generated. Lengths count generated tokens, not the prompt."""

    num_captions: int = 4
    top_p: float = 0.9  # BLIP's CapFilt nucleus sampling
    max_length: int = 30
    min_length: int = 5
    repetition_penalty: float = 1.0
    prompt: str = ""
    num_beams: int = 1  # > 1: beam search (deterministic, no sampling) returning the N best beams
    seed: int = 0

    def __post_init__(self):
        problems = []
        if self.num_captions < 1:
            problems.append(f"--num-captions must be >= 1 (got {self.num_captions})")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.max_length < 1:
            problems.append(f"--max-new-tokens must be >= 1 (got {self.max_length})")
        if not 0 <= self.min_length <= self.max_length:
            problems.append(f"--min-new-tokens must be in [0, --max-new-tokens={self.max_length}] (got {self.min_length})")
        if self.repetition_penalty <= 0:
            problems.append(f"--repetition-penalty must be > 0 (got {self.repetition_penalty})")
        if self.num_beams < 1:
            problems.append(f"--num-beams must be >= 1 (got {self.num_beams})")
        elif self.num_beams > 1 and self.num_captions > self.num_beams:
            problems.append(
                f"beam search returns at most --num-beams={self.num_beams} captions per image; "
                f"raise --num-beams to >= --num-captions={self.num_captions}"
            )
        if problems:
            raise ConfigError("; ".join(problems) + ".")

    @property
    def sampling(self) -> bool:
        return self.num_beams == 1

    def to_json(self) -> str:
        """The parameters stored with every synthetic caption (seed included: the run seed)."""
        params = asdict(self)
        params["strategy"] = "nucleus_sampling" if self.sampling else "beam_search"
        if not self.sampling:
            params.pop("top_p")
        return json.dumps(params, sort_keys=True)
