"""Tokenizer, corpus reading and the token cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dejavu_jax.data import (CorpusError, TokenizerError, check_tokenizer, corpus_files,
                             encode_documents, load_tokenizer, read_books, tokenize_corpus,
                             write_tokenizer_files)
from dejavu_jax.data.corpus import split_for_encoding


def test_opt_tokenizer_from_vocab_and_merges(opt_tokenizer_dir):
    tok = load_tokenizer(opt_tokenizer_dir)
    assert tok("Hello world")["input_ids"] == [2, 31414, 232]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 2, 1)
    assert len(tok) == 50265


def test_written_tokenizer_files_load_with_autotokenizer(opt_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    names = write_tokenizer_files(opt_tokenizer_dir, tmp_path)
    assert {"tokenizer_config.json", "special_tokens_map.json", "vocab.json"} <= set(names)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] and cfg["bos_token"] == "</s>" and cfg["pad_token"] == "<pad>"
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert tok("Hello world")["input_ids"] == [2, 31414, 232]


def test_tokenizer_mismatch_is_a_clear_error(tiny_tokenizer_dir, opt_tokenizer_dir, tmp_path):
    # a byte-level BPE with other ids (the 300-id test tokenizer) is not OPT's
    with pytest.raises(TokenizerError, match="OPT's tokenizer gives"):
        load_tokenizer(tiny_tokenizer_dir)
    with pytest.raises(TokenizerError, match="vocab_size is 1000"):
        check_tokenizer(load_tokenizer(opt_tokenizer_dir), vocab_size=1000)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="lacks"):
        load_tokenizer(tmp_path)


def test_chunked_encoding_equals_whole_text(opt_tokenizer_dir, small_corpus):
    tok = load_tokenizer(opt_tokenizer_dir)
    books = read_books(small_corpus / "train-00.txt.xz")
    book = books[0] + "\n\nSpaces  \n\n  and\n\n\nnewlines.\n\nEnd"
    pieces = split_for_encoding(book, target_chars=200)
    assert "".join(pieces) == book and len(pieces) > 5
    ids = encode_documents(tok, [book], bos_id=2)
    assert ids.dtype == np.uint16
    assert ids.tolist() == tok(book)["input_ids"]


def test_token_cache_built_once_and_reused(small_corpus, opt_tokenizer_dir, tmp_path):
    logs = []
    cache = tokenize_corpus(small_corpus, opt_tokenizer_dir, tmp_path, log=logs.append)
    tok = load_tokenizer(opt_tokenizer_dir)
    books = read_books(small_corpus / "train-00.txt.xz") + read_books(small_corpus / "train-01.txt.xz")
    expected = np.concatenate([tok(b)["input_ids"] for b in books])
    np.testing.assert_array_equal(cache.train, expected)
    assert cache.train_counts.sum() == cache.train.size and cache.meta["train_books"] == 4
    again = tokenize_corpus(small_corpus, opt_tokenizer_dir, tmp_path, log=logs.append)
    assert "reusing" in logs[-1] and isinstance(again.train, np.memmap)


def test_missing_or_incomplete_corpus_is_a_clear_error(tmp_path, opt_tokenizer_dir):
    with pytest.raises(CorpusError, match="does not exist"):
        corpus_files(tmp_path / "missing")
    (tmp_path / "train-00.txt.xz").write_bytes(b"")
    with pytest.raises(CorpusError, match="heldout.txt.xz"):
        tokenize_corpus(tmp_path, opt_tokenizer_dir, tmp_path / "cache")
    (tmp_path / "heldout.txt.xz").write_bytes(b"not xz")
    with pytest.raises(CorpusError, match="cannot read"):
        read_books(tmp_path / "heldout.txt.xz")
