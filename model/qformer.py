"""BLIP-2's Q-Former: transformers' `Blip2QFormerModel` plus the pieces Stage 1 trains.

One module, read top to bottom:
  learned queries ─┐
                   ├─► Blip2QFormerModel (self-attention over queries [+ text], cross-attention
  text embeddings ─┘    from the queries to the frozen image tokens every other layer)
  ─► vision_projection / text_projection (ITC), itm_head (ITM), lm_head (ITG, tied to the words)

Parameter names follow transformers' `Blip2ForImageTextRetrieval` (`query_tokens`, `embeddings`,
`qformer`, `vision_projection`, `text_projection`, `itm_head`), so Salesforce's HF weights load
by name; `ln_vision` is LAVIS's LayerNorm on the frozen image tokens (HF stores it as
`vision_model.post_layernorm`), `lm_head` is the BERT prediction head LAVIS calls
`Qformer.cls.predictions`. See `model/convert.py` for the key mappings.

How text goes through the same layers: `Blip2QFormerModel` takes the concatenation
[queries ; text] and `query_length`; only the first `query_length` positions cross-attend to the
image and use the `*_query` feed-forward, text positions use the text feed-forward. What each
position may see is the self-attention mask, built here for the three Stage 1 tasks:
  unimodal (ITC text)        text only, padding masked
  bidirectional (ITM)        queries and text see each other
  multimodal causal (ITG)    queries see queries only; text sees all queries and earlier text
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from capfilt.errors import ConfigError

CONFIG_NAME = "qformer_config.json"
# Written into CONFIG_NAME so `load_itm` / `itm_model_type` can tell a Stage 1 model folder by
# its model_type, as they tell BLIP from BLIP-2. Not a transformers model type: the file keeps its
# own name so no AutoConfig mistakes it for one.
MODEL_TYPE = "capfilt-qformer"
# What a saved model's CONFIG_NAME says besides its architecture: the frozen image encoder it was trained
# with (model/vision.py spec), so that the folder alone loads. Folders saved before it leave it out.
SAVED_VISION = "vision"
WEIGHTS_NAME = "model.safetensors"
DEC_TOKEN = "[DEC]"


@dataclass
class QFormerConfig:
    """Architecture of a Q-Former and its heads. Defaults are BLIP-2's (BERT-base, 32 queries)."""

    vocab_size: int = 30523  # bert-base-uncased (30522) + [DEC]
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2  # cross-attention in every other layer (BLIP-2)
    max_position_embeddings: int = 512
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    num_query_tokens: int = 32
    embed_dim: int = 256  # ITC projection size
    vision_width: int = 1408  # width of the frozen image tokens (EVA ViT-g)
    vision_layer_norm_eps: float = 1e-5  # ln_vision: LAVIS uses nn.LayerNorm's default
    max_text_length: int = 32
    temp_init: float = 0.07
    pad_token_id: int = 0
    cls_token_id: int = 101
    dec_token_id: int = 30522

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} must be a multiple of num_attention_heads "
                f"{self.num_attention_heads}."
            )
        for name in ("num_query_tokens", "num_hidden_layers", "cross_attention_frequency", "embed_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"QFormerConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_text_length > self.max_position_embeddings:
            raise ConfigError("max_text_length cannot exceed max_position_embeddings.")

    def blip2_qformer_config(self) -> Blip2QFormerConfig:
        """The transformers config of the shared encoder (text feed-forward switched on)."""
        config = Blip2QFormerConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range,
            layer_norm_eps=self.layer_norm_eps,
            pad_token_id=self.pad_token_id,
            cross_attention_frequency=self.cross_attention_frequency,
            encoder_hidden_size=self.vision_width,
            use_qformer_text_input=True,
        )
        # Our masks are boolean 4D tensors (True = may attend); SDPA takes them as they are in
        # any dtype, where the eager path would add them as biases. SDPA, through a wrapper that
        # can keep and reuse the queries' keys and values (see QueryCache).
        config._attn_implementation = CACHED_SDPA
        return config

    def to_json(self) -> str:
        return json.dumps({"model_type": MODEL_TYPE, **asdict(self)}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "config") -> "QFormerConfig":
        data = json.loads(text)
        data.pop(SAVED_VISION, None)  # what the saved model needs, not part of its architecture
        # Files written before model_type existed have none; any other value is not a Q-Former.
        model_type = data.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ConfigError(f"{where}: model_type {model_type!r} is not a capfilt Q-Former ({MODEL_TYPE!r}).")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown Q-Former config key(s) {unknown}; written by a newer capfilt?")
        return cls(**data)


# -- the queries' key/value cache (LAVIS reuses the query pass for ITG) ------------------------

CACHED_SDPA = "capfilt_sdpa_query_cache"


class QueryCache:
    """The self-attention keys and values of a query-only pass, per layer, for a later text pass.

    ITG's text attends to every query and the queries never attend to text, so the queries' keys
    and values in ITG are exactly those of the query pass ITC already ran: LAVIS keeps them
    (`use_cache=True`) and feeds them to ITG's text-only pass as `past_key_values`. The same
    here: `Blip2QFormerModel` has no cache argument, so an attention function registered with
    transformers keeps them (a recording cache) or prepends them (its `reader()`). They stay in
    the autograd graph, so ITG's gradient reaches the query pass as it does in LAVIS. A reader is
    its own object, not a flag, so activation checkpointing's recomputation reads as well.
    """

    def __init__(self, self_attention_modules, keys_values=None, reading: bool = False):
        self.modules = set(self_attention_modules)
        self.keys_values: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {} if keys_values is None else keys_values
        self.reading = reading

    def reader(self) -> "QueryCache":
        return QueryCache(self.modules, self.keys_values, reading=True)

    def __call__(self, module, key, value):
        if module not in self.modules:  # cross-attention: keys come from the image
            return key, value
        if not self.reading:
            self.keys_values[module] = (key, value)
            return key, value
        cached_key, cached_value = self.keys_values[module]
        return torch.cat([cached_key, key], dim=2), torch.cat([cached_value, value], dim=2)


class SharedImages:
    """Cross-attention over fewer images than pairs: row i of the batch reads image `index[i]`.

    ITM's 3B pairs show only B + B images (its own, and one negative per text), and an image's
    cross-attention keys and values are the same whichever text it is paired with, so they are
    projected once per image and picked per pair: the same values and gradients as projecting
    3B image copies, for a third to two thirds less of the pass's largest projections.
    """

    def __init__(self, cross_attention_modules, index: torch.Tensor):
        self.modules = set(cross_attention_modules)
        self.index = index

    def __call__(self, module, key, value):
        if module not in self.modules:
            return key, value
        return key.index_select(0, self.index), value.index_select(0, self.index)


def _cached_sdpa(module, query, key, value, attention_mask, kv_hook=None, **kwargs):
    """SDPA, after `kv_hook(module, key, value)` (a QueryCache or SharedImages) if one is given."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kv_hook is not None:
        key, value = kv_hook(module, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(CACHED_SDPA, _cached_sdpa)


_register_attention()


# -- attention masks (True = this row may attend to this column) ------------------------------

def unimodal_text_mask(text_mask: torch.Tensor) -> torch.Tensor:
    """ITC text encoder: every text position sees every non-padding text position. (B, T, T)."""
    keys = text_mask.bool()[:, None, :]
    return keys.expand(-1, text_mask.shape[1], -1)


def bidirectional_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITM: queries and text all see each other (padding excluded). (B, Q+T, Q+T)."""
    batch, length = text_mask.shape
    queries = torch.ones(batch, num_queries, dtype=torch.bool, device=text_mask.device)
    keys = torch.cat([queries, text_mask.bool()], dim=1)[:, None, :]
    return keys.expand(-1, num_queries + length, -1)


def multimodal_causal_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITG: queries see queries only; text token i sees all queries and text tokens <= i. (B, Q+T, Q+T)."""
    batch, length = text_mask.shape
    total = num_queries + length
    device = text_mask.device
    allowed = torch.zeros(batch, total, total, dtype=torch.bool, device=device)
    allowed[:, :num_queries, :num_queries] = True
    allowed[:, num_queries:, :num_queries] = True
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=device))
    allowed[:, num_queries:, num_queries:] = causal[None] & text_mask.bool()[:, None, :]
    return allowed


class LMHead(nn.Module):
    """BERT's masked-LM prediction head (dense, GELU, LayerNorm, decoder tied to the word embeddings)."""

    def __init__(self, config: QFormerConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.decoder.weight = word_embeddings.weight  # tied, as in BERT and LAVIS

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(F.gelu(self.dense(hidden))))


class QFormer(nn.Module):
    """The Stage 1 model minus the frozen image encoder. Inputs are the encoder's image tokens."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.config = config
        blip2 = config.blip2_qformer_config()
        self.ln_vision = nn.LayerNorm(config.vision_width, eps=config.vision_layer_norm_eps)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.hidden_size))
        self.embeddings = Blip2TextEmbeddings(blip2)
        self.qformer = Blip2QFormerModel(blip2)
        self.vision_projection = nn.Linear(config.hidden_size, config.embed_dim)
        self.text_projection = nn.Linear(config.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        self.lm_head = LMHead(config, self.embeddings.word_embeddings)
        self.temp = nn.Parameter(torch.tensor(config.temp_init))
        self._init_weights()

    def _init_weights(self) -> None:
        """BERT init (normal 0.02, zero bias, unit LayerNorm) for everything outside `qformer`,
        which transformers' post_init already initialised the same way."""
        std = self.config.initializer_range
        nn.init.normal_(self.query_tokens, std=std)
        for name, module in self.named_modules():
            if name.startswith("qformer"):
                continue
            if isinstance(module, nn.Linear):
                if module is not self.lm_head.decoder:  # tied: initialised as the embedding
                    nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # -- the shared encoder --------------------------------------------------------------------
    def _encode(self, embeds, allowed, query_length, image_tokens=None, kv_hook=None) -> torch.Tensor:
        """Run Blip2QFormerModel on [queries ; text] embeddings with a (B, L, L) boolean mask, a
        (B, 1, L) one that every row shares, or None (everything visible).

        Shared rows and None are what the unimodal, bidirectional and query-only passes need, and
        they cost less than a full (B, L, L) mask: SDPA reads a smaller mask, and with None it
        takes its fastest kernel. With a QueryCache as `kv_hook`, the mask's columns cover the
        cached queries first, then the text.
        """
        extra = {} if kv_hook is None else {"kv_hook": kv_hook}
        out = self.qformer(
            query_embeds=embeds,
            query_length=query_length,
            attention_mask=None if allowed is None else allowed[:, None, :, :],
            encoder_hidden_states=image_tokens,
            **extra,
        )
        return out.last_hidden_state

    def prepare_image(self, image_features: torch.Tensor) -> torch.Tensor:
        """The trainable LayerNorm on the frozen encoder's tokens (LAVIS `ln_vision`)."""
        return self.ln_vision(image_features.to(self.ln_vision.weight.dtype))

    def query_output(self, image_tokens: torch.Tensor, cache: bool = False):
        """Queries after cross-attending to the (ln_vision'ed) image tokens. (B, Q, H); with
        `cache`, also the QueryCache of their keys and values for `itg_logits_cached`."""
        batch = image_tokens.shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)
        q = queries.shape[1]
        query_cache = QueryCache(layer.attention.attention for layer in self.qformer.encoder.layer) if cache else None
        hidden = self._encode(self.embeddings(query_embeds=queries), None, q, image_tokens, kv_hook=query_cache)
        return (hidden, query_cache) if cache else hidden

    def text_output(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unimodal text encoding (ITC's text side). (B, T, H)."""
        embeds = self.embeddings(input_ids=input_ids)
        return self._encode(embeds, unimodal_text_mask(attention_mask)[:, :1], 0)  # rows are all alike

    def image_features(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected queries, one vector per query. (B, Q, D)."""
        return F.normalize(self.vision_projection(self.query_output(image_tokens)), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected [CLS] output of the text encoder. (B, D)."""
        cls = self.text_output(input_ids, attention_mask)[:, 0, :]
        return F.normalize(self.text_projection(cls), dim=-1)

    def itm_logits(self, image_tokens, input_ids, attention_mask, image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Match / no-match logits of each (image, text) pair: ITM head averaged over queries. (B, 2).

        With `image_index`, pair i's image is `image_tokens[image_index[i]]` (see SharedImages)."""
        batch = input_ids.shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)
        q = queries.shape[1]
        embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)
        shared = None
        if image_index is not None:
            shared = SharedImages((layer.crossattention.attention for layer in self.qformer.encoder.layer
                                   if layer.has_cross_attention), image_index)
        hidden = self._encode(embeds, bidirectional_mask(q, attention_mask)[:, :1], q, image_tokens, shared)  # rows alike
        return self.itm_head(hidden[:, :q, :]).mean(dim=1)

    def itg_logits(self, image_tokens, decoder_input_ids, attention_mask) -> torch.Tensor:
        """Next-token logits of the text, conditioned on the queries (ITG), in one [queries ; text]
        pass of its own. (B, T, V). Training reuses the query pass instead (`itg_logits_cached`)."""
        batch = decoder_input_ids.shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)
        q = queries.shape[1]
        embeds = self.embeddings(input_ids=decoder_input_ids, query_embeds=queries)
        hidden = self._encode(embeds, multimodal_causal_mask(q, attention_mask), q, image_tokens)
        return self.lm_head(hidden[:, q:, :])

    def itg_logits_cached(self, query_cache: QueryCache, decoder_input_ids, attention_mask) -> torch.Tensor:
        """`itg_logits` as a text-only pass over the query pass's cached keys and values (LAVIS):
        the same values, without running the queries (and their cross-attention) again."""
        q = self.config.num_query_tokens
        allowed = multimodal_causal_mask(q, attention_mask)[:, q:, :]  # text rows: (B, T, Q + T)
        hidden = self._encode(self.embeddings(input_ids=decoder_input_ids), allowed, 0, kv_hook=query_cache.reader())
        return self.lm_head(hidden)

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        """Keep the ITC temperature in [0.001, 0.5], as LAVIS does before every forward."""
        self.temp.clamp_(0.001, 0.5)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Activation checkpointing of the Q-Former layers (transformers' GradientCheckpointingLayer)."""
        if enabled:
            self.qformer.activation_checkpointing_enable({"use_reentrant": False})
        elif self.qformer.is_activation_checkpointing:
            self.qformer.activation_checkpointing_disable()

    # -- persistence: a folder with a JSON config and safetensors -------------------------------
    def save_pretrained(self, folder: str | Path, tokenizer=None, vision: str | None = None) -> Path:
        """The config (with `vision`, the frozen encoder's spec, when given), the weights and the tokenizer."""
        from safetensors.torch import save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = json.loads(self.config.to_json())
        if vision:
            config[SAVED_VISION] = vision
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=1, sort_keys=True))
        # save_model (not save_file) because lm_head.decoder.weight shares the word embeddings.
        save_model(self, str(folder / WEIGHTS_NAME))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "QFormer":
        from safetensors.torch import load_model

        folder = Path(folder)
        config_path = folder / CONFIG_NAME
        if not config_path.exists():
            raise ConfigError(
                f"{folder}: no {CONFIG_NAME} here; point at a folder written by QFormer.save_pretrained "
                f"(a Stage 1 checkpoint's model/ folder)."
            )
        model = cls(QFormerConfig.from_json(config_path.read_text(), where=str(config_path)))
        load_model(model, str(folder / WEIGHTS_NAME), device=str(device))
        return model.to(device)


def saved_vision(model_dir: str | Path) -> str | None:
    """The frozen image encoder a saved Q-Former folder names, else None (saved before it did)."""
    path = Path(model_dir) / CONFIG_NAME
    return json.loads(path.read_text()).get(SAVED_VISION) if path.exists() else None


# -- tokenizer ----------------------------------------------------------------------------------

def load_tokenizer(path: str | Path):
    """A BERT WordPiece tokenizer with LAVIS's `[DEC]` decoder-BOS token added (idempotent)."""
    from transformers import BertTokenizerFast

    try:
        tokenizer = BertTokenizerFast.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load a BERT tokenizer from {path!s} ({exc}). Give a hub id such as "
            f"bert-base-uncased or a folder with tokenizer files."
        ) from exc
    if DEC_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    else:
        tokenizer.bos_token = DEC_TOKEN
    return tokenizer


def tokenizer_fields(tokenizer) -> dict:
    """The QFormerConfig fields a tokenizer decides: its vocabulary and special ids."""
    return {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "cls_token_id": tokenizer.cls_token_id, "dec_token_id": tokenizer.convert_tokens_to_ids(DEC_TOKEN)}


def config_for_tokenizer(tokenizer, **overrides) -> QFormerConfig:
    """A QFormerConfig whose vocabulary and special ids match this tokenizer."""
    return QFormerConfig(**tokenizer_fields(tokenizer), **overrides)


# -- initialisation from a BERT checkpoint ------------------------------------------------------

def bert_key_to_qformer(key: str) -> list[str]:
    """Where a BertForMaskedLM / BertModel parameter goes in the Q-Former (LAVIS init_Qformer).

    The query feed-forward (`*_query`) starts as a copy of BERT's feed-forward; cross-attention
    layers have no BERT counterpart and keep their fresh init. Returns [] for unused keys.
    """
    key = key.removeprefix("bert.")
    if key.startswith("embeddings.word_embeddings") or key.startswith("embeddings.position_embeddings"):
        return [key]
    if key.startswith("embeddings.LayerNorm"):
        return [key.replace("embeddings.LayerNorm", "qformer.layernorm")]
    if key.startswith("encoder.layer."):
        key = "qformer." + key.replace("attention.self.", "attention.attention.")
        if ".intermediate." in key:
            return [key, key.replace(".intermediate.", ".intermediate_query.")]
        if ".output." in key and ".attention.output." not in key:
            return [key, key.replace(".output.", ".output_query.")]
        return [key]
    if key.startswith("cls.predictions.transform.dense"):
        return [key.replace("cls.predictions.transform.dense", "lm_head.dense")]
    if key.startswith("cls.predictions.transform.LayerNorm"):
        return [key.replace("cls.predictions.transform.LayerNorm", "lm_head.layer_norm")]
    if key == "cls.predictions.bias" or key == "cls.predictions.decoder.bias":
        return ["lm_head.decoder.bias"]
    return []


@torch.no_grad()
def init_from_bert(model: QFormer, bert_path: str | Path) -> list[str]:
    """Copy a BERT checkpoint into the Q-Former; returns the Q-Former keys that were NOT set.

    The vocabulary grows by [DEC]: the BERT rows are copied, the new rows keep their init.
    """
    from transformers import BertForMaskedLM

    try:
        bert = BertForMaskedLM.from_pretrained(str(bert_path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load BERT weights from {bert_path!s} ({exc}).") from exc
    if bert.config.num_hidden_layers != model.config.num_hidden_layers or bert.config.hidden_size != model.config.hidden_size:
        raise ConfigError(
            f"{bert_path}: BERT has {bert.config.num_hidden_layers} layers x {bert.config.hidden_size}, the "
            f"Q-Former config asks for {model.config.num_hidden_layers} x {model.config.hidden_size}; make them agree."
        )
    target = model.state_dict()
    loaded: set[str] = set()
    for key, value in bert.state_dict().items():
        for dest in bert_key_to_qformer(key):
            if dest not in target:
                continue
            if dest in ("embeddings.word_embeddings.weight", "lm_head.decoder.bias"):
                rows = min(value.shape[0], target[dest].shape[0])
                target[dest][:rows].copy_(value[:rows])
            else:
                target[dest].copy_(value)
            loaded.add(dest)
    if "embeddings.word_embeddings.weight" in loaded:
        loaded.add("lm_head.decoder.weight")  # tied
    return sorted(set(target) - loaded)
