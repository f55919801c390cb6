"""Orbax save/load, `convert`, `save_hf`: bit-exact round trips, tokenizer files carried along,
atomic writes, and placement onto a sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dejavu_jax import checkpoint
from dejavu_jax.checkpoint import MARKER_FILE, convert, load_opt, save, save_hf
from dejavu_jax.errors import CheckpointError

TOKENIZER = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def assert_bit_equal(a_params, b_params) -> None:
    a_flat, a_def = jax.tree_util.tree_flatten_with_path(a_params)
    b_flat, b_def = jax.tree_util.tree_flatten_with_path(b_params)
    assert a_def == b_def
    for (path, a), (_, b) in zip(a_flat, b_flat):
        assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
        a, b = np.asarray(a), np.asarray(b)
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), jax.tree_util.keystr(path)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj"])
def test_orbax_round_trip_is_bit_exact(variant, dtype, tiny_opt_dir, tmp_path):
    model = load_opt(tiny_opt_dir(variant), dtype, progress=False)
    out = save(model, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp directory left behind
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["format"] == "dejavu-jax-orbax" and marker["dtype"] == jnp.dtype(dtype).name
    for name in TOKENIZER:
        assert (out / name).is_file(), name
    for requested in (None, dtype):  # None: the stored dtype
        restored = load_opt(out, requested)
        assert restored.config == model.config
        assert restored.source == str(out)
        assert_bit_equal(restored.params, model.params)


def test_orbax_restore_casts_like_loading_hf(tiny_opt_dir, tmp_path):
    """An f32 checkpoint restored as bf16 equals the HF directory loaded as bf16 directly."""
    out = save(load_opt(tiny_opt_dir("no_bias_8h"), jnp.float32, progress=False), tmp_path / "f32")
    assert_bit_equal(load_opt(out, jnp.bfloat16).params,
                     load_opt(tiny_opt_dir("no_bias_8h"), jnp.bfloat16, progress=False).params)


def test_convert_streams_hf_to_orbax(tiny_opt_dir, tmp_path):
    out = convert(tiny_opt_dir("post_ln_proj", "bin_sharded"), tmp_path / "conv", jnp.bfloat16,
                  progress=False)
    direct = load_opt(tiny_opt_dir("post_ln_proj"), jnp.bfloat16, progress=False)
    assert_bit_equal(load_opt(out, None).params, direct.params)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)  # tokenizer files travel with the checkpoint
    assert tok("Hello world").input_ids[0] == 2


def test_save_refuses_existing_target_unless_overwrite(tiny_opt_dir, tmp_path):
    a = load_opt(tiny_opt_dir("pre_ln"), jnp.float32, progress=False)
    b = load_opt(tiny_opt_dir("pre_ln"), jnp.bfloat16, progress=False)
    save(a, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="already exists.*overwrite"):
        save(b, tmp_path / "ckpt")
    save(b, tmp_path / "ckpt", overwrite=True)
    assert load_opt(tmp_path / "ckpt", None).dtype == jnp.bfloat16
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_interrupted_save_leaves_nothing(tiny_opt_dir, tmp_path, monkeypatch):
    model = load_opt(tiny_opt_dir("pre_ln"), jnp.float32, progress=False)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "copy_tokenizer_files", interrupted)  # after params are written
    with pytest.raises(KeyboardInterrupt):
        save(model, tmp_path / "ckpt")
    with pytest.raises(KeyboardInterrupt):
        save_hf(model, tmp_path / "hf")
    assert os.listdir(tmp_path) == []


def test_killed_save_is_not_mistaken_for_a_checkpoint(tiny_opt_dir, tmp_path):
    """A process killed mid-save leaves a hidden partial directory without the marker (here:
    a complete one with the marker removed); loading either tells the user to re-run."""
    out = save(load_opt(tiny_opt_dir("pre_ln"), jnp.float32, progress=False), tmp_path / "ckpt")
    (out / MARKER_FILE).unlink()
    with pytest.raises(CheckpointError, match="incomplete dejavu checkpoint.*interrupted"):
        load_opt(out)
    partial = tmp_path / ".ckpt.dejavu-partial-0123abcd"
    partial.mkdir()
    (partial / "config.json").write_text((out / "config.json").read_text())
    with pytest.raises(CheckpointError, match="incomplete dejavu checkpoint"):
        load_opt(partial)
    with pytest.raises(CheckpointError, match="bare orbax params directory; pass its parent"):
        load_opt(out / "params")


@pytest.mark.parametrize("max_shard_size", ["5GB", "10KB"])
@pytest.mark.parametrize("variant", ["post_ln_proj", "no_affine_1h", "no_bias_8h"])
def test_save_hf_loads_in_transformers(variant, max_shard_size, tiny_hf_model, tiny_opt_dir, tmp_path):
    from transformers import OPTForCausalLM

    model = load_opt(tiny_opt_dir(variant), jnp.float32, progress=False)
    out = save_hf(model, tmp_path / "hf", max_shard_size=max_shard_size)
    sharded = (out / "model.safetensors.index.json").is_file()
    assert sharded == (max_shard_size == "10KB")
    assert sharded != (out / "model.safetensors").is_file()
    for name in TOKENIZER:
        assert (out / name).is_file(), name
    reloaded = OPTForCausalLM.from_pretrained(out, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    original = tiny_hf_model(variant)
    for (name, p), (name2, q) in zip(original.state_dict().items(), reloaded.state_dict().items()):
        assert name == name2 and torch.equal(p, q), name
    tokens = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, original(tokens).logits)
    assert_bit_equal(load_opt(out, jnp.float32, progress=False).params, model.params)


def test_save_hf_bf16(tiny_hf_model, tiny_opt_dir, tmp_path):
    from transformers import OPTForCausalLM

    model = load_opt(tiny_opt_dir("pre_ln"), jnp.bfloat16, progress=False)
    out = save_hf(model, tmp_path / "hf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = OPTForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    expected = tiny_hf_model("pre_ln").state_dict()
    for name, p in reloaded.state_dict().items():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, expected[name].to(torch.bfloat16)), name
    assert_bit_equal(load_opt(out, None, progress=False).params, model.params)


SHARDED_LOAD = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from dejavu_jax.checkpoint import load_opt, save
    from dejavu_jax.model import forward_params

    hf_dir, out_dir = sys.argv[1:]
    mesh = Mesh(np.array(jax.devices()), ("tp",))
    SPECS = {"wqkv": P(None, "tp"), "bqkv": P(None, "tp"), "wo_t": P("tp"),
             "fc1": P("tp"), "b1": P("tp"), "fc2_t": P("tp")}
    def sharding_for(path):  # heads and neurons split over the two devices
        return NamedSharding(mesh, SPECS.get(path[-1], P()))
    tokens = jnp.asarray(np.arange(3, 19).reshape(2, 8), jnp.int32)
    ref_model = load_opt(hf_dir, jnp.float32, progress=False)
    ref = forward_params(ref_model.params, tokens, ref_model.config)
    model = load_opt(hf_dir, jnp.float32, sharding=sharding_for, progress=False)
    save(model, out_dir)
    for m in (model, load_opt(out_dir, jnp.float32, sharding=sharding_for)):
        fc1 = m.params["layers"][0]["mlp"]["fc1"]
        assert fc1.sharding.spec == P("tp") and len(fc1.addressable_shards) == 2
        assert fc1.addressable_shards[0].data.shape[0] == fc1.shape[0] // 2
        wqkv = m.params["layers"][1]["attn"]["wqkv"]
        assert wqkv.addressable_shards[0].data.shape[1] == wqkv.shape[1] // 2
        out = jax.jit(forward_params, static_argnums=2)(m.params, tokens, m.config)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
    print("OK")
""")


def test_load_straight_onto_a_two_device_sharding(tiny_opt_dir, tmp_path):
    """In a fresh process with two CPU devices: HF and orbax loads place heads / neurons split
    across the devices, and the sharded model computes the same logits."""
    result = subprocess.run([sys.executable, "-c", SHARDED_LOAD, str(tiny_opt_dir("pre_ln")),
                             str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
