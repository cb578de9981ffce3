"""The toy Q-Former's text tokenizer: a BERT WordPiece vocabulary learned from the captions."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from capfilt.errors import ConfigError

from .preset import ToyPreset, write_info


BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _wordpiece_vocab(corpus: list[str], size: int) -> dict[str, int]:
    """A WordPiece vocabulary, deterministically: the specials, every character alone and as a
    continuation (`##c`, so any word can be spelled), then whole words by frequency (ties by
    spelling) while `size` allows. tokenizers' WordPieceTrainer breaks ties between equally
    frequent merges in hash-map order, so two processes learned different vocabularies (and
    different toy models) from the same captions."""
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(w for text in corpus for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    tokens = list(BERT_SPECIALS) + chars + [f"##{c}" for c in chars]
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    tokens += words[:max(0, size - len(tokens))]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def train_text_tokenizer(texts: Iterable[str], folder: str | Path, preset: ToyPreset = ToyPreset()) -> str:
    """A lowercasing BERT WordPiece tokenizer trained on `texts`, saved as a BertTokenizerFast folder.

    `model.qformer.load_tokenizer(folder)` loads it and adds `[DEC]`, as for bert-base-uncased.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    corpus = [t for t in texts if t]
    if not corpus:
        raise ConfigError("train_text_tokenizer: no non-empty texts to learn a vocabulary from.")
    raw = Tokenizer(models.WordPiece(vocab=_wordpiece_vocab(corpus, preset.bert_vocab_size), unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    raw.decoder = decoders.WordPiece()
    tokenizer = BertTokenizerFast(
        tokenizer_object=raw, do_lower_case=True, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    write_info(folder, "bert_tokenizer", preset, {"texts": len(corpus), "vocab_size": len(tokenizer)})
    return str(folder)
