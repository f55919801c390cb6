"""Fixtures for the training tests: a small corpus cut from the real books (shared/data)."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
SEP = "\n\x1e\n"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "corpus" / "heldout.txt.xz").is_file():
        pytest.skip(f"the project's data folder {SHARED_DATA} is not beside the repository")
    return SHARED_DATA


@pytest.fixture(scope="session")
def opt_tokenizer_dir(shared_data) -> Path:
    return shared_data / "tokenizer" / "opt"


@pytest.fixture(scope="session")
def small_corpus(shared_data, tmp_path_factory) -> Path:
    """train-00/01.txt.xz with slices of 4 real held-out books (~60k characters), and a
    heldout.txt.xz with a slice of a fifth, in the real format."""
    books = lzma.open(shared_data / "corpus" / "heldout.txt.xz", "rt", encoding="utf-8").read().split(SEP)
    books = [b[5000:20000] for b in books if b][:5]
    out = tmp_path_factory.mktemp("small_corpus")
    for name, part in (("train-00", books[:2]), ("train-01", books[2:4]), ("heldout", books[4:])):
        with lzma.open(out / f"{name}.txt.xz", "wt", encoding="utf-8") as f:
            f.write("".join(b + SEP for b in part))
    return out


@pytest.fixture(scope="session")
def small_cache(small_corpus, opt_tokenizer_dir, tmp_path_factory):
    from dejavu_jax.data import tokenize_corpus

    return tokenize_corpus(small_corpus, opt_tokenizer_dir, tmp_path_factory.mktemp("cache"),
                           log=lambda *a: None)
