"""Token streams for collection and evaluation: a 1-D array of token ids, cut into windows.

A stream comes from a ``.npy`` of token ids (uint16 / int32, 1-D; memory-mapped) or from
text (``.txt`` or ``.txt.xz``; documents separated by ``"\\n\\x1e\\n"``, as in the corpus
under ``shared/data/corpus``) tokenized with the model directory's tokenizer
(`transformers.AutoTokenizer`, local files only). Documents are joined with the BOS/EOS id
(OPT's ``</s>`` = 2) between them.
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


def tokenize_text(text: str, tokenizer_dir: str | Path, separator_id: int = 2) -> np.ndarray:
    """Tokenize documents (split on DOC_SEPARATOR) without special tokens and join them
    with ``separator_id``. Returns [N] int32."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        raise InputError(f"could not load a tokenizer from {tokenizer_dir} ({e}); pass a model directory "
                         "holding tokenizer files, or a .npy of token ids instead of text.") from None
    out: list[np.ndarray] = []
    for doc in text.split(DOC_SEPARATOR):
        if doc.strip():
            ids = tok(doc, add_special_tokens=False)["input_ids"]
            out.append(np.asarray([separator_id] + list(ids), np.int32))
    if not out:
        raise InputError("the text holds no documents to tokenize.")
    return np.concatenate(out)


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
