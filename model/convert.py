"""Conversion of official checkpoints to and from capfilt's models, in one place.

    Stage 1 (the Q-Former)   LAVIS state dicts (Salesforce's blip2_pretrained.pth)
                               lavis_to_capfilt / capfilt_to_lavis
                             transformers' Blip2ForImageTextRetrieval
                               hf_retrieval_to_capfilt / capfilt_to_hf_retrieval
                             load_into: mapped weights into a QFormer, unknown keys an error
    Stage 2 (BLIP-2)         transformers' Blip2ForConditionalGeneration (Salesforce/blip2-opt-2.7b, ...)
                               load_blip2 (in) / export_blip2 (out: a folder transformers loads)

Stage 1: capfilt's parameter names are HF's (see model/qformer.py), so the HF mapping is nearly
the identity; LAVIS's needs renaming. Key mapping, LAVIS -> capfilt:

  Qformer.bert.embeddings.{word,position}_embeddings  -> embeddings.{word,position}_embeddings
  Qformer.bert.embeddings.LayerNorm                   -> qformer.layernorm
  Qformer.bert.encoder.layer.N.attention.self.*       -> qformer.encoder.layer.N.attention.attention.*
  Qformer.bert.encoder.layer.N.crossattention.self.*  -> qformer.encoder.layer.N.crossattention.attention.*
  Qformer.bert.encoder.* (everything else)            -> qformer.encoder.* (same names)
  Qformer.cls.predictions.transform.dense             -> lm_head.dense
  Qformer.cls.predictions.transform.LayerNorm         -> lm_head.layer_norm
  Qformer.cls.predictions.bias / .decoder.bias        -> lm_head.decoder.bias
  Qformer.cls.predictions.decoder.weight              -> (tied to embeddings.word_embeddings)
  vision_proj / text_proj                             -> vision_projection / text_projection
  query_tokens, itm_head, temp, ln_vision             -> same names
  visual_encoder.*, *.position_ids                    -> not part of the Q-Former (dropped)

HF Blip2ForImageTextRetrieval -> capfilt: `vision_model.post_layernorm` -> `ln_vision`, the
rest of `vision_model.*` is the frozen encoder (load it as a Blip2VisionModel), every other key
keeps its name. HF has no ITG head and no temperature: those keep their init (reported).

Stage 2: Blip2ForConditionalGeneration's vision_model (minus post_layernorm) is the frozen
Blip2VisionModel encoder, vision_model.post_layernorm the Q-Former's ln_vision, query_tokens and
qformer.* the Q-Former (same names), language_projection the projection, language_model the LLM.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import torch

from capfilt.device import inference_dtype
from capfilt.errors import ConfigError, first_line

from .blip2 import Blip2Stage2, Stage2ModelConfig, read_model_config, resolve_checkpoint
from .llm import caption_end_id, freeze, prepare_llm_tokenizer
from .qformer import QFormer, QFormerConfig
from .vision import FrozenImageEncoder, Preprocess, TransformersEncoder, load_vision_encoder


# -- Stage 1: LAVIS and Blip2ForImageTextRetrieval state dicts ----------------------------------

# LAVIS name -> capfilt name, first match wins in either direction; {layer} is a layer number and
# {attn} attention or crossattention. The second bias row is only read LAVIS -> capfilt (older
# LAVIS checkpoints name the MLM bias under decoder.).
_LAVIS_NAMES = [
    ("Qformer.bert.embeddings.LayerNorm.", "qformer.layernorm."),
    ("Qformer.bert.embeddings.", "embeddings."),
    ("Qformer.bert.encoder.layer.{layer}.{attn}.self.", "qformer.encoder.layer.{layer}.{attn}.attention."),
    ("Qformer.bert.encoder.", "qformer.encoder."),
    ("Qformer.cls.predictions.transform.dense.", "lm_head.dense."),
    ("Qformer.cls.predictions.transform.LayerNorm.", "lm_head.layer_norm."),
    ("Qformer.cls.predictions.bias$", "lm_head.decoder.bias$"),
    ("Qformer.cls.predictions.decoder.bias$", "lm_head.decoder.bias$"),
    ("vision_proj.", "vision_projection."),
    ("text_proj.", "text_projection."),
]
_FIELDS = {"{layer}": r"(\d+)", "{attn}": "(attention|crossattention)"}


def _rules(to_capfilt: bool) -> list[tuple[str, str]]:
    """The (pattern, replacement) regex rules of one direction, built from _LAVIS_NAMES."""
    rules = []
    for lavis, capfilt in _LAVIS_NAMES:
        source, target = (lavis, capfilt) if to_capfilt else (capfilt, lavis)
        pattern, replacement = "^" + re.escape(source).replace(r"\$", "$"), target.rstrip("$")
        for k, (field, group) in enumerate(_FIELDS.items(), start=1):
            pattern = pattern.replace(re.escape(field), group)
            replacement = replacement.replace(field, f"\\{k}")
        rules.append((pattern, replacement))
    return rules


_LAVIS_TO_CAPFILT, _CAPFILT_TO_LAVIS = _rules(True), _rules(False)
_DROPPED = re.compile(r"(^visual_encoder\.|position_ids$|^Qformer\.cls\.predictions\.decoder\.weight$|^lm_head\.decoder\.weight$)")


def _rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    return key


def lavis_to_capfilt(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LAVIS blip2 (Stage 1) state dict, e.g. blip2_pretrained.pth['model'], in capfilt's names."""
    return {_rename(k, _LAVIS_TO_CAPFILT): v for k, v in state_dict.items() if not _DROPPED.search(k)}


def capfilt_to_lavis(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """capfilt's Q-Former state dict in LAVIS's names (the tied decoder weight written out, as LAVIS has it)."""
    out = {_rename(k, _CAPFILT_TO_LAVIS): v for k, v in state_dict.items() if not _DROPPED.search(k)}
    out["Qformer.cls.predictions.decoder.weight"] = state_dict["embeddings.word_embeddings.weight"]
    return out


def hf_retrieval_to_capfilt(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Blip2ForImageTextRetrieval state dict's Q-Former part in capfilt's names."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("vision_model.post_layernorm."):
            out["ln_vision." + key.rsplit(".", 1)[1]] = value
        elif not key.startswith("vision_model.") and not key.endswith("position_ids"):
            out[key] = value
    return out


def capfilt_to_hf_retrieval(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Q-Former part of a Blip2ForImageTextRetrieval state dict (add the vision model's own)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("ln_vision."):
            out["vision_model.post_layernorm." + key.rsplit(".", 1)[1]] = value
        elif not key.startswith(("lm_head.", "temp")):
            out[key] = value
    return out


def load_into(model: QFormer, state_dict: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load mapped weights; returns the model keys they did not cover. Unknown keys are an error."""
    result = model.load_state_dict(state_dict, strict=False)
    if result.unexpected_keys:
        raise ConfigError(
            f"{source}: {len(result.unexpected_keys)} weight(s) have no place in this Q-Former, e.g. "
            f"{result.unexpected_keys[:3]}; is the Q-Former config the checkpoint's (layers, queries, widths)?"
        )
    return [k for k in result.missing_keys if k != "lm_head.decoder.weight"]  # tied to the embeddings


# -- Stage 2: Blip2ForConditionalGeneration ---------------------------------------------------

def load_blip2(id_or_path: str, device: str | torch.device = "cpu") -> tuple[Blip2Stage2, FrozenImageEncoder]:
    """(model, frozen encoder) from a Blip2ForConditionalGeneration checkpoint, e.g.
    Salesforce/blip2-opt-2.7b or Salesforce/blip2-flan-t5-xl (hub id or folder).

    Mapping: vision_model (minus post_layernorm) -> frozen Blip2VisionModel encoder,
    vision_model.post_layernorm -> qformer.ln_vision, query_tokens / qformer.* -> the Q-Former
    (same names), language_projection -> language_projection, language_model -> the LLM.
    """
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    device = torch.device(device)
    dtype = inference_dtype(device)
    try:
        hf = Blip2ForConditionalGeneration.from_pretrained(id_or_path, dtype=dtype)
        processor = AutoProcessor.from_pretrained(id_or_path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{id_or_path}: not a Blip2ForConditionalGeneration checkpoint with processor ({first_line(exc)}).") from exc
    qc, vc, tc = hf.config.qformer_config, hf.config.vision_config, hf.config.text_config
    qconfig = QFormerConfig(
        vocab_size=qc.vocab_size, hidden_size=qc.hidden_size, num_hidden_layers=qc.num_hidden_layers,
        num_attention_heads=qc.num_attention_heads, intermediate_size=qc.intermediate_size,
        cross_attention_frequency=qc.cross_attention_frequency, max_position_embeddings=qc.max_position_embeddings,
        hidden_dropout_prob=qc.hidden_dropout_prob, attention_probs_dropout_prob=qc.attention_probs_dropout_prob,
        layer_norm_eps=qc.layer_norm_eps, num_query_tokens=hf.config.num_query_tokens,
        vision_width=vc.hidden_size, vision_layer_norm_eps=vc.layer_norm_eps, pad_token_id=qc.pad_token_id or 0,
    )
    qformer = QFormer(qconfig)
    # the Q-Former's keys are named as in Blip2ForImageTextRetrieval; the LLM and projection are not its
    mapped = {k: v for k, v in hf_retrieval_to_capfilt(hf.state_dict()).items()
              if k == "query_tokens" or k.startswith(("qformer.", "ln_vision."))}
    result = qformer.load_state_dict(mapped, strict=False)
    if result.unexpected_keys:
        raise ConfigError(f"{id_or_path}: Q-Former weights without a place: {result.unexpected_keys[:3]}.")
    kind = "causal" if hf.config.use_decoder_only_language_model else "seq2seq"
    tokenizer = prepare_llm_tokenizer(processor.tokenizer, str(id_or_path))
    config = Stage2ModelConfig(qformer=asdict(qconfig), llm=str(id_or_path), llm_kind=kind,
                               llm_hidden_size=tc.hidden_size if kind == "causal" else tc.d_model,
                               vision=str(id_or_path), caption_end=_checkpoint_caption_end(hf, tokenizer, kind, id_or_path))
    model = Blip2Stage2(qformer, freeze(hf.language_model), tokenizer, config)
    model.language_projection.load_state_dict(hf.language_projection.state_dict())
    # Blip2VisionModel's hidden_states[-1] is before post_layernorm (now ln_vision), as capfilt's
    # blip-2 encoders are read (model/vision.py).
    size = vc.image_size
    mean = tuple(getattr(processor.image_processor, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
    std = tuple(getattr(processor.image_processor, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
    encoder = TransformersEncoder(str(id_or_path), hf.vision_model, Preprocess(int(size), mean, std), -1).freeze()
    return model.to(device).float_trainable(), encoder.to(device)


def _checkpoint_caption_end(hf, tokenizer, kind: str, where) -> str:
    """Where a transformers BLIP-2 checkpoint's own `generate` stops: its language model's eos.

    Salesforce's OPT checkpoints end captions with "\n" (LAVIS trains caption + "\n"), and
    transformers' conversion sets the OPT text config's eos to "\n"; the tokenizer's eos stays
    `</s>`. Reading the generation config keeps that convention instead of the tokenizer's.
    """
    eos = hf.language_model.generation_config.eos_token_id
    if eos is None:
        eos = hf.config.text_config.eos_token_id
    ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    if kind != "causal" or ids == {tokenizer.eos_token_id} or None in ids:
        return "eos"
    try:
        newline = caption_end_id(tokenizer, kind, "newline")
    except ConfigError:
        newline = None
    if newline in ids:
        return "newline"
    raise ConfigError(f"{where}: its language model stops at token(s) {sorted(ids)}, neither the tokenizer's eos "
                      f"({tokenizer.eos_token_id}) nor '\\n'; capfilt cannot end its captions the same way.")


# -- export to transformers ----------------------------------------------------------------------

def export_blip2(checkpoint: str | Path, out: str | Path, vision: str | None = None) -> Path:
    """Write a transformers Blip2ForConditionalGeneration folder (model + Blip2Processor).

    Needs a Blip2VisionModel-compatible encoder (a blip-2 / blip_2_vision_model --vision);
    open_clip, CLIP and SigLIP towers have no place in that class. The LLM tokenizer gains an
    `<image>` token (as transformers' BLIP-2 repos have); it takes a spare embedding row when the
    LLM has one (OPT and T5 pad their vocabularies), else the embeddings grow by one row
    (transformers' mean initialisation; that token is never fed, only its row is scored).
    `ln_vision` becomes `vision_model.post_layernorm`, whose eps is the vision config's (1e-6 in
    BLIP-2 configs) where capfilt's ln_vision uses LAVIS's 1e-5: a difference far below what
    changes a token in the tests, but not bit-identical hidden states.
    """
    from transformers import (
        AutoConfig,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionModel,
        BlipImageProcessor,
    )

    _, model_dir = resolve_checkpoint(checkpoint)
    config = read_model_config(model_dir)
    spec = vision or config.vision
    if config.instruction_aware:
        raise ConfigError(f"{checkpoint}: an instruction-aware Q-Former is InstructBLIP, not "
                          f"Blip2ForConditionalGeneration; export is not supported for it.")
    if not spec or spec.startswith("open_clip:") or AutoConfig.from_pretrained(spec).model_type not in ("blip-2", "blip_2_vision_model"):
        raise ConfigError(
            f"{checkpoint}: its image encoder {spec!r} is not a Blip2VisionModel, so it cannot be written as "
            f"Blip2ForConditionalGeneration; train Stage 1 with a blip-2 vision model (--vision) to export."
        )
    model = Blip2Stage2.from_pretrained(model_dir, "cpu")
    encoder = load_vision_encoder(spec, "cpu", torch.float32)
    vision_model = encoder.model
    if not isinstance(vision_model, Blip2VisionModel):
        raise ConfigError(f"--vision {spec}: loaded as {type(vision_model).__name__}, not Blip2VisionModel.")
    tokenizer = model.tokenizer
    llm = model.language_model
    if "<image>" not in tokenizer.get_vocab():
        from transformers import AddedToken

        tokenizer.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    if image_token >= llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(image_token + 1)
    tokenizer.image_token = "<image>"

    q = model.qformer.config
    qformer_config = Blip2QFormerConfig(
        vocab_size=q.vocab_size, hidden_size=q.hidden_size, num_hidden_layers=q.num_hidden_layers,
        num_attention_heads=q.num_attention_heads, intermediate_size=q.intermediate_size,
        hidden_dropout_prob=q.hidden_dropout_prob, attention_probs_dropout_prob=q.attention_probs_dropout_prob,
        max_position_embeddings=q.max_position_embeddings, initializer_range=q.initializer_range,
        layer_norm_eps=q.layer_norm_eps, pad_token_id=q.pad_token_id, cross_attention_frequency=q.cross_attention_frequency,
        encoder_hidden_size=q.vision_width,
    )
    text_config = llm.config.to_dict()
    text_config.update(eos_token_id=model.layout.eos, pad_token_id=tokenizer.pad_token_id)
    vision_config = vision_model.config.to_dict()
    blip2_config = Blip2Config(
        vision_config=vision_config, qformer_config=qformer_config.to_dict(), text_config=text_config,
        num_query_tokens=q.num_query_tokens, image_token_index=image_token,
    )
    hf = Blip2ForConditionalGeneration(blip2_config)
    state = {}
    for key, value in vision_model.state_dict().items():
        if not key.startswith("post_layernorm."):
            state["vision_model." + key] = value
    for key, value in capfilt_to_hf_retrieval(model.qformer.state_dict()).items():
        if key == "query_tokens" or key.startswith("vision_model.post_layernorm.") or (
                key.startswith("qformer.") and not _text_ffn(key)):
            state[key] = value
    for key, value in model.language_projection.state_dict().items():
        state["language_projection." + key] = value
    for key, value in llm.state_dict().items():
        state["language_model." + key] = value
    result = hf.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    tied = set(getattr(hf, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied]
    if missing or result.unexpected_keys:
        raise ConfigError(f"export: weights did not map (missing {missing[:4]}, unexpected {result.unexpected_keys[:4]}).")
    out = Path(out)
    hf.save_pretrained(str(out))
    p = encoder.preprocess
    image_processor = BlipImageProcessor(size={"height": p.image_size, "width": p.image_size},
                                         image_mean=list(p.mean), image_std=list(p.std))
    Blip2Processor(image_processor, tokenizer, num_query_tokens=q.num_query_tokens).save_pretrained(str(out))
    return out


def _text_ffn(key: str) -> bool:
    """The Q-Former's text feed-forward, which Blip2ForConditionalGeneration's Q-Former lacks."""
    parts = key.split(".")
    return len(parts) > 4 and parts[1] == "encoder" and parts[4] in ("intermediate", "output")
