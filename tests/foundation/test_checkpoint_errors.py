"""Bad checkpoints and arguments give a `DejavuError` that says what is wrong and what to do."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from dejavu_jax.checkpoint import MARKER_FILE, load_opt, parse_size, save
from dejavu_jax.errors import CheckpointError, ConfigError, DejavuError

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
    "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
    "num_key_value_heads": 4, "vocab_size": 320, "rms_norm_eps": 1e-6,
}


@pytest.fixture
def hf_copy(tiny_opt_dir, tmp_path):
    """A private copy of the tiny pre-LN single-safetensors directory, free to damage."""
    out = tmp_path / "opt"
    shutil.copytree(tiny_opt_dir("pre_ln", "safetensors"), out)
    return out


def rewrite_weights(directory, change) -> None:
    file = directory / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_errors_share_one_base_class():
    assert issubclass(CheckpointError, DejavuError) and issubclass(ConfigError, DejavuError)
    assert issubclass(DejavuError, ValueError)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist; pass a Hugging Face OPT directory"):
        load_opt(tmp_path / "nowhere")


def test_path_is_a_file(hf_copy):
    with pytest.raises(CheckpointError, match="is a file; pass the directory that holds config.json"):
        load_opt(hf_copy / "config.json")


def test_no_config_json(hf_copy):
    (hf_copy / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"no config.json in .*save_pretrained"):
        load_opt(hf_copy)


def test_config_that_is_not_opt(hf_copy):
    (hf_copy / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    with pytest.raises(ConfigError, match=r"model_type='llama', not an OPT model"):
        load_opt(hf_copy)


def test_config_that_is_not_json(hf_copy):
    (hf_copy / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_opt(hf_copy)


def test_missing_tensor_is_named(hf_copy):
    rewrite_weights(hf_copy, lambda t: t.pop("model.decoder.layers.1.fc2.weight"))
    with pytest.raises(CheckpointError, match=r"'decoder.layers.1.fc2.weight' is missing"):
        load_opt(hf_copy, progress=False)


def test_misshaped_tensor_is_named(hf_copy):
    def shrink(t):
        t["model.decoder.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 16), np.float32)

    rewrite_weights(hf_copy, shrink)
    with pytest.raises(CheckpointError,
                       match=r"'decoder.layers.0.self_attn.k_proj.weight' has shape \(32, 16\) "
                             r"but config.json implies \(32, 32\)"):
        load_opt(hf_copy, progress=False)


def test_weights_of_another_size(hf_copy):
    config = json.loads((hf_copy / "config.json").read_text())
    (hf_copy / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"'decoder.layers.2.* is missing.*3 layers"):
        load_opt(hf_copy, progress=False)


@pytest.mark.parametrize("dtype", [jnp.int8, "float64", np.int32, "fp8", object])
def test_unsupported_dtype(hf_copy, dtype):
    with pytest.raises(CheckpointError, match=r"unsupported dtype .*one of \['float32', 'bfloat16', "
                                              r"'float16'\]"):
        load_opt(hf_copy, dtype)


def test_no_weight_files(hf_copy):
    (hf_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weight files in .*model.safetensors.*pytorch_model.bin"):
        load_opt(hf_copy)


def test_shard_listed_in_index_but_absent(tiny_opt_dir, tmp_path):
    out = tmp_path / "sharded"
    shutil.copytree(tiny_opt_dir("pre_ln", "sharded"), out)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"not in .*{victim.name}.*copy the missing shards"):
        load_opt(out)


def test_torch_pickle_with_code_is_refused(hf_copy):
    (hf_copy / "model.safetensors").unlink()
    torch.save({"model.decoder.embed_tokens.weight": torch.zeros(2), "evil": shutil.rmtree},
               hf_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"weights_only=True.*re-save the model"):
        load_opt(hf_copy)


def test_unused_tensors_warn(hf_copy):
    rewrite_weights(hf_copy, lambda t: t.update({"model.decoder.extra.weight": np.zeros(3, np.float32)}))
    with pytest.warns(UserWarning, match=r"ignoring tensors .*decoder.extra.weight"):
        load_opt(hf_copy, jnp.float32, progress=False)


def test_bad_sharding_argument(hf_copy):
    with pytest.raises(CheckpointError, match="sharding must be a jax.sharding.Sharding"):
        load_opt(hf_copy, sharding="tp")


def test_orbax_checkpoint_for_another_config(hf_copy, tmp_path):
    out = save(load_opt(hf_copy, jnp.float32, progress=False), tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "ffn_dim": 128}))
    with pytest.raises(CheckpointError, match="could not restore .*written for another config"):
        load_opt(out)


def test_orbax_checkpoint_from_a_newer_format(hf_copy, tmp_path):
    out = save(load_opt(hf_copy, jnp.float32, progress=False), tmp_path / "ckpt")
    marker = json.loads((out / MARKER_FILE).read_text())
    (out / MARKER_FILE).write_text(json.dumps({**marker, "format_version": 99}))
    with pytest.raises(CheckpointError, match="version 99.*Upgrade dejavu-jax"):
        load_opt(out)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20
    assert parse_size(1234) == 1234 and parse_size("10kb") == 10_000
    with pytest.raises(CheckpointError, match="not a size; write e.g. 5GB"):
        parse_size("lots")


@pytest.mark.parametrize("file", ["model.safetensors", "pytorch_model.bin"])
def test_damaged_weight_file(hf_copy, file):
    (hf_copy / "model.safetensors").unlink()
    (hf_copy / file).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00truncated")
    with pytest.raises(CheckpointError, match=f"could not read .*{file}"):
        load_opt(hf_copy)
