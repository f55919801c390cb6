"""Export: the HF directory loads in transformers and in dj.load_opt with equal logits; the
transport split for the GPU trip round-trips bit for bit; the model card is written."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from dejavu_jax import weights
from dejavu_jax.training import tiny_model_config
from dejavu_jax.training.export import (cast_params, export_hf, params_from_state,
                                        read_transport, write_transport)
from dejavu_jax.training.step import init_train_params

CFG = tiny_model_config(num_attention_heads=2)


@pytest.fixture(scope="module")
def params():
    p = init_train_params(CFG, jax.random.key(3))
    # make biases and LayerNorms non-trivial so a mis-mapped tensor cannot hide
    return jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(a.size), a.shape), p)


def test_export_loads_in_hf_and_dejavu_with_equal_logits(params, opt_tokenizer_dir, tmp_path):
    import torch
    from transformers import AutoTokenizer, OPTForCausalLM

    import dejavu_jax as dj

    facts = {"steps": 12, "tokens_seen": 3072, "train_loss": 7.5, "heldout_loss": 7.9,
             "wikitext2_ppl": 1234.5, "commit": "abc"}
    out = export_hf(params, CFG, tmp_path / "m", opt_tokenizer_dir, facts)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "README.md",
            "tokenizer_config.json", "special_tokens_map.json"} <= names
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    assert "3,072" in card and "1234.50" in card and "Project Gutenberg" in card

    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ids = tok("It was a dark and stormy night; the rain fell in torrents.")["input_ids"]
    hf = OPTForCausalLM.from_pretrained(str(out), dtype=torch.float32, local_files_only=True,
                                        attn_implementation="eager").eval()
    with torch.no_grad():
        hf_logits = hf(torch.tensor([ids])).logits.numpy()
    model = dj.load_opt(out, dtype="float32", progress=False)
    ours = np.asarray(dj.forward(model, np.array([ids], np.int32)))
    np.testing.assert_allclose(ours, hf_logits, atol=1e-4, rtol=1e-4)
    # the bf16 export is the f32 params rounded once
    ref = cast_params(params)
    np.testing.assert_array_equal(np.asarray(model.params["layers"][1]["mlp"]["fc1"]),
                                  ref["layers"][1]["mlp"]["fc1"].astype(np.float32))


def test_sharded_export(params, opt_tokenizer_dir, tmp_path):
    import dejavu_jax as dj

    out = export_hf(params, CFG, tmp_path / "m", opt_tokenizer_dir, max_shard_size="1MB")
    assert (out / "model.safetensors.index.json").is_file()
    a = dj.load_opt(out, dtype="float32", progress=False)
    np.testing.assert_array_equal(np.asarray(a.params["embed_tokens"]),
                                  cast_params(params)["embed_tokens"].astype(np.float32))


def test_transport_round_trip(params, tmp_path):
    state = weights.hf_state_dict_from_params(cast_params(params), CFG)
    embed = state["model.decoder.embed_tokens.weight"]
    files = write_transport(state, tmp_path, max_bytes=embed.nbytes // 3)
    assert len(files) >= 3 and all(f.stat().st_size < embed.nbytes // 3 + 4096 for f in files)
    back = read_transport(tmp_path)
    assert back.keys() == state.keys()
    for k in state:
        assert back[k].dtype == state[k].dtype
        np.testing.assert_array_equal(back[k], state[k])
    p2 = params_from_state(back, CFG)
    np.testing.assert_array_equal(p2["layers"][0]["attn"]["wqkv"], cast_params(params)["layers"][0]["attn"]["wqkv"])
    files[1].unlink()
    with pytest.raises(Exception, match="transport files"):
        read_transport(tmp_path)
