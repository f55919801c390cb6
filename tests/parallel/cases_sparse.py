"""Tensor-parallel sparse decode below full density: per-device top-k against an independent
single-device reference with the same selection, global top-k against single-device
sparse_decode, and the Pallas kernels per device (8 simulated devices)."""

from __future__ import annotations

import functools

from cases_common import CFG, NEW, TPS  # 8 devices, set before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import dejavu_jax as dj  # noqa: E402
from dejavu_jax import model as M  # noqa: E402
from dejavu_jax import parallel as par  # noqa: E402
from dejavu_jax.decode import generate_tokens, prepare_prompt  # noqa: E402
from dejavu_jax.parallel.tp_sparse import local_budgets  # noqa: E402
from dejavu_jax.predictors.modules import predict_head_scores, predict_mlp_scores  # noqa: E402
from dejavu_jax.sparse import SparsityConfig, sparse_decode  # noqa: E402


# ---- per-device top-k against an independent single-device reference -------------------------
def _grouped_member(scores, k_local, groups):
    """[B, n] -> bool [B, n]: each row's top k_local within each of ``groups`` contiguous blocks."""
    B, n = scores.shape
    s = scores.reshape(B, groups, n // groups)
    idx = jax.lax.top_k(s, k_local)[1]
    member = jnp.zeros(s.shape, bool).at[jnp.arange(B)[:, None, None], jnp.arange(groups)[None, :, None],
                                         idx].set(True)
    return member.reshape(B, n)


def _masked_dense_step(weights, tokens, positions, cache, kv_valid, slot, *, groups, mk, hk):
    """One decode step of the dense model with the outputs of unselected heads and neurons zeroed;
    the selection is per-device top-k emulated on one device (union over the batch)."""
    params, pred = weights
    x = M.embed(params, tokens, positions)[:, 0]
    hs, ms = predict_head_scores(pred, 0, x), predict_mlp_scores(pred, 0, x)
    allowed = kv_valid[:, None, :] & (jnp.arange(kv_valid.shape[1]) <= slot)[None, None]
    new_cache = []
    for layer, (lp, c) in enumerate(zip(params["layers"], cache)):
        if layer + 1 < CFG.num_hidden_layers:
            nhs, nms = predict_head_scores(pred, layer + 1, x), predict_mlp_scores(pred, layer + 1, x)
        keep_h = _grouped_member(hs, hk[layer], groups).any(0)
        h = M.layer_norm(lp["attn_ln"], x)[:, None]
        q, k, v = M.qkv_projection(lp["attn"], h, CFG.head_dim)
        kc = jax.lax.dynamic_update_slice(c["k"], k.transpose(0, 2, 1, 3), (0, 0, slot, 0))
        vc = jax.lax.dynamic_update_slice(c["v"], v.transpose(0, 2, 1, 3), (0, 0, slot, 0))
        o = M.attend(q, kc, vc, allowed) * keep_h[None, None, :, None]
        x = x + M.out_projection(lp["attn"], o)[:, 0]
        keep_n = _grouped_member(ms, mk[layer], groups).any(0)
        hm = M.layer_norm(lp["mlp_ln"], x)
        a = jax.nn.relu(hm @ lp["mlp"]["fc1"].T + lp["mlp"]["b1"]) * keep_n
        x = x + a @ lp["mlp"]["fc2_t"] + lp["mlp"]["b2"]
        new_cache.append({"k": kc, "v": vc})
        if layer + 1 < CFG.num_hidden_layers:
            hs, ms = nhs, nms
    return M.lm_head(params, x, CFG), new_cache, None


def _prefill(weights, tokens, positions, cache, kv_valid, write_index):
    logits, cache = M.forward_cached(weights[0], tokens, positions, cache, kv_valid, write_index, CFG)
    return logits, cache, None


def masked_reference(model, pred, tokens, mask, sp, groups):
    budgets = sp.layer_budgets(CFG, pred)
    mk, hk = local_budgets(budgets, CFG, groups, pred.block_size)
    toks, m, extra = prepare_prompt(CFG, tokens, mask, NEW)
    step = functools.partial(_masked_dense_step, groups=groups, mk=mk, hk=hk)

    @jax.jit
    def run(params, p, toks, m):
        cache = M.init_cache(CFG, toks.shape[0], toks.shape[1] + NEW, jnp.float32)
        return generate_tokens(step, _prefill, (params, p), toks, m, jax.random.key(0), cache, max_new_tokens=NEW,
                               temperature=0.0, top_k=None, top_p=None, eos_token_id=None,
                               pad_token_id=CFG.pad_token_id)[0]
    return np.concatenate([toks[:, extra:], np.asarray(run(model.params, pred, jnp.asarray(toks), jnp.asarray(m)))], 1)


@pytest.mark.parametrize("tp", TPS)
def test_per_device_topk_matches_masked_reference(model, pred, prompt, tp):
    tokens, mask = prompt
    sp = SparsityConfig(mlp_density=0.25, head_keep=0.5)
    rows = slice(0, 2) if tp == 4 else slice(0, 1)  # batch 2 (union of the rows' sets) once
    ref = masked_reference(model, pred, tokens[rows], mask[rows], sp, tp)
    out, stats = par.tp_sparse_decode(model, pred, tokens[rows], NEW, mesh=par.make_mesh(tp), sparsity=sp,
                                      attention_mask=mask[rows], return_stats=True)
    np.testing.assert_array_equal(np.asarray(out), ref)
    sel = np.asarray(stats["mlp_selected"])
    if rows.stop == 1:  # batch 1: exactly k / tp per device, perfectly balanced
        assert (sel == CFG.ffn_dim // 4 // tp).all()


@pytest.mark.parametrize("tp,kv_policy,batch_mode", [(2, "all", "union"), (8, "selected", "per_row")])
def test_global_topk_matches_sparse_decode(model, pred, prompt, tp, kv_policy, batch_mode):
    """Global selection runs the set single-device sparse_decode runs, split over the devices."""
    tokens, mask = prompt
    sp = SparsityConfig(mlp_density=0.25, head_keep=0.5, kv_policy=kv_policy, batch_mode=batch_mode)
    ref, ref_stats = sparse_decode(model, pred, tokens, NEW, attention_mask=mask, sparsity=sp, return_stats=True)
    out, stats = par.tp_sparse_decode(model, pred, tokens, NEW, mesh=par.make_mesh(tp), sparsity=sp,
                                      attention_mask=mask, selection="global", return_stats=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    for name in ("mlp_density", "head_density"):  # the union's size, as on one device
        np.testing.assert_allclose(np.asarray(stats[name]), np.asarray(ref_stats[name]), rtol=1e-6)
    if tp == 2:  # batch 1: the devices' counts add up to k, and the density used is k / F
        _, st = par.tp_sparse_decode(model, pred, tokens[:1], NEW, mesh=par.make_mesh(tp), sparsity=sp,
                                     selection="global", return_stats=True)
        assert (np.asarray(st["mlp_selected"]).sum(1) == CFG.ffn_dim // 4).all()
        np.testing.assert_allclose(np.asarray(st["mlp_density"]), 0.25)


def test_pallas_kernels_per_device(model, pred, prompt):
    """The Triton-lowered Pallas kernels (interpret mode on CPU) run per device under shard_map."""
    tokens, _ = prompt
    sp = SparsityConfig(mlp_density=1.0, head_keep=1.0, impl="triton")
    ref = np.asarray(dj.dense_decode(model, tokens[:1], 4))
    out = par.tp_sparse_decode(model, pred, tokens[:1], 4, mesh=par.make_mesh(2), sparsity=sp)
    np.testing.assert_array_equal(np.asarray(out), ref)
