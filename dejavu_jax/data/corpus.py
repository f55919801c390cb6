"""The training corpus: xz-compressed text shards of books, and fast parallel encoding.

Layout (``shared/data/corpus``): ``train-*.txt.xz`` for training and ``heldout.txt.xz`` for
validation; each uncompressed shard is books one after another, each followed by the
separator ``"\\n\\x1e\\n"``. Encoding splits every book at paragraph breaks into pieces of
about 16 KiB and encodes all pieces in one parallel batch (Rust threads of the
``tokenizers`` library). The split is exact: it falls between the two newlines of a
``"\\n\\n"`` that has non-space on both sides, where byte-level BPE pre-tokenization splits
anyway, so the ids equal those of encoding each book whole.
"""

from __future__ import annotations

import lzma
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from dejavu_jax.errors import DejavuError

BOOK_SEPARATOR = "\n\x1e\n"
TRAIN_GLOB = "train-*.txt.xz"
HELDOUT_NAME = "heldout.txt.xz"
_PARAGRAPH_SPLIT = re.compile(r"(?<=\S\n)(?=\n\S)")


class CorpusError(DejavuError):
    """Corpus files missing or unreadable."""


def corpus_files(corpus_dir: str | Path) -> dict[str, list[Path]]:
    """{"train": [train-00.txt.xz, ...], "heldout": [heldout.txt.xz]} in ``corpus_dir``."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise CorpusError(
            f"corpus directory {corpus_dir} does not exist; pass the folder holding "
            f"{TRAIN_GLOB} and {HELDOUT_NAME} (e.g. ../shared/data/corpus, or .carry/corpus "
            "on the GPU machine after copying the shards there).")
    train = sorted(corpus_dir.glob(TRAIN_GLOB))
    heldout = corpus_dir / HELDOUT_NAME
    if not train or not heldout.is_file():
        found = sorted(p.name for p in corpus_dir.iterdir())
        raise CorpusError(
            f"{corpus_dir} should hold {TRAIN_GLOB} and {HELDOUT_NAME}; found {found[:10]}. "
            "Copy all shards of shared/data/corpus there.")
    return {"train": train, "heldout": [heldout]}


def read_books(path: str | Path) -> list[str]:
    """The books of one shard (``.txt.xz`` or plain ``.txt``), separator removed."""
    path = Path(path)
    opener = lzma.open if path.suffix == ".xz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (lzma.LZMAError, UnicodeDecodeError, EOFError) as e:
        raise CorpusError(f"cannot read {path} as UTF-8 text ({e}); is the file complete?") from None
    return [b for b in text.split(BOOK_SEPARATOR) if b]


def split_for_encoding(text: str, target_chars: int = 1 << 14) -> list[str]:
    """Cut ``text`` into pieces of at least ``target_chars`` (the last may be shorter) at
    paragraph breaks where BPE tokens cannot cross; ``"".join(pieces) == text``."""
    pieces, start = [], 0
    for m in _PARAGRAPH_SPLIT.finditer(text):
        if m.start() - start >= target_chars:
            pieces.append(text[start:m.start()])
            start = m.start()
    pieces.append(text[start:])
    return pieces


def encode_documents(tokenizer, documents: Sequence[str], bos_id: int | None = 2,
                     dtype=np.uint16) -> np.ndarray:
    """Encode documents in one parallel batch and concatenate them, each preceded by
    ``bos_id`` (OPT's ``</s>``; None for none). Returns a flat [n_tokens] array of ``dtype``.

    ``tokenizer``: a fast `transformers` tokenizer or a `tokenizers.Tokenizer`.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    pieces, owner = [], []
    for i, doc in enumerate(documents):
        parts = split_for_encoding(doc)
        pieces += parts
        owner += [i] * len(parts)
    encodings = backend.encode_batch_fast(pieces, add_special_tokens=False) \
        if hasattr(backend, "encode_batch_fast") else backend.encode_batch(pieces, add_special_tokens=False)
    limit = np.iinfo(dtype).max
    out: list[np.ndarray] = []
    prev = -1
    for i, enc in zip(owner, encodings):
        if i != prev and bos_id is not None:
            out.append(np.array([bos_id], dtype))
        prev = i
        ids = np.asarray(enc.ids, dtype=np.int64)
        if ids.size and ids.max() > limit:
            raise CorpusError(f"token id {ids.max()} does not fit in {np.dtype(dtype).name}.")
        out.append(ids.astype(dtype))
    return np.concatenate(out) if out else np.zeros((0,), dtype)
