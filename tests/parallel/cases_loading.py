"""Loading onto a tp mesh: every leaf goes straight to its shards (Hugging Face and orbax
directories), no device ever holds a full copy of a split leaf, and random weights can be
drawn in place with the same values as on one device."""

from __future__ import annotations

import gc

from cases_common import CFG  # 8 devices, set before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

import dejavu_jax as dj  # noqa: E402
from dejavu_jax import model as M  # noqa: E402
from dejavu_jax import parallel as par  # noqa: E402
from dejavu_jax.errors import CheckpointError  # noqa: E402

SPLIT = {"wqkv": (3, 1, 8, 64), "bqkv": (3, 1, 8), "wo_t": (1, 8, 64), "fc1": (32, 64), "b1": (32,),
         "fc2_t": (32, 64), "embed_tokens": (16, 64)}  # one device's shard at tp = 8


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The same random model as a HF directory (several safetensors shards) and an orbax
    checkpoint; the arrays themselves are dropped, so only loads hold device memory later."""
    root = tmp_path_factory.mktemp("tp_ckpt")
    model = M.random_model(CFG, jnp.float32, std=0.3, seed=3)
    hf = dj.save_hf(model, root / "hf", max_shard_size="40KB")
    orbax = dj.save(model, root / "orbax")
    host = jax.tree.map(np.array, model.params)  # copies: a view would keep the device buffer alive
    del model
    gc.collect()
    return hf, orbax, host


def _check_placed(model, mesh, host):
    flat = jax.tree_util.tree_flatten_with_path(model.params)[0]
    want = jax.tree.leaves(par.param_shardings(CFG, mesh))
    for (path, leaf), sharding in zip(flat, want):
        name = jax.tree_util.keystr(path).split("'")[-2]
        assert leaf.sharding == sharding, name
        shards = leaf.addressable_shards
        assert len(shards) == 8
        assert all(s.data.shape == SPLIT.get(name, leaf.shape) for s in shards), name
    for got, ref in zip(jax.tree.leaves(model.params), jax.tree.leaves(host)):
        np.testing.assert_array_equal(np.asarray(got), ref)


def _no_full_copy_on_one_device():
    """No live single-device array has the global shape of a split leaf."""
    full = {(3, 8, 8, 64), (8, 8, 64), (256, 64), (128, 64)}
    for a in jax.live_arrays():
        if len(a.sharding.device_set) == 1:
            assert a.shape not in full, f"a full {a.shape} array sits on {a.sharding}"


@pytest.mark.parametrize("fmt", ["hf", "orbax"])
def test_load_onto_mesh(saved, fmt, monkeypatch):
    hf, orbax, host = saved
    mesh = par.make_mesh(8)
    placed = []
    real_put = jax.device_put

    def spy(x, device=None, *args, **kwargs):
        placed.append(device)
        return real_put(x, device, *args, **kwargs)
    monkeypatch.setattr(jax, "device_put", spy)
    model = dj.load_opt(hf if fmt == "hf" else orbax, jnp.float32, mesh=mesh, progress=False)
    monkeypatch.undo()
    if fmt == "hf":  # every leaf went from host memory straight to its mesh sharding
        assert len(placed) == len(jax.tree.leaves(model.params))
        assert all(isinstance(s, NamedSharding) and s.mesh == mesh for s in placed)
    _no_full_copy_on_one_device()
    _check_placed(model, mesh, host)


def test_loaded_model_decodes_like_one_device(saved):
    hf, _, _ = saved
    tokens = np.array([[2, 17, 40, 99, 5]])
    ref = np.asarray(dj.dense_decode(dj.load_opt(hf, jnp.float32, progress=False), tokens, 6))
    mesh = par.make_mesh(8)
    model = dj.load_opt(hf, jnp.float32, mesh=mesh, progress=False)
    np.testing.assert_array_equal(np.asarray(dj.tp_dense_decode(model, tokens, 6, mesh=mesh)), ref)


def test_random_sharded_model_equals_random_model():
    mesh = par.make_mesh(4)
    sharded = par.random_sharded_model(CFG, mesh, jnp.bfloat16, seed=5)
    ref = M.random_model(CFG, jnp.bfloat16, seed=5)
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(ref.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sharded.params["layers"][1]["mlp"]["fc1"].addressable_shards[0].data.shape == (64, 64)


def test_sharding_and_mesh_together_is_an_error(saved):
    with pytest.raises(CheckpointError, match="not both"):
        dj.load_opt(saved[0], mesh=par.make_mesh(2), sharding=jax.devices()[0])


# ---- the memory plan (scripts/plan_opt175b.py) ----------------------------------------------------
def test_exact_plan_of_opt175b_on_4_devices():
    from dejavu_jax.config import preset
    from dejavu_jax.parallel import plan as PL

    cfg = preset("opt-175b")
    ex = PL.exact_plan(cfg, par.make_mesh(4), [1, 8], 2048, 1216, 96, jnp.bfloat16)
    kv1 = 2 * 96 * 2048 * 12288 * 2 / 4 / 2**30
    assert np.isclose(ex["kv_cache_batch1_gib"], kv1) and np.isclose(ex["kv_cache_batch8_gib"], 8 * kv1)
    replicated = (2050 * 12288 + 96 * 6 * 12288 + 2 * 12288) * 2 / 2**30  # positions, LNs, bo, b2
    assert np.isclose(ex["params_gib"], (ex["params_total_gib"] - replicated) / 4 + replicated, rtol=1e-6)


def test_compiled_step_arguments_match_the_shardings():
    from dejavu_jax.config import preset
    from dejavu_jax.parallel import plan as PL
    from dejavu_jax.sparse import SparsityConfig

    cfg = PL.reduced_config(preset("opt-175b"), 512, 1).replace(vocab_size=512)
    sp = SparsityConfig(mlp_density=0.1, head_keep=0.5)
    for path in ("sparse", "prefill"):
        rec = PL.compiled_step(cfg, par.make_mesh(4), 2, 128, path, 64, 4, jnp.bfloat16, sp, prompt=16)
        assert np.isclose(rec["argument_gib"], rec["analytic_argument_gib"], rtol=0.02), rec
        assert rec["temp_gib"] > 0 and rec["alias_gib"] > 0  # the cache is donated


def test_extrapolate_recovers_a_linear_law():
    from dejavu_jax.parallel.plan import extrapolate

    law = lambda d, L: 1.0 + 0.5 * d + L * (2.0 + 0.25 * d * d)  # noqa: E731
    pts = {(d, L): law(d, L) for d in (1, 2, 3) for L in (2, 4)}
    assert np.isclose(extrapolate(pts, 10, 96)["temp_gib"], law(10, 96))
