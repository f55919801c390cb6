"""Token streams for collection and evaluation: a 1-D array of token ids, cut into windows.

A stream comes from a ``.npy`` of token ids (uint16 / int32, 1-D; memory-mapped; e.g. the
token cache of `dejavu_jax.data`) or from text (``.txt`` or ``.txt.xz``; documents
separated by ``"\\n\\x1e\\n"``, as in the corpus under ``shared/data/corpus``) tokenized
with `dejavu_jax.data`'s OPT tokenizer and encoder, each document preceded by ``</s>`` (2),
exactly as the reference model's training cache.
"""

from __future__ import annotations

import lzma
from pathlib import Path

import numpy as np

from dejavu_jax.errors import InputError

DOC_SEPARATOR = "\n\x1e\n"


def _read_text(path: Path, max_chars: int | None) -> str:
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read(max_chars if max_chars else -1)


def _tokenizer(tokenizer_dir):
    try:
        from dejavu_jax.data import load_tokenizer

        return load_tokenizer(tokenizer_dir)
    except ImportError:  # the data package is optional here
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def tokenize_text(text: str, tokenizer_dir: str | Path, separator_id: int = 2) -> np.ndarray:
    """Tokenize documents (split on DOC_SEPARATOR) without special tokens, each preceded by
    ``separator_id``, as the training token cache (`dejavu_jax.data`) does. Returns [N] int32."""
    try:
        tok = _tokenizer(tokenizer_dir)
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        raise InputError(f"could not load a tokenizer from {tokenizer_dir} ({e}); pass a directory holding "
                         "tokenizer files, or a .npy of token ids instead of text.") from None
    docs = [d for d in text.split(DOC_SEPARATOR) if d.strip()]
    if not docs:
        raise InputError("the text holds no documents to tokenize.")
    try:
        from dejavu_jax.data import encode_documents

        return encode_documents(tok, docs, bos_id=separator_id, dtype=np.int32)
    except ImportError:
        return np.concatenate([np.asarray([separator_id] + tok(d, add_special_tokens=False)["input_ids"], np.int32)
                               for d in docs])


def load_token_stream(path: str | Path, *, tokenizer_dir: str | Path | None = None,
                      max_tokens: int | None = None) -> np.ndarray:
    """A 1-D token stream from ``path`` (.npy of ids, or .txt / .txt.xz text; see the module
    docstring). Text needs ``tokenizer_dir``. ``max_tokens`` bounds what is read (text is read
    up to ~6 characters per token). Returns [N] (the .npy's integer dtype, or int32)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"token stream {path} does not exist.")
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"{path} holds a {arr.dtype} array of shape {arr.shape}; expected a 1-D "
                             "array of token ids (uint16 or int32).")
        return arr if max_tokens is None else arr[:max_tokens]
    if tokenizer_dir is None:
        raise InputError(f"{path} is text; pass tokenizer_dir (the model directory) to tokenize it, "
                         "or pass a .npy of token ids.")
    tokens = tokenize_text(_read_text(path, 6 * max_tokens if max_tokens else None), tokenizer_dir)
    return tokens if max_tokens is None else tokens[:max_tokens]


def corpus_streams(corpus_dir: str | Path, tokenizer_dir: str | Path, max_tokens: int,
                   heldout_max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) streams from a corpus folder (``train-*.txt.xz`` + ``heldout.txt.xz``):
    ``max_tokens`` from the train shards, an equal share from the start of each (more books
    than reading the first shard only; a short shard's shortfall moves to the next ones), and
    the first ``heldout_max_tokens`` of the held-out books."""
    corpus_dir = Path(corpus_dir)
    shards = sorted(corpus_dir.glob("train-*.txt*"))
    held = sorted(corpus_dir.glob("heldout.txt*"))
    if not shards or not held:
        raise InputError(f"{corpus_dir} should hold train-*.txt.xz and heldout.txt.xz (shared/data/corpus).")
    parts, have = [], 0
    for i, shard in enumerate(shards):
        if have >= max_tokens:
            break
        share = -(-(max_tokens - have) // (len(shards) - i))  # ceil: what is left, over the shards left
        part = load_token_stream(shard, tokenizer_dir=tokenizer_dir, max_tokens=share)
        parts.append(np.asarray(part))
        have += len(part)
    heldout = load_token_stream(held[0], tokenizer_dir=tokenizer_dir, max_tokens=heldout_max_tokens)
    return np.concatenate(parts), np.asarray(heldout)


def num_windows(stream_len: int, seq_len: int, prepend_bos: bool) -> int:
    """How many non-overlapping windows of ``seq_len`` a stream of ``stream_len`` tokens gives."""
    return stream_len // (seq_len - int(prepend_bos))


def window(stream: np.ndarray, index: int, seq_len: int, prepend_bos: bool, bos_id: int = 2) -> np.ndarray:
    """Window ``index`` of the stream: [seq_len] int32, starting with ``bos_id`` when
    ``prepend_bos`` (as OPT sees text: ``</s>`` first)."""
    body = seq_len - int(prepend_bos)
    chunk = np.asarray(stream[index * body:(index + 1) * body], np.int32)
    return np.concatenate([[bos_id], chunk]).astype(np.int32) if prepend_bos else chunk


def windows(stream: np.ndarray, indices, seq_len: int, prepend_bos: bool, bos_id: int = 2) -> np.ndarray:
    """Several windows: [len(indices), seq_len] int32."""
    return np.stack([window(stream, i, seq_len, prepend_bos, bos_id) for i in indices])


def spaced_indices(start: int, stop: int, n: int) -> list[int]:
    """Up to ``n`` distinct indices evenly spaced over [start, stop), both ends included."""
    return np.unique(np.linspace(start, stop - 1, num=min(n, stop - start)).round().astype(int)).tolist()


def text_windows(path: str | Path, tokenizer_dir, n: int, seq_len: int, bos_id: int = 2) -> tuple[np.ndarray, int]:
    """``n`` windows of ``seq_len`` tokens (``</s>`` first) evenly spaced over a text, and the
    text's length in tokens. ``path``: WikiText-2's raw file (``wiki.*.raw``, one document, as
    the usual recipe reads it), a ``.txt`` / ``.txt.xz`` corpus file, or a ``.npy`` of ids."""
    if Path(path).name.startswith("wiki."):
        from dejavu_jax.data.wikitext import wikitext2_text

        stream = tokenize_text(wikitext2_text(path), tokenizer_dir)
    else:
        stream = load_token_stream(path, tokenizer_dir=tokenizer_dir)
    total = num_windows(len(stream), seq_len, True)
    if total < 1:
        raise InputError(f"{path}: {len(stream)} tokens are too few for one window of {seq_len}; "
                         "pass a longer text or a smaller window.")
    return windows(stream, spaced_indices(0, total, n), seq_len, True, bos_id), len(stream)

