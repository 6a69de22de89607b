"""Tokenizers trained locally on the corpus train split, and cached on disk.

Two recipes: byte-level BPE (RoBERTa/GPT-2 style: any text round-trips) and BERT-style
lowercase WordPiece. The cache key covers everything that changes the result, so a new
Python, tokenizers release or recipe trains a fresh one instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from bequest.data.cache import cache_root
from bequest.data.corpus import corpus_docs
from bequest.errors import BequestError

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

KINDS: tuple[str, ...] = ("bpe", "wordpiece")
RECIPE = 1  # bump when the recipe below changes, so cached tokenizers are retrained
BPE_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tokenizer_kind(family: str) -> str:
    """The tokenizer recipe a model family expects: "wordpiece" or "bpe"."""
    from bequest.anatomy import FAMILIES

    if family.lower() not in FAMILIES:
        raise BequestError(f"no tokenizer for model family {family!r}; choose one of: {', '.join(FAMILIES)}")
    return FAMILIES[family.lower()].tokenizer


def _texts() -> list[str]:
    return [d.text for d in corpus_docs(None, "train")]


def _cache_key(kind: str, vocab_size: int, texts: list[str]) -> str:
    import tokenizers

    h = hashlib.sha256(f"{RECIPE}|{tokenizers.__version__}|".encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return f"{kind}-{vocab_size}-{py}-{h.hexdigest()[:16]}"


def _continuation_pieces(tok: Tokenizer, texts: list[str]) -> list[str]:
    """"##c" for every character c that starts no word, sorted."""
    chars: set[str] = set()
    for text in texts:
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
            chars.update(word[1:])
    return ["##" + c for c in sorted(chars)]


def _without_added_tokens(tok: Tokenizer, specials: list[str]) -> Tokenizer:
    from tokenizers import Tokenizer, models

    vocab = tok.get_vocab(with_added_tokens=False)
    clean = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    clean.normalizer, clean.pre_tokenizer, clean.decoder = tok.normalizer, tok.pre_tokenizer, tok.decoder
    clean.add_special_tokens(specials)
    return clean


def _train(kind: str, vocab_size: int, texts: list[str]) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        # No prefix space: decode(encode(x)) must give back x exactly.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=BPE_SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        first, last = "<s>", "</s>"
        single, pair = "<s> $A </s>", "<s> $A </s> </s> $B </s>"
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        # The trainer numbers "##x" pieces in hash-map order, and ids break ties between
        # equally frequent merges: seeding them, sorted, makes training deterministic.
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=WORDPIECE_SPECIALS + _continuation_pieces(tok, texts),
            continuing_subword_prefix="##",
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        tok = _without_added_tokens(tok, WORDPIECE_SPECIALS)  # seeds become plain pieces
        first, last = "[CLS]", "[SEP]"
        single, pair = "[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1"
    ids = [(first, tok.token_to_id(first)), (last, tok.token_to_id(last))]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)
    return tok


def _hf_settings(kind: str) -> dict:
    """What transformers needs to know on top of tokenizer.json."""
    if kind == "bpe":
        return dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    return dict(
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],  # BERT uses segment ids
    )


def train_tokenizer(
    kind: str,
    vocab_size: int = 8000,
    cache_dir: str | Path | None = None,
    model_max_length: int = 1024,
    texts: list[str] | None = None,
) -> PreTrainedTokenizerFast:
    """A `kind` ("bpe" or "wordpiece") tokenizer trained on `texts` (default: the embedded corpus's
    train split), from cache when possible."""
    from transformers import PreTrainedTokenizerFast

    if kind not in KINDS:
        raise BequestError(f"unknown tokenizer kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if vocab_size < 300:  # below the 256 bytes + specials the BPE alphabet needs
        raise BequestError(f"vocab_size {vocab_size} is too small; use at least 300")
    texts = _texts() if texts is None else list(texts)
    root = cache_root(cache_dir) / "tokenizers"
    root.mkdir(parents=True, exist_ok=True)
    final = root / _cache_key(kind, vocab_size, texts)
    if not final.exists():
        # Save to a private sibling then rename: a racing process (e.g. another
        # accelerate rank) either sees no directory or a complete tokenizer.
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            tok = _train(kind, vocab_size, texts)
            hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **_hf_settings(kind))
            hf.save_pretrained(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            os.replace(tmp, final)
        except OSError:
            if not final.exists():  # a real I/O failure, not a lost race
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    # Always load from disk, so a fresh and a cached tokenizer behave the same.
    return PreTrainedTokenizerFast.from_pretrained(final, local_files_only=True, model_max_length=model_max_length)


def same_tokenizer(a, b) -> bool:
    """Same tokens with the same ids, and the same special tokens: then logits line up position by position."""
    return a.get_vocab() == b.get_vocab() and a.all_special_tokens == b.all_special_tokens and all(
        getattr(a, f"{k}_id") == getattr(b, f"{k}_id") for k in ("pad_token", "bos_token", "eos_token", "mask_token")
    )
