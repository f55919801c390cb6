"""Export trained params as a standard Hugging Face OPT directory, with a model card.

    export_hf(params, config, "models/opt-gutenberg-6l", tokenizer_src, card_facts)

writes config.json, ``model.safetensors`` in 16-bit (sharded with an index json above
``max_shard_size``), OPT's tokenizer files and README.md (the model card); loadable offline
by ``transformers.OPTForCausalLM.from_pretrained`` and ``dj.load_opt``.

Transport: files coming back from the GPU machine are limited in size (16 MiB each), and
the tied embedding alone is 25.7 MB in bf16. `write_transport` splits the HF state dict into
safetensors files under a byte limit, cutting tensors that are too large into row blocks
(``name@rows:a-b``); `read_transport` joins them back bit for bit, and the directory is then
rebuilt with `export_hf` here.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax.config import OPTConfig
from dejavu_jax.errors import CheckpointError
from dejavu_jax.model import OPTModel

TRANSPORT_PREFIX = "weights"
_ROWS = re.compile(r"^(?P<name>.+)@rows:(?P<a>\d+)-(?P<b>\d+)$")


def cast_params(params: dict, dtype=jnp.bfloat16) -> dict:
    """Params as host numpy arrays of ``dtype`` (f32 masters rounded to nearest)."""
    return jax.tree.map(lambda a: np.asarray(jax.device_get(a)).astype(jnp.dtype(dtype)), params)


def export_hf(params: dict, config: OPTConfig, out_dir: str | Path, tokenizer_src: str | Path,
              card_facts: dict | None = None, *, dtype=jnp.bfloat16,
              max_shard_size: int | str = "5GB", fast_tokenizer_file: bool = False) -> Path:
    """Write the HF directory (replacing an old one). ``tokenizer_src``: a folder with OPT's
    vocab.json + merges.txt. ``fast_tokenizer_file``: also write tokenizer.json (2 MB; left
    out of the committed model to save space, transformers builds it from vocab/merges)."""
    from dejavu_jax.checkpoint import save_hf
    from dejavu_jax.data.tokenizer import write_tokenizer_files

    with tempfile.TemporaryDirectory() as tok_dir:
        write_tokenizer_files(tokenizer_src, tok_dir)
        if not fast_tokenizer_file:
            (Path(tok_dir) / "tokenizer.json").unlink()
        model = OPTModel(config, cast_params(params, dtype), source=tok_dir)
        out = save_hf(model, out_dir, max_shard_size=max_shard_size, overwrite=True)
    if card_facts is not None:
        write_model_card(out, config, card_facts)
    return out


def write_transport(state: dict[str, np.ndarray], out_dir: str | Path, max_bytes: int = 15_000_000,
                    prefix: str = TRANSPORT_PREFIX) -> list[Path]:
    """Split a state dict into ``<prefix>-i-of-n.safetensors`` files of at most ``max_bytes``
    of tensor data each (+ a small header). Returns the files."""
    from safetensors.numpy import save_file

    pieces: list[tuple[str, np.ndarray]] = []
    for name, a in state.items():
        if a.nbytes <= max_bytes:
            pieces.append((name, a))
            continue
        rows = max(1, max_bytes // max(1, a.nbytes // a.shape[0]))
        for r in range(0, a.shape[0], rows):
            pieces.append((f"{name}@rows:{r}-{min(r + rows, a.shape[0])}", a[r:r + rows]))
    files: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, a in pieces:
        if files[-1] and size + a.nbytes > max_bytes:
            files.append({})
            size = 0
        files[-1][name] = np.ascontiguousarray(a)
        size += a.nbytes
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(files, 1):
        path = out_dir / f"{prefix}-{i:05d}-of-{len(files):05d}.safetensors"
        save_file(part, path, metadata={"format": "dejavu-transport"})
        paths.append(path)
    return paths


def read_transport(src_dir: str | Path, prefix: str = TRANSPORT_PREFIX) -> dict[str, np.ndarray]:
    """Join the files of `write_transport` back into the state dict."""
    from safetensors.numpy import load_file

    files = sorted(Path(src_dir).glob(f"{prefix}-*-of-*.safetensors"))
    if not files:
        raise CheckpointError(f"no {prefix}-*-of-*.safetensors files in {src_dir}.")
    n = int(files[0].stem.split("-of-")[1])
    if len(files) != n:
        raise CheckpointError(f"{src_dir} holds {len(files)} of the {n} transport files; "
                              "fetch all of them.")
    whole: dict[str, np.ndarray] = {}
    blocks: dict[str, list[tuple[int, int, np.ndarray]]] = {}
    for f in files:
        for name, a in load_file(f).items():
            m = _ROWS.match(name)
            if m:
                blocks.setdefault(m["name"], []).append((int(m["a"]), int(m["b"]), a))
            else:
                whole[name] = a
    for name, parts in blocks.items():
        parts.sort(key=lambda p: p[0])
        if any(p[1] != q[0] for p, q in zip(parts, parts[1:])) or parts[0][0] != 0:
            raise CheckpointError(f"row blocks of {name!r} do not cover it: a transport file is missing.")
        whole[name] = np.concatenate([p[2] for p in parts])
    return whole


def params_from_state(state: dict[str, np.ndarray], config: OPTConfig, dtype=None) -> dict:
    """A HF state dict (numpy) -> our params pytree, in ``dtype`` (default: as stored)."""
    from dejavu_jax import weights

    canon = {weights.canonical_name(k): v for k, v in state.items()}
    dtype = dtype or next(iter(canon.values())).dtype
    return weights.params_from_hf(lambda name: canon[name], config, dtype)


# ---- model card -----------------------------------------------------------------------------
def _fmt(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def write_model_card(out_dir: str | Path, config: OPTConfig, f: dict) -> Path:
    """README.md for the exported model from the run's facts ``f`` (keys as in the figures file:
    params, tokens_seen, steps, train_loss, heldout_loss, heldout_ppl, wikitext2_ppl,
    hf_wikitext2_ppl, unigram_wikitext2_ppl, device, commit, ...)."""
    name = f.get("name") or Path(out_dir).name
    weight_mb = 2 * config.num_params() / 1e6
    text = f"""---
license: apache-2.0
language: en
library_name: transformers
pipeline_tag: text-generation
tags: [opt, dejavu-jax, contextual-sparsity]
---

# {name}

A small OPT-architecture causal language model trained from scratch by
[dejavu-jax](../../README.md) on public-domain books, as the project's reference model:
contextual sparsity (ReLU activation sparsity, head importance, predictor recall) only means
something on trained weights, and no real OPT weights are available where it is developed.
It is a standard Hugging Face OPT directory: `transformers.OPTForCausalLM.from_pretrained`
and `dejavu_jax.load_opt` both load it offline. It is a small model: fluent-looking
English in the style of 19th-century books, little knowledge, no instruction following.

## Architecture
| | |
|---|---|
| layers | {config.num_hidden_layers}, pre-LayerNorm, ReLU MLP, learned positions (offset 2) |
| d_model / d_ff / heads | {config.hidden_size} / {config.ffn_dim} / {config.num_attention_heads} (head dim {config.head_dim}) |
| positions | {config.max_position_embeddings} |
| vocabulary | {config.vocab_size} (OPT's tokenizer, 50265 ids, padded), tied input/output embedding |
| parameters | {config.num_params():,} ({weight_mb:.1f} MB in bfloat16 safetensors) |

## Training
- **Data**: {f.get('train_books', 386)} English books from Project Gutenberg (public domain in the USA;
  Gutenberg headers and license text removed), about 137 MB of text,
  {f.get('train_tokens_available', 0):,} tokens with OPT's tokenizer, each book preceded by `</s>`.
  Source: the `rcdm-uga/Gutenberg_Text` collection; selection and cleaning are described in
  the project's data provenance notes. {f.get('heldout_books', 8)} further books were held out for validation.
- **Recipe**: AdamW (b1 {f.get('b1', 0.9)}, b2 {f.get('b2', 0.95)}, weight decay {f.get('weight_decay', 0.1)}),
  peak learning rate {f.get('peak_lr', 'n/a')} with {f.get('warmup_steps', 'n/a')} warmup steps and
  cosine decay to {f.get('min_lr_ratio', 0.1)} x peak, gradient clipping at {f.get('grad_clip', 1.0)},
  bf16 compute with f32 master weights, {f.get('batch_size', 'n/a')} sequences of {f.get('seq_len', 'n/a')} tokens
  per step, on {f.get('device', 'n/a')} ({f.get('train_seconds', 0):.0f} s of training).
- **Steps**: {f.get('steps', 'n/a')}; **tokens seen**: {f.get('tokens_seen', 0):,}
  ({f.get('epochs', 0):.1f} passes over the training tokens).
- **Final losses** (nats/token): train {_fmt(f.get('train_loss'))} (mean of the last 200 steps),
  held-out {_fmt(f.get('heldout_loss'))}.

## Evaluation
Sliding-window perplexity (context {f.get('eval_context', 'n/a')}, stride {f.get('eval_stride', 'n/a')}; every
token scored once), float32:

| text | tokens | this model (JAX) | this model (HF torch) | unigram baseline |
|---|---|---|---|---|
| WikiText-2 test (raw) | {f.get('wikitext2_tokens', 'n/a')} | {_fmt(f.get('wikitext2_ppl'), '.2f')} | {_fmt(f.get('hf_wikitext2_ppl'), '.2f')} | {_fmt(f.get('unigram_wikitext2_ppl'), '.2f')} |
| held-out books | {f.get('heldout_tokens', 'n/a')} | {_fmt(f.get('heldout_ppl'), '.2f')} | {_fmt(f.get('hf_heldout_ppl'), '.2f')} | {_fmt(f.get('unigram_heldout_ppl'), '.2f')} |

The unigram baseline predicts each token from its frequency in the training books
(add-one smoothing). WikiText-2 (Wikipedia, CC BY-SA 3.0) is out of domain for a model
trained on old books. Reproduce with `dejavu eval --model {Path(out_dir).as_posix()} --hf`
(add `--corpus DIR` for the held-out books).

## License and attribution
- Weights: Apache-2.0 (the license of dejavu-jax). Trained only on Project Gutenberg texts
  that are public domain in the USA; some may still be under copyright elsewhere.
- Tokenizer (`vocab.json`, `merges.txt`): OPT's, from `facebookresearch/metaseq` (MIT),
  i.e. GPT-2's byte-level BPE (MIT) with fairseq ids.
- Code commit: `{f.get('commit', 'unknown')}`.
"""
    path = Path(out_dir) / "README.md"
    path.write_text(text)
    return path
