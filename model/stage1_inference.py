"""A Stage 1 checkpoint at work: image and text embeddings, ITM scores, retrieval.

`Stage1Scorer.from_checkpoint(folder)` is what the Filter stage uses to score (image, caption)
pairs with capfilt's own ITM head: it is an `ItmScorer`, and `load_itm(folder)` (`--itm` of
`capfilt filter`) returns one for any Stage 1 checkpoint folder, because the Q-Former's config
says model_type "capfilt-qformer". Retrieval is BLIP-2's: ITC top-k, then ITM re-ranking.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from capfilt.device import pick_device
from capfilt.errors import ConfigError

from .data import image_pixels, pil_pixels
from .qformer import CONFIG_NAME, QFormer, load_tokenizer, saved_vision
from .scorers import ItmScorer
from .trainer import resolve_latest
from .vision import FrozenImageEncoder, load_vision_encoder


def resolve_checkpoint(folder: str | Path) -> tuple[Path, Path]:
    """(step folder, model folder) of a trainer --out folder (its latest step), a step-* folder or
    a model folder; for a model folder on its own both are that folder."""
    folder = resolve_latest(folder)
    model_dir = folder / "model" if (folder / "model" / CONFIG_NAME).exists() else folder
    return folder, model_dir


@dataclass(frozen=True)
class Stage1Checkpoint:
    """A Stage 1 checkpoint's pieces: its step folder, its model folder (Q-Former and tokenizer), the
    step's stage1.json (training config and lineage; {} without one) and the frozen image encoder it
    was trained with (None when neither the model folder nor a stage1.json names it)."""

    step: Path
    model_dir: Path
    info: dict
    vision: str | None
    where: str = ""

    def encoder(self, override: str | None = None) -> str:
        """`override` (the caller's --vision) or the encoder the checkpoint names; a clear error without either."""
        vision = override or self.vision
        if vision:
            return vision
        raise ConfigError(f"{self.where}: no stage1.json naming the image encoder (looked in {self.step} and "
                          f"{self.model_dir.parent}, and the model folder names none); pass --vision, or the "
                          f"checkpoint's step folder.")


def stage1_checkpoint(folder: str | Path, where: str) -> Stage1Checkpoint:
    """A trainer --out folder (its latest step), a step-* folder or a model folder, as a Stage1Checkpoint;
    errors start with `where` (e.g. "--stage1 DIR")."""
    step, model_dir = resolve_checkpoint(folder)
    if not (model_dir / CONFIG_NAME).exists():
        raise ConfigError(f"{where}: no Stage 1 Q-Former there ({CONFIG_NAME}); pass a `capfilt train stage1 --out` "
                          f"folder, one of its step-* folders or its model/ folder.")
    info_path = next((p for p in (step / "stage1.json", model_dir.parent / "stage1.json") if p.exists()), None)
    info = json.loads(info_path.read_text()) if info_path else {}
    return Stage1Checkpoint(step, model_dir, info, saved_vision(model_dir) or info.get("vision"), where)


class Stage1Scorer(ItmScorer):
    """A trained Q-Former with its tokenizer and frozen encoder, in eval mode."""

    def __init__(self, model: QFormer, tokenizer, encoder: FrozenImageEncoder, device: torch.device, id: str = "stage1"):
        self.model, self.tokenizer, self.encoder, self.device = model.eval().to(device), tokenizer, encoder, device
        self.id = id

    @classmethod
    def from_checkpoint(cls, folder: str | Path, vision: str | None = None, device: str = "auto") -> "Stage1Scorer":
        """`folder`: a trainer --out folder (its latest step), a step-* folder, or a model folder.

        The image encoder is the one the model folder names (or, saved before it did, its step's
        stage1.json) unless `vision` is given.
        """
        checkpoint = stage1_checkpoint(folder, str(folder))
        vision, model_dir = checkpoint.encoder(vision), checkpoint.model_dir
        device = pick_device(device)
        return cls(QFormer.from_pretrained(model_dir, device), load_tokenizer(model_dir),
                   load_vision_encoder(vision, device), device, id=str(folder))

    def _pixels(self, image) -> torch.Tensor:
        if isinstance(image, (bytes, bytearray, memoryview)):
            return image_pixels(bytes(image), self.encoder.preprocess)
        return pil_pixels(image, self.encoder.preprocess)

    def _tokens(self, images: list) -> torch.Tensor:
        """Image tokens (after ln_vision) of encoded images (bytes) or decoded PIL images."""
        pixels = torch.stack([self._pixels(image) for image in images]).to(self.device)
        return self.model.prepare_image(self.encoder(pixels))

    def _text(self, texts: list[str]):
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.model.config.max_text_length, return_tensors="pt")
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    @torch.no_grad()
    def image_embeddings(self, images: list[bytes]) -> torch.Tensor:
        """(N, Q, D) L2-normalised query embeddings of encoded images (JPEG/PNG bytes)."""
        return self.model.image_features(self._tokens(images))

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """(N, D) L2-normalised text embeddings."""
        return self.model.text_features(*self._text(texts))

    @torch.no_grad()
    def itm_scores(self, images: list, texts: list[str], image_of: list[int] | None = None) -> torch.Tensor:
        """(N,) probability that image i (bytes or PIL image) matches text i; with `image_of`, text
        i's image is images[image_of[i]] (each image through the frozen encoder once)."""
        tokens = self._tokens(images)
        if image_of is not None:
            tokens = tokens[torch.as_tensor(image_of, dtype=torch.long, device=tokens.device)]
        logits = self.model.itm_logits(tokens, *self._text(texts))
        return logits.float().softmax(dim=1)[:, 1]

    def match_probability(self, images, texts) -> np.ndarray:
        """ItmScorer: the Filter stage's ITM score of each (images[i], texts[i])."""
        return self.itm_scores(images, [t or "" for t in texts]).cpu().numpy()

    def match_probability_of(self, images, image_of, texts) -> np.ndarray:
        """ItmScorer: each (images[image_of[i]], texts[i]); an image's captions share its encoding."""
        return self.itm_scores(images, [t or "" for t in texts], image_of).cpu().numpy()

    @torch.no_grad()
    def pair_logits(self, tokens: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, image_rows: torch.Tensor,
                    text_rows: torch.Tensor, pairs_per_forward: int = 256) -> torch.Tensor:
        """(P,) ITM match logits of the pairs (image tokens[image_rows[p]], text ids[text_rows[p]]),
        `pairs_per_forward` pairs per Q-Former pass rather than one query's few: each pass projects
        its distinct images' cross-attention keys and values once (SharedImages) and pads its texts
        to the longest among them (padding is masked out: the same logits, up to float rounding)."""
        image_rows, text_rows = image_rows.to(tokens.device), text_rows.to(ids.device)
        logits = []
        for start in range(0, len(image_rows), pairs_per_forward):
            images, index = image_rows[start:start + pairs_per_forward].unique(return_inverse=True)
            texts = text_rows[start:start + pairs_per_forward]
            text_mask = mask[texts]
            length = int(text_mask.sum(dim=1).max())
            logits.append(self.model.itm_logits(tokens[images], ids[texts][:, :length], text_mask[:, :length],
                                                image_index=index)[:, 1])
        return torch.cat(logits) if logits else tokens.new_zeros(0)

    @torch.no_grad()
    def retrieve_images(self, texts: list[str], images: list[bytes], k: int = 128) -> torch.Tensor:
        """(len(texts), min(k, len(images))) image indices, best first: ITC top-k re-ranked by ITM.

        The re-ranking score is the ITM match logit plus the ITC similarity, as in LAVIS.
        """
        tokens = self._tokens(images)
        image_feats = self.model.image_features(tokens)  # (N, Q, D)
        ids, mask = self._text(texts)
        text_feats = self.model.text_features(ids, mask)  # (T, D)
        sims = torch.einsum("td,nqd->tnq", text_feats, image_feats).amax(dim=-1)
        top_sim, top = sims.topk(min(k, len(images)), dim=1)
        rows = torch.arange(len(texts), device=top.device).repeat_interleave(top.shape[1])
        logits = self.pair_logits(tokens, ids, mask, top.flatten(), rows).view(top.shape)
        return top.gather(1, (logits.float() + top_sim).argsort(dim=1, descending=True))


def recall_at_1(ranked: torch.Tensor, truth: list[int]) -> float:
    """Fraction of queries whose first result is the true one."""
    return float((ranked[:, 0].cpu() == torch.tensor(truth)).float().mean())
