"""Tokenize the corpus once and cache it: flat uint16 token arrays, memory-mapped on reuse.

``tokenize_corpus(corpus_dir, tokenizer_dir, cache_dir)`` writes, under
``cache_dir/<key>/`` (key = hash of the shards' bytes and the tokenizer files):

    train.npy            [n_train] uint16   every training book, each preceded by </s> (2)
    heldout.npy          [n_heldout] uint16 the held-out books, same format
    train_counts.npy     [vocab] int64      unigram counts of train.npy (for baselines)
    meta.json            token and book counts, sources, seconds taken

A second call with the same inputs only maps the files. Writes go to a temporary folder
renamed at the end, so an interrupted run never leaves a cache that looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dejavu_jax.data.corpus import CorpusError, corpus_files, encode_documents, read_books
from dejavu_jax.data.tokenizer import BOS_ID, load_tokenizer, tokenizer_fingerprint

CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TokenCache:
    """A tokenized corpus. ``train`` / ``heldout``: [n] uint16 (memory-mapped)."""

    path: Path
    train: np.ndarray
    heldout: np.ndarray
    train_counts: np.ndarray
    meta: dict

    @classmethod
    def open(cls, path: str | Path) -> "TokenCache":
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise CorpusError(f"{path} is not a complete token cache (no meta.json); "
                              "build it with tokenize_corpus().")
        return cls(path=path,
                   train=np.load(path / "train.npy", mmap_mode="r"),
                   heldout=np.load(path / "heldout.npy", mmap_mode="r"),
                   train_counts=np.load(path / "train_counts.npy"),
                   meta=json.loads((path / "meta.json").read_text()))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(files: list[Path], tokenizer_dir: str | Path) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for p in files:
        h.update(p.name.encode())
        h.update(_file_digest(p).encode())
    h.update(tokenizer_fingerprint(tokenizer_dir).encode())
    return h.hexdigest()[:16]


def _encode_shards(tokenizer, paths: list[Path], log) -> tuple[np.ndarray, int]:
    """Read shards (in threads: xz decoding releases the GIL) and encode book by shard."""
    arrays, n_books = [], 0
    with ThreadPoolExecutor(max_workers=min(4, len(paths))) as pool:
        for path, books in zip(paths, pool.map(read_books, paths)):
            t0 = time.perf_counter()
            arrays.append(encode_documents(tokenizer, books, bos_id=BOS_ID))
            n_books += len(books)
            log(f"  {path.name}: {len(books)} books -> {arrays[-1].size:,} tokens "
                f"({time.perf_counter() - t0:.1f} s)")
    return np.concatenate(arrays), n_books


def tokenize_corpus(corpus_dir: str | Path, tokenizer_dir: str | Path, cache_dir: str | Path,
                    log=print) -> TokenCache:
    """Tokenize ``corpus_dir``'s train and held-out shards with OPT's tokenizer from
    ``tokenizer_dir`` into ``cache_dir`` (reusing a finished cache). Returns the `TokenCache`."""
    files = corpus_files(corpus_dir)
    tok = load_tokenizer(tokenizer_dir)
    key = cache_key(files["train"] + files["heldout"], tokenizer_dir)
    final = Path(cache_dir) / key
    if (final / "meta.json").is_file():
        log(f"token cache: reusing {final}")
        return TokenCache.open(final)
    # Rust threads for encode_batch: use every core.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    t0 = time.perf_counter()
    log(f"token cache: tokenizing {corpus_dir} into {final} ...")
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train, n_train_books = _encode_shards(tok, files["train"], log)
    heldout, n_heldout_books = _encode_shards(tok, files["heldout"], log)
    np.save(tmp / "train.npy", train)
    np.save(tmp / "heldout.npy", heldout)
    np.save(tmp / "train_counts.npy", np.bincount(train, minlength=len(tok)).astype(np.int64))
    meta = {
        "version": CACHE_VERSION, "key": key,
        "train_files": [p.name for p in files["train"]], "heldout_files": [p.name for p in files["heldout"]],
        "train_tokens": int(train.size), "heldout_tokens": int(heldout.size),
        "train_books": n_train_books, "heldout_books": n_heldout_books,
        "tokenizer_size": len(tok), "bos_id": BOS_ID, "dtype": "uint16",
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if final.exists():  # a concurrent run finished first
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)
    log(f"token cache: {meta['train_tokens']:,} train + {meta['heldout_tokens']:,} held-out tokens "
        f"in {meta['seconds']} s")
    return TokenCache.open(final)
