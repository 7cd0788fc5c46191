"""BPE tokenizer: trained with rustbpe, saved as JSON, used through tiktoken."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import tiktoken

# GPT-4's split pattern with numbers split into groups of at most two digits.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
BOS = "<|bos|>"
DOC_CHAR_CAP = 10_000  # long documents add little to merge statistics but cost time


def train(texts: Iterable[str], vocab_size: int, max_chars: int) -> tiktoken.Encoding:
    """Train BPE on `texts` (at most `max_chars` characters) for `vocab_size` ids incl. BOS."""
    import rustbpe

    def capped() -> Iterator[str]:
        seen = 0
        for text in texts:
            text = text[:DOC_CHAR_CAP]
            yield text
            seen += len(text)
            if seen >= max_chars:
                return

    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(capped(), vocab_size - 1, pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    return _encoding(bpe.get_pattern(), ranks)


def _encoding(pattern: str, ranks: dict[bytes, int]) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="autoresearch-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens={BOS: len(ranks)}
    )


def save(enc: tiktoken.Encoding, path: Path) -> None:
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
    doc = {"pattern": enc._pat_str, "tokens": [base64.b64encode(tok).decode() for tok, _ in ranks]}
    tmp = Path(path).with_name(Path(path).name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def load(path: Path) -> tiktoken.Encoding:
    doc = json.loads(Path(path).read_text())
    ranks = {base64.b64decode(tok): rank for rank, tok in enumerate(doc["tokens"])}
    return _encoding(doc["pattern"], ranks)


def token_byte_lengths(enc: tiktoken.Encoding) -> list[int]:
    """Raw UTF-8 byte length of every id; 0 for special tokens.

    Uses decode_single_token_bytes: decoding a partial UTF-8 token to str would
    yield U+FFFD (3 bytes) and inflate the byte count.
    """
    special = set(enc._special_tokens.values())
    return [0 if i in special else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
