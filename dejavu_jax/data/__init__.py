"""Data for training and evaluation: OPT's tokenizer, the book corpus, the token cache."""

from dejavu_jax.data.cache import TokenCache, tokenize_corpus
from dejavu_jax.data.corpus import CorpusError, corpus_files, encode_documents, read_books
from dejavu_jax.data.tokenizer import (TokenizerError, check_tokenizer, load_tokenizer,
                                       write_tokenizer_files)

__all__ = ["TokenCache", "tokenize_corpus", "CorpusError", "corpus_files", "encode_documents",
           "read_books", "TokenizerError", "check_tokenizer", "load_tokenizer",
           "write_tokenizer_files"]
