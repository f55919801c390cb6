"""Collect the dense model's activations for predictor training: ``dj.collect_activations``.

The model runs full-sequence forwards (jit) over windows of a token stream; at a few sampled
positions per window it records, for every layer, the attention input, the MLP input, the
fc1 post-ReLU activations (magnitudes and exact active bits) and each head's output norm
(see `instrument.py`). Records stream to disk in shards (`shards.py`), at most one shard in
host memory; finished shards are skipped when a run is repeated (resume).

Held-out data is kept apart: ``heldout_stream`` (e.g. the corpus's held-out books), or else
the last ``heldout_fraction`` of the stream's windows, go to the "heldout" split.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax.errors import InputError
from dejavu_jax.model import OPTModel
from dejavu_jax.predictors import shards as S
from dejavu_jax.predictors import tokens as TK
from dejavu_jax.predictors.instrument import run_layers
from dejavu_jax.predictors.modules import config_fingerprint

FORMAT_VERSION = 1


@functools.partial(jax.jit, static_argnames=("config", "store_dtype"))
def record_positions(params, tokens: jax.Array, sample_pos: jax.Array, *, config, store_dtype=jnp.float16):
    """Records at sampled positions. tokens: [B, T] int32; sample_pos: [B, P] int32.
    Returns {"attn_in", "mlp_in": [L, B, P, d] store_dtype, "mlp_act": [L, B, P, F] f16,
    "mlp_active": [L, B, P, ceil(F/8)] uint8 (packed bits), "head_norm": [L, B, P, H] f32}."""
    out: dict[str, list] = {f: [] for f in S.LAYER_FIELDS}

    def gather(a):
        return jnp.take_along_axis(a, sample_pos.reshape(sample_pos.shape + (1,) * (a.ndim - 2)), axis=1)

    def on_layer(l, rec):
        act = gather(rec["mlp_act"])
        out["attn_in"].append(gather(rec["attn_in"]).astype(store_dtype))
        out["mlp_in"].append(gather(rec["mlp_in"]).astype(store_dtype))
        out["mlp_act"].append(act.astype(jnp.float16))
        out["mlp_active"].append(jnp.packbits(act > 0, axis=-1))
        out["head_norm"].append(gather(rec["head_norm"]))

    run_layers(params, tokens, config, on_layer=on_layer)
    return {k: jnp.stack(v) for k, v in out.items()}


def sample_positions(seed: int, split: str, window_index: int, seq_len: int, count: int, min_position: int) -> np.ndarray:
    """``count`` distinct positions in [min_position, seq_len), sorted; a fixed function of
    (seed, split, window) so resumed runs sample the same."""
    rng = np.random.default_rng([seed, S.SPLITS.index(split), window_index])
    return np.sort(rng.choice(np.arange(min_position, seq_len), size=count, replace=False)).astype(np.int32)


def bytes_per_position(config, store_dtype) -> int:
    L, d, F, H = config.num_hidden_layers, config.hidden_size, config.ffn_dim, config.num_attention_heads
    return L * (2 * d * np.dtype(store_dtype).itemsize + 2 * F + math.ceil(F / 8) + 4 * H) + 8


def _plan(stream_len: int, heldout_len: int | None, seq_len: int, prepend_bos: bool,
          heldout_fraction: float) -> dict[str, tuple[str, range]]:
    """Which stream and windows each split reads: {split: (stream name, window range)}."""
    n = TK.num_windows(stream_len, seq_len, prepend_bos)
    if heldout_len is None:
        n_held = max(1, round(heldout_fraction * n)) if heldout_fraction > 0 else 0
        if n - n_held < 1:
            raise InputError(f"the token stream gives {n} windows of {seq_len} tokens: too few to hold out "
                             f"{heldout_fraction:.0%}. Pass more tokens or a shorter seq_len.")
        return {"train": ("stream", range(0, n - n_held)), "heldout": ("stream", range(n - n_held, n))}
    n_held = TK.num_windows(heldout_len, seq_len, prepend_bos)
    if n < 1 or n_held < 1:
        raise InputError(f"need at least one window of {seq_len} tokens in each stream; got {n} (train) "
                         f"and {n_held} (held-out) windows.")
    return {"train": ("stream", range(0, n)), "heldout": ("heldout_stream", range(0, n_held))}


def _check_meta(root: Path, meta: dict) -> None:
    file = root / "meta.json"
    if file.exists():
        old = json.loads(file.read_text())
        diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
        if diff:
            raise InputError(f"{root} already holds a collection with other settings ({', '.join(diff)} "
                             "differ). Use another out_dir, or delete this one to start over.")
    else:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.rename(file)


def collect_activations(model: OPTModel, token_stream, out_dir: str | Path, *, positions_per_seq: int = 32,
                        seq_len: int = 256, max_tokens: int | None = None, heldout_stream=None,
                        heldout_fraction: float = 0.1, heldout_max_tokens: int | None = None,
                        batch_size: int = 8, shard_bytes: int = 256 << 20, prepend_bos: bool = True,
                        min_position: int = 1, store_dtype: str = "float16", seed: int = 0,
                        progress: bool = True) -> dict:
    """Run ``model`` over windows of ``token_stream`` ([N] token ids) and write records of
    ``positions_per_seq`` sampled positions per window to ``out_dir`` (format: `shards.py`).

    ``max_tokens`` caps the tokens read from the stream; ``heldout_max_tokens`` (default
    ``heldout_fraction * max_tokens``) those from ``heldout_stream``. Windows are ``seq_len``
    tokens, the first ``</s>`` when ``prepend_bos``; positions are sampled from
    [min_position, seq_len). Resumable: finished shards are kept and skipped.
    Returns the collection's meta dict plus {"positions": {split: count}}.
    """
    cfg = model.config
    if seq_len > cfg.max_position_embeddings:
        raise InputError(f"seq_len {seq_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}.")
    if not 0 < positions_per_seq <= seq_len - min_position:
        raise InputError(f"positions_per_seq must lie in [1, {seq_len - min_position}] (seq_len - "
                         f"min_position); got {positions_per_seq}.")
    streams = {"stream": np.asarray(token_stream[:max_tokens] if max_tokens else token_stream)}
    held_len = None
    if heldout_stream is not None:
        cap = heldout_max_tokens or (max(seq_len, int(heldout_fraction * max_tokens)) if max_tokens else None)
        streams["heldout_stream"] = np.asarray(heldout_stream[:cap] if cap else heldout_stream)
        held_len = len(streams["heldout_stream"])
    for name, st in streams.items():
        if len(st) and (int(st.max()) >= cfg.vocab_size or int(st.min()) < 0):
            raise InputError(f"the {name.replace('_', ' ')} holds token ids up to {int(st.max())}, outside the model's "
                             f"vocabulary [0, {cfg.vocab_size}); tokenize with the model's own tokenizer.")
    plan = _plan(len(streams["stream"]), held_len, seq_len, prepend_bos, heldout_fraction)

    per_window = positions_per_seq * bytes_per_position(cfg, store_dtype)
    windows_per_shard = max(1, min(shard_bytes // per_window, 1 << 20))
    windows_per_shard = max(batch_size, windows_per_shard // batch_size * batch_size)
    root = Path(out_dir)
    meta = {"format_version": FORMAT_VERSION, "fingerprint": config_fingerprint(cfg),
            "config": cfg.to_hf_dict(), "seq_len": seq_len, "positions_per_seq": positions_per_seq,
            "prepend_bos": prepend_bos, "min_position": min_position, "store_dtype": store_dtype,
            "seed": seed, "windows_per_shard": windows_per_shard,
            "splits": {s: {"stream": src, "windows": [r.start, r.stop]} for s, (src, r) in plan.items()}}
    _check_meta(root, meta)

    from tqdm.auto import tqdm

    dtype = jnp.dtype(store_dtype)
    counts = {}
    for split, (src, wins) in plan.items():
        split_dir = root / split
        split_dir.mkdir(parents=True, exist_ok=True)
        S.remove_partial(split_dir)
        n_shards = math.ceil(len(wins) / windows_per_shard)
        done = {p.name for p in S.complete_shards(split_dir)}
        todo = [i for i in range(n_shards) if S.shard_name(i) not in done]
        left = sum(len(wins[i * windows_per_shard:(i + 1) * windows_per_shard]) for i in todo)
        bar = tqdm(total=len(wins), desc=f"collect {split}", unit="seq", disable=not progress,
                   initial=len(wins) - left)
        for i in todo:
            shard_wins = wins[i * windows_per_shard:(i + 1) * windows_per_shard]
            parts = []
            for b in range(0, len(shard_wins), batch_size):
                idx = list(shard_wins[b:b + batch_size])
                real = len(idx)
                idx += [idx[-1]] * (batch_size - real)  # pad: one compiled shape
                toks = TK.windows(streams[src], idx, seq_len, prepend_bos, cfg.bos_token_id)
                pos = np.stack([sample_positions(seed, split, w, seq_len, positions_per_seq, min_position)
                                for w in idx])
                rec = jax.device_get(record_positions(model.params, jnp.asarray(toks), jnp.asarray(pos),
                                                      config=cfg, store_dtype=dtype))
                rec = {k: v[:, :real] for k, v in rec.items()}
                rec["tokens"] = np.take_along_axis(toks, pos, axis=1)[:real]
                rec["positions"] = pos[:real]
                parts.append(rec)
                bar.update(real)
            arrays = {}
            for k in S.LAYER_FIELDS:
                a = np.concatenate([p[k] for p in parts], axis=1)
                arrays[k] = a.reshape(a.shape[0], -1, *a.shape[3:])
            for k in S.POSITION_FIELDS:
                arrays[k] = np.concatenate([p[k] for p in parts]).reshape(-1).astype(np.int32)
            for k in ("attn_in", "mlp_in"):
                if not np.isfinite(arrays[k]).all():
                    raise InputError(f"{k} overflows {store_dtype}; collect again with store_dtype='float32'.")
            S.write_shard(split_dir, i, arrays, (shard_wins.start, shard_wins.stop))
        bar.close()
        counts[split] = sum(json.loads((p / "done.json").read_text())["positions"]
                            for p in S.complete_shards(split_dir))
    return {**meta, "positions": counts}


# ---- CLI ---------------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    """Register ``dejavu collect``."""
    from dejavu_jax.predictors import cli as _cli

    p = subparsers.add_parser("collect", help="record a model's activations for predictor training",
                              description=__doc__.split("\n\n")[0])
    _cli.add_model_args(p)
    _cli.add_token_args(p)
    p.add_argument("--out", required=True, help="directory for the shards (resumes if it exists)")
    p.add_argument("--positions-per-seq", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--store-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_collect_cli)


def run_collect_cli(args) -> dict:
    from dejavu_jax.predictors import cli as _cli

    model = _cli.load_model(args.model, args.dtype)
    train, held = _cli.load_streams(args, model)
    info = collect_activations(model, train, args.out, positions_per_seq=args.positions_per_seq,
                               seq_len=args.seq_len, max_tokens=args.max_tokens, heldout_stream=held,
                               heldout_fraction=args.heldout_fraction, batch_size=args.batch_size,
                               store_dtype=args.store_dtype, seed=args.seed)
    print(f"collected {info['positions']} positions into {args.out}")
    return info
