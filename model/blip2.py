"""BLIP-2's generative model: the Stage 1 Q-Former speaks to a frozen LLM through a soft visual prompt.

  frozen image tokens ─► Q-Former (Stage 1 weights) ─► query outputs (B, Q, H)
  ─► language_projection (Linear H -> LLM width) ─► soft prompt, put before the text embeddings
  ─► frozen LLM: decoder-only (OPT, any AutoModelForCausalLM) with the LM loss, or
     encoder-decoder (Flan-T5 / T5, AutoModelForSeq2SeqLM) with the prefix-LM loss.
Only the Q-Former and the projection train (model/stage2.py); the LLM has no gradients and sits
in bf16/fp16 on GPU (fp32 on CPU). Text layout: model/llm.py.

Instruction-aware Q-Former (InstructBLIP, `instruction_aware=True`): the prompt / question,
tokenized with the Q-Former's BERT tokenizer, joins the queries in the Q-Former's self-attention
with the bidirectional mask (queries and instruction see each other); only the query outputs go
on to the LLM.

A model folder is `save_pretrained`-style: config.json (model_type "capfilt-blip2-stage2",
Q-Former config, LLM id/folder, vision spec), model.safetensors (the trained Q-Former and
projection only; the frozen LLM is referenced, not copied), and the two tokenizers.
Generation with a frozen encoder: model/blip2_generate.py; to and from transformers'
Blip2ForConditionalGeneration: model/convert.py.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from capfilt.errors import ConfigError

from .captioners import SeededNucleusSampler
from .llm import TextLayout, load_llm, prepare_llm_tokenizer
from .qformer import QFormer, QFormerConfig, bidirectional_mask, load_tokenizer
from .trainer import resolve_latest
from .vision import FrozenImageEncoder

MODEL_TYPE = "capfilt-blip2-stage2"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LLM_TOKENIZER_DIR = "llm_tokenizer"
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"


# -- the model -----------------------------------------------------------------------------------

@dataclass
class Stage2ModelConfig:
    """What config.json of a Stage 2 model folder holds."""

    qformer: dict
    llm: str  # hub id or folder of the frozen LLM (absolute path when local)
    llm_kind: str  # causal | seq2seq
    llm_hidden_size: int
    vision: str | None = None  # the frozen encoder's spec (model/vision.py)
    instruction_aware: bool = False
    max_text_length: int = 32  # LLM tokens of a caption / prompt
    max_instruction_length: int = 32  # BERT tokens of an instruction (instruction-aware only)
    prompt: str = ""  # the prompt it was trained with: the default at generation
    caption_end: str = "eos"  # eos | newline: what ends a caption (decoder-only LLMs; see caption_end_id)
    model_type: str = MODEL_TYPE

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)


class Blip2Stage2(nn.Module):
    """Q-Former + language projection (trainable) in front of a frozen LLM."""

    def __init__(self, qformer: QFormer, llm: nn.Module, llm_tokenizer, config: Stage2ModelConfig, qformer_tokenizer=None):
        super().__init__()
        if config.instruction_aware and qformer_tokenizer is None:
            raise ConfigError("an instruction-aware Q-Former needs its BERT tokenizer (the Stage 1 model folder's).")
        self.config = config
        self.qformer = qformer
        self.language_projection = nn.Linear(qformer.config.hidden_size, config.llm_hidden_size)
        self.language_model = llm
        self.tokenizer = llm_tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        self.layout = TextLayout(llm_tokenizer, config.llm_kind, config.max_text_length, config.caption_end)
        # transformers' causal LMs can run their head on the last k positions only (see `loss`)
        self.keeps_logits = "logits_to_keep" in inspect.signature(llm.forward).parameters
        self.set_trainable()

    def set_trainable(self) -> None:
        """Gradients only where Stage 2 uses them (DDP needs every trainable parameter used).

        Used: queries, ln_vision, the Q-Former's self/cross-attention and query feed-forward;
        with instructions also the word/position embeddings and the text feed-forward of every
        layer but the last (the last one's text outputs are dropped). Stage 1's heads (ITC
        projections, ITM, LM head, temperature) stay as they were.
        """
        last = self.qformer.config.num_hidden_layers - 1
        for name, p in self.qformer.named_parameters():
            used = name == "query_tokens" or name.startswith(("ln_vision.", "qformer.layernorm."))
            parts = name.split(".")
            if name.startswith("qformer.encoder.layer."):
                block = parts[4]
                used = block in ("attention", "crossattention", "intermediate_query", "output_query")
                if self.config.instruction_aware and block in ("intermediate", "output"):
                    used = int(parts[3]) < last
            if self.config.instruction_aware and name.startswith("embeddings."):
                used = True
            p.requires_grad_(used)

    llm_train_mode = False  # the frozen LLM follows train() (dropout on, LAVIS) or stays in eval (see `freeze`)

    def train(self, mode: bool = True) -> "Blip2Stage2":
        super().train(mode)
        self.language_model.train(mode and self.llm_train_mode)
        return self

    @property
    def device(self) -> torch.device:
        return self.language_projection.weight.device

    # -- soft prompt ---------------------------------------------------------------------------
    def instruction_tokens(self, instructions: list[str]):
        enc = self.qformer_tokenizer(list(instructions), padding="longest", truncation=True,
                                     max_length=self.config.max_instruction_length, return_tensors="pt")
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def soft_prompt(self, image_features: torch.Tensor, instructions: list[str] | None = None) -> torch.Tensor:
        """(B, Q, LLM width) from the frozen encoder's image tokens."""
        q = self.qformer
        tokens = q.prepare_image(image_features)
        queries = q.query_tokens.expand(tokens.shape[0], -1, -1)
        if not self.config.instruction_aware:
            # Called exactly as Blip2ForConditionalGeneration calls it, so exports match.
            hidden = q.qformer(query_embeds=queries, encoder_hidden_states=tokens).last_hidden_state
        else:
            if instructions is None:
                instructions = [self.config.prompt] * tokens.shape[0]
            ids, mask = self.instruction_tokens(instructions)
            embeds = q.embeddings(input_ids=ids, query_embeds=queries)
            n = queries.shape[1]
            hidden = q._encode(embeds, bidirectional_mask(n, mask), n, tokens)[:, :n, :]
        return self.language_projection(hidden)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(ids.to(self.device))

    # -- loss ----------------------------------------------------------------------------------
    def loss(self, image_features, input_ids, attention_mask, labels, instructions=None) -> torch.Tensor:
        """LM loss (decoder-only) or prefix-LM loss (encoder-decoder), mean over target tokens."""
        dtype = self.language_model.dtype
        prompt = self.soft_prompt(image_features, instructions)
        batch, n = prompt.shape[:2]
        ones = torch.ones(batch, n, dtype=attention_mask.dtype, device=self.device)
        embeds = torch.cat([prompt.to(dtype), self._embed(input_ids)], dim=1)
        mask = torch.cat([ones, attention_mask.to(self.device)], dim=1)
        # use_cache=False: one pass, nothing generated, so no key/value cache to build.
        if self.config.llm_kind == "causal":
            # Position t predicts token t + 1: of the queries only the last one predicts a label
            # (the text's first). The LM head, vocabulary-wide and so the LLM's largest layer, and
            # the loss run on the last T + 1 positions only where the LLM allows it; same loss.
            kept = labels.shape[1] + 1 if self.keeps_logits else n + labels.shape[1]
            ignore = torch.full((batch, kept - labels.shape[1]), -100, dtype=labels.dtype, device=self.device)
            extra = {"logits_to_keep": kept} if self.keeps_logits else {}
            out = self.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False,
                                      labels=torch.cat([ignore, labels.to(self.device)], dim=1), **extra)
        else:
            out = self.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False,
                                      labels=labels.to(self.device))
        return out.loss

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate_ids(self, image_features, prompts: list[str], *, num_beams=5, max_new_tokens=30, min_new_tokens=1,
                     num_return_sequences=1, repetition_penalty=1.0, top_p=None, seeds=None,
                     instructions: list[str] | None = None, length_penalty: float = 1.0) -> list[list[int]]:
        """New token ids (eos and padding removed), `num_return_sequences` rows per image in a row.

        Sampling (top_p set) draws with `SeededNucleusSampler`: row r uses seeds[r] only.
        """
        batch = image_features.shape[0]
        if instructions is None and self.config.instruction_aware:
            instructions = prompts
        prompt = self.soft_prompt(image_features, instructions).to(self.language_model.dtype)
        n = prompt.shape[1]
        ids = [self.layout.prompt_ids(p) for p in prompts]
        width = max(len(i) for i in ids)
        rows, masks, placeholders = [], [], []
        pad = self.layout.pad
        for b, row in enumerate(ids):
            fill = width - len(row)
            emb = self._embed(torch.tensor(row + [pad] * fill, dtype=torch.long))
            emb, padding = emb[:len(row)], emb[len(row):]
            if self.config.llm_kind == "causal":
                # left padding: generation continues right after the prompt
                rows.append(torch.cat([padding, prompt[b], emb]))
                masks.append([0] * fill + [1] * (n + len(row)))
                placeholders.append([pad] * (fill + n) + row)
            else:
                rows.append(torch.cat([prompt[b], emb, padding]))
                masks.append([1] * (n + len(row)) + [0] * fill)
        kwargs = dict(
            inputs_embeds=torch.stack(rows), attention_mask=torch.tensor(masks, device=self.device),
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
            num_return_sequences=num_return_sequences, repetition_penalty=repetition_penalty,
            eos_token_id=self.layout.eos, pad_token_id=pad, do_sample=False,
        )
        if length_penalty != 1.0 and num_beams > 1:
            kwargs["length_penalty"] = length_penalty  # beam scores / length**penalty (LAVIS's VQA: -1 for T5)
        if self.config.llm_kind == "causal":
            # Passed as Blip2ForConditionalGeneration passes them (placeholders where the queries
            # sit), so a repetition penalty sees the prompt in both; the output repeats them.
            kwargs["input_ids"] = torch.tensor(placeholders, device=self.device)
        if top_p is not None:
            from transformers import LogitsProcessorList

            if seeds is None or len(seeds) != batch * num_return_sequences:
                raise ValueError(f"sampling needs one seed per generated row ({batch * num_return_sequences})")
            kwargs.update(do_sample=True, top_p=1.0, top_k=0, temperature=1.0, num_beams=1,
                          logits_processor=LogitsProcessorList([SeededNucleusSampler(list(seeds), top_p)]))
        out = self.language_model.generate(**kwargs)
        if self.config.llm_kind == "causal":
            out = out[:, len(placeholders[0]):]
        return [_strip(row.tolist(), self.layout.eos, pad) for row in out]

    def decode(self, ids: list[list[int]]) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # -- persistence ---------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The Q-Former and projection weights (the LLM is frozen and referenced by config.llm)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("language_model.")}

    def save_pretrained(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.trainable_state_dict()
        state.pop("qformer.lm_head.decoder.weight", None)  # tied to the word embeddings
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / WEIGHTS_NAME))
        (folder / CONFIG_NAME).write_text(self.config.to_json())
        self.tokenizer.save_pretrained(str(folder / LLM_TOKENIZER_DIR))
        if self.qformer_tokenizer is not None:
            self.qformer_tokenizer.save_pretrained(str(folder / QFORMER_TOKENIZER_DIR))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu", llm: str | None = None) -> "Blip2Stage2":
        """Load a model folder written by `save_pretrained`; `llm` overrides where the LLM lives."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config = read_model_config(folder)
        if llm is not None:
            config.llm = llm
        device = torch.device(device)
        language_model, _, kind = load_llm(config.llm, device)
        if kind != config.llm_kind:
            raise ConfigError(f"{folder}: trained with a {config.llm_kind} LLM, but {config.llm} is {kind}.")
        from transformers import AutoTokenizer

        tokenizer = prepare_llm_tokenizer(AutoTokenizer.from_pretrained(str(folder / LLM_TOKENIZER_DIR)), config.llm)
        qtok = load_tokenizer(folder / QFORMER_TOKENIZER_DIR) if (folder / QFORMER_TOKENIZER_DIR).exists() else None
        model = cls(QFormer(QFormerConfig(**config.qformer)), language_model, tokenizer, config, qtok)
        state = load_file(str(folder / WEIGHTS_NAME))
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("language_model.") and k != "qformer.lm_head.decoder.weight"]
        if missing or result.unexpected_keys:
            raise ConfigError(f"{folder}: weights do not fit the config (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}).")
        return model.to(device)

    # -- transformers Blip2ForConditionalGeneration --------------------------------------------
    @classmethod
    def from_blip2(cls, id_or_path: str, device: str | torch.device = "cpu") -> tuple["Blip2Stage2", FrozenImageEncoder]:
        """(model, frozen encoder) from a transformers Blip2ForConditionalGeneration checkpoint
        (model/convert.py `load_blip2`)."""
        from .convert import load_blip2

        return load_blip2(id_or_path, device)

    def float_trainable(self) -> "Blip2Stage2":
        self.qformer.float()
        self.language_projection.float()
        return self


def _strip(ids: list[int], eos: int, pad: int) -> list[int]:
    """Tokens up to (not including) the first eos; padding dropped."""
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return [i for i in ids if i != pad]


def read_model_config(folder: Path) -> Stage2ModelConfig:
    path = folder / CONFIG_NAME
    if not path.exists():
        raise ConfigError(f"{folder}: no {CONFIG_NAME}; point at a Stage 2 checkpoint (trainer --out, step-*, or its model/).")
    data = json.loads(path.read_text())
    if data.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"{path}: model_type {data.get('model_type')!r} is not {MODEL_TYPE!r}.")
    if "checkpoint_of" in data:  # a marker in a trainer/step folder, not a model folder
        raise ConfigError(f"{folder}: a Stage 2 trainer folder; resolve it with resolve_checkpoint().")
    return Stage2ModelConfig(**data)


def resolve_checkpoint(folder: str | Path) -> tuple[Path, Path]:
    """(step folder or None-equivalent, model folder) for a trainer --out, a step-* or a model folder."""
    folder = resolve_latest(folder)
    model_dir = folder / "model" if (folder / "model" / CONFIG_NAME).exists() else folder
    if not (model_dir / WEIGHTS_NAME).exists():
        raise ConfigError(f"{folder}: no Stage 2 model here (expected {WEIGHTS_NAME} in it or in model/); "
                          f"pass a `capfilt train stage2 --out` folder, a step-* folder or its model/.")
    return folder, model_dir
