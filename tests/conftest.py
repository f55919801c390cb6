"""Shared fixtures: tiny random-init Hugging Face OPT models, saved in every file format.

All session-scoped and cached, so each model / directory is built once per test process.

* ``tiny_hf_model(variant="pre_ln", seed=0, **overrides)`` -> ``transformers.OPTForCausalLM``
  (float32, eval mode, eager attention). Every weight, bias and LayerNorm parameter is random
  (not HF's zero-bias / unit-scale init), so a mis-mapped tensor cannot hide. The returned
  model is shared: do not modify it (``copy.deepcopy`` it first).
* ``tiny_opt_dir(variant="pre_ln", fmt="safetensors", seed=0, **overrides)`` -> Path of a
  Hugging Face directory holding that model (config.json, weights, and, when vocab_size >= 300,
  the tiny tokenizer's files). ``fmt`` is one of `TINY_FORMATS`: "safetensors" (one
  model.safetensors), "sharded" (model-*.safetensors + index json), "bin"
  (pytorch_model.bin), "bin_sharded" (pytorch_model-*.bin + index json). Read-only: copy
  it before changing anything.
* ``load_script`` -> a function: ``load_script("check_pdl")`` is ``scripts/check_pdl.py`` as a
  module (the scripts are not a package).
* ``tiny_tokenizer_dir`` -> Path of a byte-level BPE tokenizer (300 ids) with OPT's special
  ids (``<s>``=0, ``<pad>``=1, ``</s>``=2 prepended as BOS, ``<unk>``=3), loadable offline by
  ``transformers.AutoTokenizer.from_pretrained``.

`TINY_VARIANTS` (below) covers pre-LN, post-LN with project_in/out, 1/2/4/8 heads, with and
without biases, with and without LayerNorm affine parameters. All have 2 layers, vocab 320
(the tokenizer's 300 ids padded, as OPT pads 50265 to 50272) and 64 positions.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TINY_BASE = dict(vocab_size=320, num_hidden_layers=2, max_position_embeddings=64,
                 pad_token_id=1, bos_token_id=2, eos_token_id=2)

TINY_VARIANTS: dict[str, dict] = {
    # opt-125m style: pre-LayerNorm, biases, affine LayerNorms
    "pre_ln": dict(hidden_size=32, num_attention_heads=4, ffn_dim=64),
    # opt-350m style: post-LayerNorm, embeddings in a smaller space (project_in / project_out)
    "post_ln_proj": dict(hidden_size=32, num_attention_heads=2, ffn_dim=48, word_embed_proj_dim=16,
                         do_layer_norm_before=False),
    # no biases anywhere, 8 heads of 8
    "no_bias_8h": dict(hidden_size=64, num_attention_heads=8, ffn_dim=96, enable_bias=False),
    # LayerNorms without scale/bias, a single head
    "no_affine_1h": dict(hidden_size=16, num_attention_heads=1, ffn_dim=40,
                         layer_norm_elementwise_affine=False),
}

TINY_FORMATS = ("safetensors", "sharded", "bin", "bin_sharded")

TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. Hello world, hello there! "
    "Deja vu: contextual sparsity for efficient language models at inference time. "
    "Once upon a time, in a land far away, there lived a small model that predicted tokens.\n"
)


def tiny_hf_config(variant: str = "pre_ln", **overrides):
    """The `transformers.OPTConfig` of a tiny variant (plus overrides)."""
    from transformers import OPTConfig

    if variant not in TINY_VARIANTS:
        raise KeyError(f"unknown tiny variant {variant!r}; choose from {sorted(TINY_VARIANTS)}")
    cfg = OPTConfig(**{**TINY_BASE, **TINY_VARIANTS[variant], **overrides})
    cfg._attn_implementation = "eager"
    return cfg


def _randomize(model, seed: int) -> None:
    """Replace HF's init (zero biases, unit LayerNorm scales) by random values everywhere."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layer_norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


def _save_bin(model, out: Path, shard_bytes: int | None) -> None:
    """pytorch_model.bin (or shards + pytorch_model.bin.index.json), as transformers 4 wrote them."""
    import torch

    model.config.save_pretrained(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shard_bytes is None:
        torch.save(state, out / "pytorch_model.bin")
        return
    shards, size = [{}], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, out / file)
        weight_map.update(dict.fromkeys(shard, file))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
         "weight_map": weight_map}))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import ByteLevelBPETokenizer

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TOKENIZER_TEXT] * 8, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    bpe.save_model(str(out))  # vocab.json, merges.txt
    special = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "add_prefix_space": False,
        "errors": "replace", "model_max_length": 64, **special}))
    return out


@pytest.fixture(scope="session")
def tiny_hf_model():
    cache: dict = {}

    def make(variant: str = "pre_ln", seed: int = 0, **overrides):
        from transformers import OPTForCausalLM

        key = (variant, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            import torch

            torch.manual_seed(seed)
            model = OPTForCausalLM(tiny_hf_config(variant, **overrides)).eval()
            _randomize(model, seed)
            cache[key] = model
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_opt_dir(tiny_hf_model, tiny_tokenizer_dir, tmp_path_factory):
    import shutil

    cache: dict = {}
    root = tmp_path_factory.mktemp("tiny_opt")

    def make(variant: str = "pre_ln", fmt: str = "safetensors", seed: int = 0, **overrides) -> Path:
        if fmt not in TINY_FORMATS:
            raise KeyError(f"unknown format {fmt!r}; choose from {TINY_FORMATS}")
        key = (variant, fmt, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            model = tiny_hf_model(variant, seed, **overrides)
            out = root / f"{variant}-{fmt}-{seed}-{len(cache)}"
            out.mkdir()
            if fmt == "safetensors":
                model.save_pretrained(out)
            elif fmt == "sharded":
                model.save_pretrained(out, max_shard_size="12KB")
            else:
                _save_bin(model, out, 12_000 if fmt == "bin_sharded" else None)
            if model.config.vocab_size >= 300:
                for f in tiny_tokenizer_dir.iterdir():
                    shutil.copy(f, out / f.name)
            cache[key] = out
        return cache[key]

    return make


# ---- real text and OPT's tokenizer, committed (tests/data, models/) -----------------------------
SEP = "\n\x1e\n"  # the corpus's book separator


@pytest.fixture(scope="session")
def opt_tokenizer_dir(tmp_path_factory) -> Path:
    """OPT's tokenizer as ../shared/data/tokenizer/opt holds it (vocab.json + merges.txt),
    copied from the reference model, which ships the same files."""
    import shutil

    out = tmp_path_factory.mktemp("opt_tokenizer")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(REPO / "models" / "opt-gutenberg-6l" / name, out / name)
    return out


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """train-00/01.txt.xz with slices of 4 real held-out books (15k characters each), and a
    heldout.txt.xz with a slice of a fifth, in the corpus's format (tests/data/README.md)."""
    import lzma

    text = lzma.open(REPO / "tests" / "data" / "heldout_slices.txt.xz", "rt", encoding="utf-8").read()
    books = [b for b in text.split(SEP) if b]
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


@pytest.fixture(scope="session")
def load_script():
    """``load_script("check_pdl")`` -> ``scripts/check_pdl.py`` as a fresh module (the scripts are
    not a package)."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load
