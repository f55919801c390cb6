"""Hugging Face OPT tensor names <-> our parameter pytree (layout in `dejavu_jax.model`).

`params_from_hf` pulls tensors one at a time through a ``get(name) -> np.ndarray``
callable, so a loader can stream them from safetensors shards or a torch file, and casts
each to the target dtype as soon as it is read. Both the ``model.decoder.*`` names of
`OPTForCausalLM` and the bare ``decoder.*`` names of some original checkpoints are accepted.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from dejavu_jax.config import POSITION_OFFSET, OPTConfig
from dejavu_jax.errors import CheckpointError

Getter = Callable[[str], np.ndarray]


def canonical_name(name: str) -> str:
    """Strip the ``model.`` prefix: 'model.decoder.x' and 'decoder.x' both -> 'decoder.x'."""
    return name[len("model."):] if name.startswith("model.") else name


def expected_shapes(config: OPTConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor (canonical name) our conversion reads, with its HF shape."""
    d, F, E, V = config.hidden_size, config.ffn_dim, config.word_embed_proj_dim, config.vocab_size
    shapes = {
        "decoder.embed_tokens.weight": (V, E),
        "decoder.embed_positions.weight": (config.max_position_embeddings + POSITION_OFFSET, d),
    }
    if config.has_projections:
        shapes["decoder.project_in.weight"] = (d, E)
        shapes["decoder.project_out.weight"] = (E, d)
    if config.has_final_layer_norm and config.layer_norm_elementwise_affine:
        shapes["decoder.final_layer_norm.weight"] = (d,)
        shapes["decoder.final_layer_norm.bias"] = (d,)
    for i in range(config.num_hidden_layers):
        p = f"decoder.layers.{i}."
        linears = {f"self_attn.{n}_proj": (d, d) for n in "qkv"}
        linears["self_attn.out_proj"] = (d, d)
        linears["fc1"] = (F, d)
        linears["fc2"] = (d, F)
        for name, shape in linears.items():
            shapes[p + name + ".weight"] = shape
            if config.enable_bias:
                shapes[p + name + ".bias"] = (shape[0],)
        if config.layer_norm_elementwise_affine:
            for ln in ("self_attn_layer_norm", "final_layer_norm"):
                shapes[p + ln + ".weight"] = (d,)
                shapes[p + ln + ".bias"] = (d,)
    return shapes


def params_from_hf(get: Getter, config: OPTConfig, dtype, put: Callable | None = None,
                   progress: Callable[[int], None] | None = None) -> dict:
    """Build the params pytree. ``get(canonical_name)`` returns one HF tensor (numpy);
    ``put(array, path)`` places a finished leaf (e.g. on a device or sharding; path is a
    tuple naming it); ``progress(n)`` is told after each layer. Shapes are checked, and a
    missing or mis-shaped tensor raises `CheckpointError` naming it."""
    shapes = expected_shapes(config)
    d, H, hd = config.hidden_size, config.num_attention_heads, config.head_dim

    def read(name: str) -> np.ndarray:
        try:
            t = get(name)
        except KeyError:
            raise CheckpointError(
                f"tensor {name!r} is missing from the checkpoint; is it a complete OPT "
                f"checkpoint matching its config.json ({config.num_hidden_layers} layers, "
                f"hidden {d})?") from None
        if tuple(t.shape) != shapes[name]:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(t.shape)} but config.json implies "
                f"{shapes[name]}; the weights and config.json do not belong together.")
        return np.asarray(t, dtype=np.float32) if t.dtype != np.float32 else t

    def cast(a: np.ndarray, path: tuple):
        a = np.asarray(a).astype(dtype)
        return a if put is None else put(a, path)

    def vec(name: str, fill: float, n: int) -> np.ndarray:
        return read(name) if name in shapes else np.full((n,), fill, np.float32)

    def ln(prefix: str, path: tuple) -> dict:
        return {"scale": cast(vec(prefix + ".weight", 1.0, d), path + ("scale",)),
                "bias": cast(vec(prefix + ".bias", 0.0, d), path + ("bias",))}

    params: dict = {
        "embed_tokens": cast(read("decoder.embed_tokens.weight"), ("embed_tokens",)),
        "embed_positions": cast(read("decoder.embed_positions.weight"), ("embed_positions",)),
    }
    if config.has_projections:
        params["project_in"] = cast(read("decoder.project_in.weight").T, ("project_in",))
        params["project_out"] = cast(read("decoder.project_out.weight").T, ("project_out",))
    if config.has_final_layer_norm:
        params["final_layer_norm"] = ln("decoder.final_layer_norm", ("final_layer_norm",))
    layers = []
    for i in range(config.num_hidden_layers):
        p, path = f"decoder.layers.{i}.", ("layers", i)
        F = config.ffn_dim
        wqkv = np.stack([read(f"{p}self_attn.{n}_proj.weight").reshape(H, hd, d) for n in "qkv"])
        bqkv = np.stack([vec(f"{p}self_attn.{n}_proj.bias", 0.0, d).reshape(H, hd) for n in "qkv"])
        wo_t = read(f"{p}self_attn.out_proj.weight").T.reshape(H, hd, d)
        layers.append({
            "attn_ln": ln(p + "self_attn_layer_norm", path + ("attn_ln",)),
            "attn": {"wqkv": cast(wqkv, path + ("attn", "wqkv")),
                     "bqkv": cast(bqkv, path + ("attn", "bqkv")),
                     "wo_t": cast(wo_t, path + ("attn", "wo_t")),
                     "bo": cast(vec(f"{p}self_attn.out_proj.bias", 0.0, d), path + ("attn", "bo"))},
            "mlp_ln": ln(p + "final_layer_norm", path + ("mlp_ln",)),
            "mlp": {"fc1": cast(read(p + "fc1.weight"), path + ("mlp", "fc1")),
                    "b1": cast(vec(p + "fc1.bias", 0.0, F), path + ("mlp", "b1")),
                    "fc2_t": cast(read(p + "fc2.weight").T, path + ("mlp", "fc2_t")),
                    "b2": cast(vec(p + "fc2.bias", 0.0, d), path + ("mlp", "b2"))},
        })
        del wqkv, wo_t
        if progress is not None:
            progress(1)
    params["layers"] = layers
    return params


def hf_state_dict_from_params(params: dict, config: OPTConfig) -> dict[str, np.ndarray]:
    """Our params -> HF `OPTForCausalLM` state dict (``model.decoder.*`` names, numpy arrays in
    the params' dtype; tied ``lm_head.weight`` omitted, as save_pretrained does)."""
    d = config.hidden_size
    out: dict[str, np.ndarray] = {}

    def put(name: str, a) -> None:
        out["model." + name] = np.ascontiguousarray(np.asarray(a))

    put("decoder.embed_tokens.weight", params["embed_tokens"])
    put("decoder.embed_positions.weight", params["embed_positions"])
    if config.has_projections:
        put("decoder.project_in.weight", np.asarray(params["project_in"]).T)
        put("decoder.project_out.weight", np.asarray(params["project_out"]).T)
    affine, bias = config.layer_norm_elementwise_affine, config.enable_bias

    def put_ln(name: str, p: dict) -> None:
        if affine:
            put(name + ".weight", p["scale"])
            put(name + ".bias", p["bias"])

    if config.has_final_layer_norm:
        put_ln("decoder.final_layer_norm", params["final_layer_norm"])
    for i, lp in enumerate(params["layers"]):
        p = f"decoder.layers.{i}."
        wqkv, bqkv = np.asarray(lp["attn"]["wqkv"]), np.asarray(lp["attn"]["bqkv"])
        for s, n in enumerate("qkv"):
            put(f"{p}self_attn.{n}_proj.weight", wqkv[s].reshape(d, d))
            if bias:
                put(f"{p}self_attn.{n}_proj.bias", bqkv[s].reshape(d))
        put(f"{p}self_attn.out_proj.weight", np.asarray(lp["attn"]["wo_t"]).reshape(d, d).T)
        put(f"{p}fc1.weight", lp["mlp"]["fc1"])
        put(f"{p}fc2.weight", np.asarray(lp["mlp"]["fc2_t"]).T)
        if bias:
            put(f"{p}self_attn.out_proj.bias", lp["attn"]["bo"])
            put(f"{p}fc1.bias", lp["mlp"]["b1"])
            put(f"{p}fc2.bias", lp["mlp"]["b2"])
        put_ln(p + "self_attn_layer_norm", lp["attn_ln"])
        put_ln(p + "final_layer_norm", lp["mlp_ln"])
    return out


def unexpected_tensors(names: Iterable[str], config: OPTConfig) -> list[str]:
    """Checkpoint tensors our conversion would ignore (other than the tied lm_head)."""
    known = set(expected_shapes(config))
    return sorted(n for n in names
                  if canonical_name(n) not in known and canonical_name(n) != "lm_head.weight")
