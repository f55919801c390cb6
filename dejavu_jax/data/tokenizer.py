"""OPT's tokenizer from local files: load it, check it is OPT's, and write a complete copy.

OPT uses GPT-2's byte-level BPE with fairseq ids (``<s>``=0, ``<pad>``=1, ``</s>``=2,
``<unk>``=3) and prepends ``</s>`` (id 2) as BOS to every text. A directory with only
``vocab.json`` and ``merges.txt`` (as staged in ``shared/data/tokenizer/opt``) is loaded with
those OPT settings; `write_tokenizer_files` adds the ``tokenizer_config.json`` /
``special_tokens_map.json`` that Hugging Face OPT directories carry (values as published
for ``facebook/opt-*``), so ``AutoTokenizer.from_pretrained(dir)`` gives the same result.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from dejavu_jax.errors import DejavuError

BOS_ID, PAD_ID, EOS_ID = 2, 1, 2
OPT_VOCAB_FILES = ("vocab.json", "merges.txt")
# A check that the files are OPT's (fairseq ids), not GPT-2's: "Hello world" -> these ids.
_PROBE_TEXT, _PROBE_IDS = "Hello world", [BOS_ID, 31414, 232]

# What facebook/opt-* publish (bos = eos = unk = "</s>", pad = "<pad>", BOS added).
SPECIAL_TOKENS_MAP = {
    "bos_token": "</s>",
    "eos_token": "</s>",
    "unk_token": "</s>",
    "pad_token": "<pad>",
}
TOKENIZER_CONFIG = {
    "tokenizer_class": "GPT2Tokenizer",
    "add_bos_token": True,
    "add_prefix_space": False,
    "errors": "replace",
    "model_max_length": 1000000000000000019884624838656,
    **SPECIAL_TOKENS_MAP,
}


class TokenizerError(DejavuError):
    """Tokenizer files missing, or not OPT's tokenizer."""


def _require_files(path: Path) -> None:
    if not path.is_dir():
        raise TokenizerError(
            f"tokenizer directory {path} does not exist; pass the folder holding OPT's vocab.json "
            "and merges.txt (e.g. ../shared/data/tokenizer/opt, or a model directory).")
    missing = [f for f in OPT_VOCAB_FILES if not (path / f).is_file()]
    if missing and not (path / "tokenizer.json").is_file():
        raise TokenizerError(
            f"{path} lacks {missing}; an OPT tokenizer directory holds vocab.json and merges.txt "
            "(or a tokenizer.json).")


def load_tokenizer(path: str | Path, check: bool = True):
    """OPT's tokenizer (a fast `transformers` tokenizer) from local files, never the hub.

    With a ``tokenizer_config.json`` in ``path`` it is loaded as written there; otherwise
    from vocab.json + merges.txt with OPT's special tokens. ``check`` runs `check_tokenizer`.
    """
    from transformers import AutoTokenizer, GPT2Tokenizer

    path = Path(path)
    _require_files(path)
    if (path / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        tok = GPT2Tokenizer.from_pretrained(str(path), local_files_only=True,
                                            add_bos_token=True, **SPECIAL_TOKENS_MAP)
    if check:
        check_tokenizer(tok, source=str(path))
    return tok


def check_tokenizer(tok, vocab_size: int | None = None, source: str = "tokenizer",
                    probe: bool = True) -> None:
    """Raise `TokenizerError` unless ``tok`` has OPT's special ids (``<pad>``=1, ``</s>``=2 as
    EOS and prepended BOS), encodes like OPT's tokenizer (fairseq ids; skipped with
    ``probe=False``, e.g. for small test vocabularies) and, given ``vocab_size`` (the
    model's embedding rows), fits in it."""
    ids = list(tok(_PROBE_TEXT)["input_ids"])
    if not ids or ids[0] != BOS_ID:
        raise TokenizerError(
            f"{source} does not prepend </s> (id {BOS_ID}) as BOS (got {ids[:3]}...); OPT "
            "tokenizers set add_bos_token=True in tokenizer_config.json.")
    if probe and ids != _PROBE_IDS:
        raise TokenizerError(
            f"{source} encodes {_PROBE_TEXT!r} as {ids}, but OPT's tokenizer gives {_PROBE_IDS} "
            "(BOS </s>=2, then fairseq ids). Is this GPT-2's vocabulary (different ids) or a "
            "tokenizer without add_bos_token? Use OPT's vocab.json/merges.txt.")
    if tok.pad_token_id != PAD_ID or tok.eos_token_id != EOS_ID:
        raise TokenizerError(
            f"{source} has pad id {tok.pad_token_id} and eos id {tok.eos_token_id}; OPT uses "
            f"<pad>={PAD_ID} and </s>={EOS_ID}.")
    if vocab_size is not None and len(tok) > vocab_size:
        raise TokenizerError(
            f"{source} has {len(tok)} tokens but the model's vocab_size is {vocab_size}; the "
            "tokenizer does not belong to this model.")


def write_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy OPT's vocab.json / merges.txt from ``src`` into ``dst`` and write
    tokenizer_config.json, special_tokens_map.json and tokenizer.json beside them.
    Returns the file names written."""
    src, dst = Path(src), Path(dst)
    _require_files(src)
    dst.mkdir(parents=True, exist_ok=True)
    for name in OPT_VOCAB_FILES:
        if (src / name).resolve() != (dst / name).resolve():
            shutil.copyfile(src / name, dst / name)
    (dst / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (dst / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n")
    tok = load_tokenizer(dst)  # checks the result
    tok.backend_tokenizer.save(str(dst / "tokenizer.json"))
    return [*OPT_VOCAB_FILES, "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"]


def tokenizer_fingerprint(path: str | Path) -> str:
    """sha256 over vocab.json + merges.txt: names a token cache built with this tokenizer."""
    path = Path(path)
    _require_files(path)
    names = [n for n in OPT_VOCAB_FILES if (path / n).is_file()] or ["tokenizer.json"]
    h = hashlib.sha256()
    for name in names:
        h.update((path / name).read_bytes())
    return h.hexdigest()[:16]
