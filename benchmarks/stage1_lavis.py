"""Stage 1 loss step (forward + backward of ITC + ITM + ITG) against a LAVIS-equivalent reference.

    uv run python -m benchmarks.stage1_lavis [--repeats 8] [--batch-size 16] [--threads 1]

The reference is written here from the published math of LAVIS's `Blip2Qformer.forward`
(salesforce/LAVIS, blip2_qformer.py), over the SAME parameters as capfilt's Q-Former (its
embeddings, attention, feed-forward and head modules; only the pass structure is LAVIS's):
  1. a query-only pass cross-attending to the image, keeping each layer's self-attention keys
     and values (LAVIS `use_cache=True`);
  2. a text-only pass with the padding mask (ITC's text side);
  3. ITC: best query per pair, learnable temperature, label smoothing 0.1;
  4. ITM: one negative text per image and one negative image per text, a [queries ; text] pass
     with the bidirectional padding mask, the ITM head averaged over queries;
  5. ITG: [DEC] as BOS, a text-only pass whose self-attention reads the query pass's cached
     keys and values (queries all visible, text causal), the LM head, label smoothing 0.1.
Attention is `scaled_dot_product_attention` in both, so the comparison is the pass structure,
not the kernel. Negatives are drawn uniformly from the same generator in both, so both compute
the same pairs; before timing, the losses and gradients of the two are checked equal (dropout
off). Stated config (the issue's): hidden 256, 4 layers, 4 heads, 32 queries, batch 16, text 32
tokens, 197 image tokens of width 384 (a ViT-S/16 at 224 px), dropout 0.1 while timing, CPU.
Runs alternate (capfilt, reference, capfilt, ...) so load on the machine hits both alike; the
figure is the median of each (CPU: this process's CPU time, robust to neighbours on shared cores).
On a GPU both run there under bf16 autocast with SDPA (fused kernels where the mask allows), and
the line adds the step's FLOPs (torch's FlopCounterMode) and capfilt's MFU against the device's
dense bf16 peak (CAPFILT_PEAK_TFLOPS overrides the built-in table).
Prints one JSON line: ms per step and capfilt's speed as a ratio (reference time / capfilt time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from model.losses import Stage1Losses, itc_loss, sample_hard_negatives, stage1_losses  # noqa: E402
from model.qformer import QFormer, QFormerConfig  # noqa: E402

CONFIG = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
              num_query_tokens=32, embed_dim=128, max_position_embeddings=64, vision_width=384, vocab_size=1000,
              cls_token_id=101, dec_token_id=999)
IMAGE_TOKENS = 197
TEXT_LENGTH = 32


# -- the reference: LAVIS's passes over capfilt's parameters -----------------------------------

class LavisReference:
    def __init__(self, model: QFormer):
        self.model = model
        self.layers = model.qformer.encoder.layer

    def _attention(self, block, hidden, mask=None, context=None, past=None):
        """BERT attention + output block; returns (output, (keys, values)) for a cache."""
        attn = block.attention
        heads, size = attn.num_attention_heads, attn.attention_head_size

        def split(x):
            return x.view(x.shape[0], x.shape[1], heads, size).transpose(1, 2)

        source = hidden if context is None else context
        q, k, v = split(attn.query(hidden)), split(attn.key(source)), split(attn.value(source))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        p = attn.attention_dropout if self.model.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1)
        return block.output(out, hidden), (k, v)

    def _embed(self, input_ids=None, queries=None):
        embeds = self.model.embeddings(input_ids=input_ids, query_embeds=queries)
        return self.model.qformer.dropout(self.model.qformer.layernorm(embeds))

    def encode(self, embeds, mask, query_length, image=None, past=None):
        """LAVIS's BertModel: returns (last hidden state, per-layer self-attention (k, v))."""
        hidden, cache = embeds, []
        for i, layer in enumerate(self.layers):
            attended, kv = self._attention(layer.attention, hidden, mask, past=None if past is None else past[i])
            cache.append(kv)
            if query_length > 0:
                query = attended[:, :query_length]
                if layer.has_cross_attention:
                    query, _ = self._attention(layer.crossattention, query, context=image)
                out = layer.feed_forward_chunk_query(query)
                if attended.shape[1] > query_length:
                    out = torch.cat([out, layer.feed_forward_chunk(attended[:, query_length:])], dim=1)
                hidden = out
            else:
                hidden = layer.feed_forward_chunk(attended)
        return hidden, cache

    def losses(self, image_features, input_ids, attention_mask, image_ids, generator) -> Stage1Losses:
        m = self.model
        m.clamp_temperature()
        image = m.prepare_image(image_features)
        batch, q = input_ids.shape[0], m.config.num_query_tokens
        queries = m.query_tokens.expand(batch, -1, -1)
        # 1. query pass, cache kept
        query_out, query_cache = self.encode(self._embed(queries=queries), None, q, image)
        image_feats = F.normalize(m.vision_projection(query_out), dim=-1)
        # 2. text pass (padding mask, broadcast over rows as LAVIS's extended mask is)
        pad = attention_mask.bool()[:, None, None, :]
        text_out, _ = self.encode(self._embed(input_ids=input_ids), pad, 0)
        text_feat = F.normalize(m.text_projection(text_out[:, 0]), dim=-1)
        # 3. ITC
        itc = itc_loss(image_feats, text_feat, m.temp)
        # 4. ITM on (pos), (image, negative text), (negative image, text)
        positive = image_ids[:, None] == image_ids[None, :]
        with torch.no_grad():
            neg_image = sample_hard_negatives(itc.sim_t2i, positive, generator, hard=False)
            neg_text = sample_hard_negatives(itc.sim_i2t, positive, generator, hard=False)
        pair_images = torch.cat([image, image, m.prepare_image(image_features[neg_image])])
        pair_ids = torch.cat([input_ids, input_ids[neg_text], input_ids])
        pair_mask = torch.cat([attention_mask, attention_mask[neg_text], attention_mask])
        device = input_ids.device
        ones = torch.ones(3 * batch, q, dtype=torch.bool, device=device)
        itm_mask = torch.cat([ones, pair_mask.bool()], dim=1)[:, None, None, :]
        itm_queries = m.query_tokens.expand(3 * batch, -1, -1)
        itm_out, _ = self.encode(self._embed(input_ids=pair_ids, queries=itm_queries), itm_mask, q, pair_images)
        logits = m.itm_head(itm_out[:, :q]).mean(dim=1)
        labels = torch.cat([torch.ones(batch, dtype=torch.long, device=device),
                            torch.zeros(2 * batch, dtype=torch.long, device=device)])
        itm = F.cross_entropy(logits.float(), labels)
        # 5. ITG: text-only pass over the query cache
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = m.config.dec_token_id
        targets = decoder_ids.masked_fill(attention_mask == 0, -100)
        length = input_ids.shape[1]
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=device))[None] & attention_mask.bool()[:, None, :]
        itg_mask = torch.cat([torch.ones(batch, length, q, dtype=torch.bool, device=device), causal], dim=2)[:, None]
        itg_out, _ = self.encode(self._embed(input_ids=decoder_ids), itg_mask, 0, past=query_cache)
        itg_logits = m.lm_head(itg_out)
        itg = F.cross_entropy(itg_logits[:, :-1].reshape(-1, itg_logits.shape[-1]).float(), targets[:, 1:].reshape(-1),
                              ignore_index=-100, label_smoothing=0.1)
        return Stage1Losses(itc.loss + itm + itg, itc.loss, itm, itg, torch.zeros((), device=device))


# -- measuring ----------------------------------------------------------------------------------

def inputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, IMAGE_TOKENS, CONFIG["vision_width"], generator=g)
    lengths = torch.randint(8, TEXT_LENGTH + 1, (batch,), generator=g)
    mask = (torch.arange(TEXT_LENGTH)[None] < lengths[:, None]).long()
    ids = torch.randint(5, CONFIG["vocab_size"] - 1, (batch, TEXT_LENGTH), generator=g) * mask
    ids[:, 0] = CONFIG["cls_token_id"]
    return features, ids, mask, torch.arange(batch)


def capfilt_losses(model, features, ids, mask, image_ids, generator):
    return stage1_losses(model, features, ids, mask, image_ids, generator=generator, hard_negatives=False)


def check_equal(model: QFormer, reference: LavisReference, data) -> dict:
    """Losses and gradients of capfilt and the reference, dropout off: they must agree."""
    model.eval()
    results = []
    for fn in (lambda *a: capfilt_losses(model, *a), reference.losses):
        model.zero_grad()
        out = fn(*data, torch.Generator().manual_seed(0))
        out.total.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    model.train()
    loss_diff = max(abs(float(getattr(a, k).detach() - getattr(b, k).detach())) for k in ("itc", "itm", "itg"))
    grad_diff = max(float((ga[n] - gb[n]).abs().max()) for n in ga)
    return {"max_loss_diff": loss_diff, "max_grad_diff": grad_diff, "same_params": sorted(ga) == sorted(gb)}


def step_seconds(fn, model, data, clock) -> float:
    model.zero_grad(set_to_none=True)
    start = clock()
    fn(*data, torch.Generator(device=data[0].device).manual_seed(0)).total.backward()
    if data[0].is_cuda:
        torch.cuda.synchronize()
    return clock() - start


def measure(repeats: int = 8, batch: int = 16, autocast_dtype=None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = QFormer(QFormerConfig(**CONFIG))
    reference = LavisReference(model)
    data = inputs(batch)
    check = check_equal(model, reference, data) if device.type == "cpu" else None
    model.to(device).train()
    data = tuple(t.to(device) for t in data)
    clock = time.perf_counter if device.type == "cuda" else time.process_time  # CPU: this process's time

    def timed(fn):
        def run(*args):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                return fn(*args)
        return run

    ours, theirs = timed(lambda *a: capfilt_losses(model, *a)), timed(reference.losses)
    for _ in range(2):  # warm-up
        step_seconds(ours, model, data, clock), step_seconds(theirs, model, data, clock)
    a, b = [], []
    for _ in range(repeats):
        a.append(step_seconds(ours, model, data, clock))
        b.append(step_seconds(theirs, model, data, clock))
    capfilt_ms, reference_ms = 1000 * statistics.median(a), 1000 * statistics.median(b)
    flops = step_flops(ours, model, data)
    peak = peak_flops(device)
    return {"device": device.type if device.type == "cpu" else torch.cuda.get_device_name(device),
            "threads": torch.get_num_threads(), "batch": batch, "repeats": repeats,
            "autocast": str(autocast_dtype) if autocast_dtype else None,
            "capfilt_ms": round(capfilt_ms, 1), "lavis_reference_ms": round(reference_ms, 1),
            "ratio": round(reference_ms / capfilt_ms, 2), "step_gflop": round(flops / 1e9, 2),
            "achieved_tflops": round(flops / (capfilt_ms / 1000) / 1e12, 3),
            # Model FLOPs utilisation: matmul/attention FLOPs of one step (forward + backward, counted
            # by torch's FlopCounterMode) per second, over the device's dense bf16 peak.
            "mfu": None if peak is None else round(flops / (capfilt_ms / 1000) / peak, 4),
            "equality_check": check}


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets; CAPFILT_PEAK_TFLOPS overrides.
PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "4090": 165}


def peak_flops(device: torch.device) -> float | None:
    import os

    if device.type != "cuda":
        return None
    if os.environ.get("CAPFILT_PEAK_TFLOPS"):
        return float(os.environ["CAPFILT_PEAK_TFLOPS"]) * 1e12
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def step_flops(fn, model, data) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        fn(*data, torch.Generator(device=data[0].device).manual_seed(0)).total.backward()
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available()
    print(json.dumps(measure(args.repeats, args.batch_size, autocast_dtype=torch.bfloat16 if gpu else None)))


if __name__ == "__main__":
    main()
