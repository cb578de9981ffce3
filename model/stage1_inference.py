"""A Stage 1 checkpoint at work: image and text embeddings, ITM scores, retrieval.

`Stage1Scorer.from_checkpoint(folder)` is what the Filter stage uses to score (image, caption)
pairs with capfilt's own ITM head; retrieval is BLIP-2's: ITC top-k, then ITM re-ranking.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from capfilt.device import pick_device
from capfilt.errors import ConfigError

from .qformer import QFormer, load_tokenizer
from .train_stage1 import LATEST_NAME, image_pixels
from .vision import FrozenImageEncoder, load_vision_encoder


class Stage1Scorer:
    """A trained Q-Former with its tokenizer and frozen encoder, in eval mode."""

    def __init__(self, model: QFormer, tokenizer, encoder: FrozenImageEncoder, device: torch.device):
        self.model, self.tokenizer, self.encoder, self.device = model.eval().to(device), tokenizer, encoder, device

    @classmethod
    def from_checkpoint(cls, folder: str | Path, vision: str | None = None, device: str = "auto") -> "Stage1Scorer":
        """`folder`: a trainer --out folder (its latest step), a step-* folder, or a model folder."""
        folder = Path(folder)
        if (folder / LATEST_NAME).exists():
            folder = folder / (folder / LATEST_NAME).read_text().strip()
        model_dir = folder / "model" if (folder / "model").is_dir() else folder
        if vision is None:
            info = folder / "stage1.json"
            if not info.exists():
                raise ConfigError(f"{folder}: no stage1.json saying which image encoder was used; pass vision=.")
            vision = json.loads(info.read_text())["vision"]
        device = pick_device(device)
        return cls(QFormer.from_pretrained(model_dir, device), load_tokenizer(model_dir),
                   load_vision_encoder(vision, device), device)

    def _tokens(self, images: list[bytes]) -> torch.Tensor:
        pixels = torch.stack([image_pixels(data, self.encoder.preprocess) for data in images]).to(self.device)
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
    def itm_scores(self, images: list[bytes], texts: list[str]) -> torch.Tensor:
        """(N,) probability that image i matches text i."""
        logits = self.model.itm_logits(self._tokens(images), *self._text(texts))
        return logits.float().softmax(dim=1)[:, 1]

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
        ranked = []
        for t in range(len(texts)):
            cand = top[t]
            logits = self.model.itm_logits(tokens[cand], ids[t:t + 1].expand(len(cand), -1),
                                           mask[t:t + 1].expand(len(cand), -1))
            order = (logits[:, 1].float() + top_sim[t]).argsort(descending=True)
            ranked.append(cand[order])
        return torch.stack(ranked)


def recall_at_1(ranked: torch.Tensor, truth: list[int]) -> float:
    """Fraction of queries whose first result is the true one."""
    return float((ranked[:, 0].cpu() == torch.tensor(truth)).float().mean())
