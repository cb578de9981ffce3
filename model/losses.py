"""The three Stage 1 losses of BLIP-2 (LAVIS `blip2_qformer.py` semantics), one short block each.

  ITC  image-text contrastive: similarity of a pair = max over queries of query·text; targets are
       the diagonal of the gathered batch; learnable temperature; label smoothing.
  ITM  image-text matching: one hard negative text per image and one hard negative image per
       text, sampled from the softmax of the ITC similarities with positives masked out; 3B pairs;
       the ITM head's logits averaged over the query outputs.
  ITG  image-grounded text generation: [DEC] replaces [CLS] as BOS; text is causal and sees all
       queries; queries never see text.

Deviations from LAVIS, each for a reason, are marked "LAVIS:" in comments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from capfilt.errors import ConfigError

from .qformer import QFormer


# -- cross-worker gathering ---------------------------------------------------------------------

def world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every worker along dim 0; no gradient flows through it."""
    rank, size = world()
    if size == 1:
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts, dim=0)


def gather_rows_no_grad(tensor: torch.Tensor, pad_value: int = 0) -> torch.Tensor:
    """`gather_no_grad` of (B, L) rows whose L may differ across workers (token ids and masks of
    batches padded to their own longest text): each worker's rows are right-padded to the longest."""
    rank, size = world()
    if size == 1:
        return tensor.detach()
    width = torch.tensor([tensor.shape[1]], device=tensor.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    return gather_no_grad(pad_columns(tensor, int(width), pad_value))


def pad_columns(tensor: torch.Tensor, width: int, pad_value: int = 0) -> torch.Tensor:
    """(B, L) right-padded with `pad_value` to (B, width)."""
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=pad_value)


def gather_with_local_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate from every worker; the local slice is `tensor` itself, so it keeps its gradient.

    LAVIS: `concat_all_gather` drops the gradient of every slice, local one included, when
    distributed, but keeps it when not. Keeping the local slice's gradient makes one worker and
    N workers compute the same thing for the local rows, and costs nothing.
    """
    rank, size = world()
    if size == 1:
        return tensor
    gathered = list(gather_no_grad(tensor).chunk(size, dim=0))
    gathered[rank] = tensor
    return torch.cat(gathered, dim=0)


# -- ITC ----------------------------------------------------------------------------------------

@dataclass
class ITCOutput:
    loss: torch.Tensor
    sim_i2t: torch.Tensor  # (B local, B all): local images vs all texts, already / temperature
    sim_t2i: torch.Tensor  # (B local, B all): local texts vs all images


def itc_loss(image_feats, text_feat, temp, label_smoothing: float = 0.1, local_grad: bool = True) -> ITCOutput:
    """image_feats (B, Q, D) and text_feat (B, D), L2-normalised, local to this worker.

    local_grad=False is LAVIS (`--itc-gather-grad none`): the gathered batch carries no gradient
    at all, so i2t trains only the image side and t2i only the text side, on any number of
    workers (LAVIS always runs under torch.distributed, where its gather drops every gradient).
    """
    rank, _ = world()
    gather = gather_with_local_grad if local_grad else gather_no_grad
    image_all = gather(image_feats)  # (N, Q, D)
    text_all = gather(text_feat)  # (N, D)
    # A pair's similarity is its best-matching query's.
    sim_i2t = torch.einsum("bqd,nd->bnq", image_feats, text_all).amax(dim=-1) / temp
    sim_t2i = torch.einsum("bd,nqd->bnq", text_feat, image_all).amax(dim=-1) / temp
    batch = image_feats.shape[0]
    # Workers hold equal batch sizes (the loader drops the ragged last batch), so this worker's
    # positives sit at rank * B + i of the gathered batch.
    targets = torch.arange(batch, device=image_feats.device) + rank * batch
    loss = (
        F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
        + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)
    ) / 2
    return ITCOutput(loss, sim_i2t, sim_t2i)


# -- ITM ----------------------------------------------------------------------------------------

def sample_hard_negatives(sim: torch.Tensor, positive: torch.Tensor, generator=None, hard: bool = True) -> torch.Tensor:
    """For each row, one column index sampled in proportion to softmax(sim) over non-positives
    (uniformly over non-positives when not `hard`).

    LAVIS: fills positives with -10000 before the softmax, which still samples a positive when a
    row has nothing else; here positives get probability exactly 0 and such a row is an error.
    """
    no_negative = positive.all(dim=1)
    if no_negative.any():
        row = int(no_negative.nonzero()[0, 0])
        raise ConfigError(
            f"ITM: row {row} of the batch has no negative (every sample in the gathered batch of "
            f"{sim.shape[1]} shows the same image). Use a larger batch or deduplicated data."
        )
    scores = sim.float() if hard else torch.zeros_like(sim, dtype=torch.float32)
    weights = torch.softmax(scores.masked_fill(positive, float("-inf")), dim=1)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


@dataclass
class ITMOutput:
    loss: torch.Tensor
    accuracy: torch.Tensor


def itm_loss(
    model: QFormer,
    image_tokens: torch.Tensor,
    image_features_all: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_ids: torch.Tensor,
    itc: ITCOutput,
    generator=None,
    hard_negatives: bool = True,
) -> ITMOutput:
    """ITM on 3B pairs: (image, its text) match; (image, hard negative text) and (hard negative
    image, text) do not.

    image_tokens: this worker's ln_vision'ed image tokens (with gradient);
    image_features_all: every worker's frozen features before ln_vision (no gradient needed).
    LAVIS: gathers the ln_vision'ed tokens with gradient; the frozen features need none, so we
    gather those and apply ln_vision here: the same values, a cheaper all-gather.
    """
    # Each worker's texts are padded to its own longest (model/data.py): gathered rows to the
    # longest of all, and this worker's rows to that width (padding is masked out, so only the
    # shapes change).
    ids_all, mask_all = gather_rows_no_grad(input_ids), gather_rows_no_grad(attention_mask)
    input_ids, attention_mask = pad_columns(input_ids, ids_all.shape[1]), pad_columns(attention_mask, ids_all.shape[1])
    image_ids_all = gather_no_grad(image_ids)
    positive = image_ids[:, None] == image_ids_all[None, :]  # same image id = positive
    with torch.no_grad():
        neg_image_for_text = sample_hard_negatives(itc.sim_t2i, positive, generator, hard_negatives)
        neg_text_for_image = sample_hard_negatives(itc.sim_i2t, positive, generator, hard_negatives)
    batch = input_ids.shape[0]
    local = torch.arange(batch, device=input_ids.device)
    # Pairs (image, its text), (image, negative text), (negative image, text): 3B pairs of at
    # most 2B images, each image's cross-attention projected once (SharedImages).
    if world()[1] == 1:  # every negative image is one of this batch's, already ln_vision'ed
        images, negative_rows = image_tokens, neg_image_for_text
    else:
        images = torch.cat([image_tokens, model.prepare_image(image_features_all[neg_image_for_text])], dim=0)
        negative_rows = local + batch
    image_index = torch.cat([local, local, negative_rows])
    pair_ids = torch.cat([input_ids, ids_all[neg_text_for_image], input_ids], dim=0)
    pair_mask = torch.cat([attention_mask, mask_all[neg_text_for_image], attention_mask], dim=0)
    logits = model.itm_logits(images, pair_ids, pair_mask, image_index)
    labels = torch.cat([
        torch.ones(batch, dtype=torch.long, device=logits.device),
        torch.zeros(2 * batch, dtype=torch.long, device=logits.device),
    ])
    loss = F.cross_entropy(logits.float(), labels)
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return ITMOutput(loss, accuracy.detach())


# -- ITG ----------------------------------------------------------------------------------------

def itg_inputs(model: QFormer, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder input ids, labels): [DEC] replaces [CLS] as BOS; padding is not predicted."""
    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = model.config.dec_token_id
    return decoder_ids, decoder_ids.masked_fill(attention_mask == 0, -100)


def itg_loss_of(logits, labels, label_smoothing: float = 0.1) -> torch.Tensor:
    """Cross-entropy of predicting token t+1 at position t."""
    return F.cross_entropy(
        logits[:, :-1, :].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        label_smoothing=label_smoothing,
    )


def itg_loss(model: QFormer, image_tokens, input_ids, attention_mask, label_smoothing: float = 0.1) -> torch.Tensor:
    """Captioning loss on its own: predict token t+1 from [DEC], the text before it and all queries."""
    decoder_ids, labels = itg_inputs(model, input_ids, attention_mask)
    return itg_loss_of(model.itg_logits(image_tokens, decoder_ids, attention_mask), labels, label_smoothing)


# -- all three ----------------------------------------------------------------------------------

@dataclass
class Stage1Losses:
    total: torch.Tensor
    itc: torch.Tensor
    itm: torch.Tensor
    itg: torch.Tensor
    itm_accuracy: torch.Tensor


def stage1_losses(
    model: QFormer,
    image_features: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_ids: torch.Tensor,
    itc_label_smoothing: float = 0.1,
    itg_label_smoothing: float = 0.1,
    generator=None,
    hard_negatives: bool = True,
    itc_local_grad: bool = True,
) -> Stage1Losses:
    """ITC + ITM + ITG on one local batch of frozen image features and tokenized captions."""
    model.clamp_temperature()  # LAVIS clamps temp to [0.001, 0.5] in place before each forward
    image_tokens = model.prepare_image(image_features)
    # The query pass keeps its keys and values: ITG's text reads them instead of running the
    # queries again (LAVIS's past_key_values; the same values and gradients as a full ITG pass).
    query_hidden, query_cache = model.query_output(image_tokens, cache=True)
    image_feats = F.normalize(model.vision_projection(query_hidden), dim=-1)
    text_feat = model.text_features(input_ids, attention_mask)
    itc = itc_loss(image_feats, text_feat, model.temp, itc_label_smoothing, itc_local_grad)
    itm = itm_loss(
        model, image_tokens, gather_no_grad(image_features), input_ids, attention_mask, image_ids, itc, generator, hard_negatives
    )
    decoder_ids, itg_labels = itg_inputs(model, input_ids, attention_mask)
    itg_logits = model.itg_logits_cached(query_cache, decoder_ids, attention_mask)
    itg = itg_loss_of(itg_logits, itg_labels, itg_label_smoothing)
    return Stage1Losses(itc.loss + itm.loss + itg, itc.loss, itm.loss, itg, itm.accuracy)
