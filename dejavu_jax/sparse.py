"""Contextual-sparse decoding: predictors pick each layer's heads and MLP neurons, and the
`pallas_kernels` ops read only those weights. The model code (`dejavu_jax.model`) stays
dense; this module is a functional transform of its per-layer step.

One decode step (T = 1) of layer l, B rows, ``x`` the residual entering the layer::

    sets(l)   = predictors of layer l on x_{l-1} (lookahead: independent of layer l-1's work,
                though on one GPU stream they still queue behind it; `predictor_stream`
                moves them to a second stream) or on layer l's own inputs (in-layer variant);
                at batch 1 with a threshold, both sets come from `pallas_kernels.predict_sets`
                where the dispatch table picks it: in a fused step its own kernel only scores
                (layer l-1's q + K/V launch computes the predictors' first GEMV,
                `fused_hidden`, and layer l's own launch scatters the MLP set, `fused_scatter`)
    attention = q of the selected heads (head_sparse_qkv), K/V per `kv_policy`,
                attention over the selected heads' cache, out-projection of those heads
    MLP       = sparse_mlp over the selected neurons (fc1 + ReLU + fc2 fused)
    boundary  = pre-LayerNorm models, where `fused_glue` says so: each residual add and the
                LayerNorm after it are one kernel (`pallas_kernels.layer_norm.add_layer_norm`,
                which also adds the sublayer's output bias to its f32 sum), and q + K/V (of
                every head, or of the selected ones) + the cache writes are one
                (`head_sparse_q_kv_update`)

Per layer k is static (`SparsityConfig.layer_budgets`), so shapes stay fixed under jit.
For B > 1, ``batch_mode="union"`` runs the union of the rows' sets (padded to a static cap,
the padding masked out), ``"per_row"`` runs the union too but masks each row to its own set.

KV policies for heads a token skips (`kv_policy`):
  * "all":      K/V projected for every head at every token; only Q, the attention and the
                out-projection are sparse. Exact caches, 1/3 of attention bytes stay dense.
  * "selected": K/V projected only for the selected heads; a head's cache slot for a token
                that skipped it stays empty and is masked out of that head's attention
                (the head attends over the tokens it was computed for, prompt included).
Prefill is dense: it is compute-bound over the prompt, runs once, and fills every head's cache.

The default is "all", chosen by the measurements: on the reference model, with its trained
predictors' calibrated sets, "all" loses 0.79% held-out perplexity and "selected" 7.4% decoding
from the first token (after a 128-token dense prompt 0.28% and 0.45%; at 75% of the heads 125%
and 175%; `benchmarks/results/sparse_quality.json`); at the OPT-13B shape on an H100 (MLP 10%, half
the heads, fused step) "selected" decodes 16% faster (3.86 vs 4.49 ms/token, 2.56x vs 2.20x
dense_decode; `sparse_decode.json`, runs of 0205614): the speed is not worth that loss by default.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dejavu_jax import model as M
from dejavu_jax.decode import check_sampling, generate_tokens, prepare_prompt
from dejavu_jax.predictors.modules import Predictors
from dejavu_jax.sparse_attention_layer import (COMBINE_IN_OUT_PROJECTION, _dense_attention,  # noqa: F401
                                               sparse_attention)
from dejavu_jax.streams import on_stream
from pallas_kernels.boundary_mlp import boundary_sparse_mlp
from pallas_kernels.layer_norm import add_layer_norm
from pallas_kernels.hosted_sets import hidden_gemv, scatter_sets, scores_job, stack_w1t
from pallas_kernels.predict_sets import TileSets, predict_sets
from pallas_kernels.sparse_mlp import sparse_mlp, sparse_mlp_masked
from dejavu_jax.sparse_config import SparsityConfig, check_predictors  # noqa: F401 - re-exported
from dejavu_jax.sparse_select import (MATVEC_MIN_RANK, SMALL_TOP_K, _select_kernel, decode_scores,  # noqa: F401
                                      matvec_scores, select, top_k)  # re-exported; `select` is patched here

F32 = jnp.float32


# ---- choosing the sets: `dejavu_jax.sparse_select` (decode_scores, select, ...) and layer_sets below

# ---- one layer, one token: `dejavu_jax.sparse_attention_layer` (sparse_attention, _dense_attention)

def layer_sets(pred: Predictors, layer: int, x: jax.Array, *, head_k: int, mlp_k: int, block: int,
               threshold: float | None, impl: str, scores_impl: str | None = None, hidden=None,
               scatter: bool = True):
    """Layer ``layer``'s head and MLP sets from ``x`` (both predictors' input, lookahead):
    (`select` of the head scores, `select` of the MLP scores). ``scores_impl`` (default
    ``impl``) is `decode_scores`'s. Batch 1 with a threshold, where `fused_sets` says so:
    the same sets from `pallas_kernels.predict_sets` (three kernels instead of ~19; two when
    ``hidden``, the predictors' first GEMV of x, was computed elsewhere: `fused_hidden`; one
    less with ``scatter=False``: the MLP set comes as a `TileSets`, scattered in the layer's
    q + K/V launch: `fused_scatter`)."""
    scores_impl = scores_impl or impl
    if threshold is not None and fused_sets(scores_impl, x.shape[0]):
        got = predict_sets(x, (pred.mlp_w1, pred.mlp_w2, pred.mlp_b2), (pred.head_w1, pred.head_w2, pred.head_b2),
                           threshold, layer=layer, mlp_k=mlp_k, head_k=head_k, impl="triton", hidden=hidden,
                           scatter=scatter)
        return (got[0], None, None), ((*got[1:], None) if scatter else got[1])
    heads = select(decode_scores(pred, layer, x, "head", scores_impl), head_k, 1)
    neurons = select(decode_scores(pred, layer, x, "mlp", scores_impl), mlp_k, block, threshold, impl)
    return heads, neurons


def _kernel_named(impl: str, op: str, batch: int) -> bool:
    """Whether ``op``'s Triton kernel runs: where the dispatch table picks it ("auto"), or for
    an explicit kernel impl ("triton", "mosaic"); never for "xla" / "reference"."""
    from pallas_kernels import dispatch

    if impl in ("xla", "reference"):
        return False
    return impl != "auto" or dispatch.backend_for(op, batch=batch) == "triton"


def fused_sets(impl: str, batch: int) -> bool:
    """Whether a batch-1 threshold's sets come from `pallas_kernels.predict_sets` (see
    `_kernel_named`)."""
    return batch == 1 and _kernel_named(impl, "predict_sets", 1)


def fused_hidden(impl: str, batch: int) -> bool:
    """Whether layer l+1's predictors' first GEMV (batch 1, lookahead, a threshold) runs in
    layer l's q + K/V launch (`head_sparse_q_kv_update(side=...)` over `stack_w1t`'s
    transposed copy of both w1, made once per decode call) instead of `predict_sets`' own
    ``hidden`` kernel: where both the fused sets and the fused boundaries run."""
    return fused_sets(impl, batch) and fused_glue(impl, batch)


def fused_scatter(impl: str, batch: int) -> bool:
    """Whether a layer's MLP set (batch 1, lookahead, a threshold) is scattered on extra programs
    of that layer's q + K/V launch (`head_sparse_q_kv_update(scatter=...)`) instead of in
    `predict_sets`' own scatter kernel: where both the fused sets and boundaries run."""
    return fused_sets(impl, batch) and fused_glue(impl, batch)


SCORES_IN_OUT_PROJECTION = False  # measured slower on an H100: see fused_scores
# layer l+1's scores on extra programs of layer l's attention launch (see fused_scores). On: H100,
# threshold 10% / half the heads, ms a token against their own kernel in the same job: 13B 4.16 vs
# 4.27 (K/V of every head), 3.62 vs 3.73 (selected); 30B 9.12 vs 9.22, 7.56 vs 7.66 (run of cd5dc23);
# 6.7B 2.59 vs 2.64, 1.3B 0.90 vs 0.93 (964bf76); on an H200 the same way (de86adc)
SCORES_IN_ATTENTION = True


def fused_scores(impl: str, batch: int) -> bool:
    """Whether layer l+1's scores (batch 1, lookahead, a threshold; with `fused_hidden`) run on
    extra programs of a launch of layer l: the attention's (`SCORES_IN_ATTENTION`,
    `head_sparse_decode_attention(scores=...)`: its few programs leave most SMs idle) or the
    out-projection's (`SCORES_IN_OUT_PROJECTION`, `head_sparse_out(scores=...)`), instead of
    in `predict_sets`' own scores kernel, where both the fused sets and boundaries run (the
    attention's where both switches are on). The attention's is the default: its launch then
    takes about what the scores kernel alone took, so the attention's own time is saved (13B:
    5.8 us a layer against 3.4 + 5.7). The out-projection's measured slower on an H100 than the
    scores kernel (K/V selected, 10% / half the heads: 13B 3.90 vs 3.86 ms/token, 30B 8.18 vs
    8.08; run of 0205614): the scores programs share its 8-warp launch and its tail."""
    return ((SCORES_IN_ATTENTION or SCORES_IN_OUT_PROJECTION) and fused_sets(impl, batch)
            and fused_glue(impl, batch))


MLP_SUM_COPIES = 0  # 0: off; G: the MLP's sum added in-kernel into G copies (see fused_mlp_sum)
OUT_SUM_IN_KERNEL = False  # measured no faster on an H200: see fused_out_sum
MOSAIC_MLP_BOUNDARY = False  # the boundary before the MLP as a Mosaic kernel: see mosaic_mlp_boundary
SUMS_IN_BOUNDARY = ()  # whose partials ("out", "mlp") the boundary kernels sum: off, see boundary_sums


def fused_mlp_sum(impl: str, batch: int) -> bool:
    """Whether a sparse layer's MLP (batch 1, fused boundaries) adds its f32 sum in-kernel into
    `MLP_SUM_COPIES` copies of a buffer (`sparse_mlp(acc=)`: f32 atomics on the Mosaic kernel,
    CTA g into copy g % G) that the next boundary kernel sums and zeroes (`add_layer_norm(
    recycle=True)`), instead of writing one partial a CTA that an XLA kernel sums. Off by
    default: the atomics made the 13B MLP kernel 16.4 -> 66 us with one copy, 31 us with 8 and
    28 us with 32 (H200, runs of 794f01a and f244e0d; 13B 3.70 -> 5.57 / 4.38 / 4.81 ms/token)."""
    return MLP_SUM_COPIES > 0 and batch == 1 and fused_glue(impl, batch)


def fused_out_sum(impl: str, batch: int) -> bool:
    """As `fused_mlp_sum` for the attention's out-projection (`head_sparse_out(acc=)`: f32
    atomics on the Triton kernel, into one buffer), with `OUT_SUM_IN_KERNEL`; not with the
    scores hosted in that launch (`fused_scores`). Off by default: no faster on an H200 (13B
    3.70 vs 3.70 ms/token with K/V of every head, 3.33 vs 3.29 with K/V selected; 30B 7.93 vs
    7.89 and 6.72 vs 6.68; run of f244e0d): the summing kernel goes (2.0 us a layer), but the
    out-projection takes 0.6 us more and the boundary kernel that reads and zeroes the buffer
    0.9 us more."""
    return OUT_SUM_IN_KERNEL and batch == 1 and fused_glue(impl, batch)


def boundary_sums(impl: str, batch: int) -> bool:
    """Whether a sparse layer's out-projection and MLP (batch 1, fused boundaries) hand their f32
    partials unsummed to the boundary kernel after them, which sums them over many programs
    and normalizes the row in its last one (`add_layer_norm(arrivals=)`): one kernel a boundary
    instead of an XLA reduction and the boundary kernel. For the sublayers named in
    `SUMS_IN_BOUNDARY` ("out", "mlp"); a sum added in-kernel (`fused_out_sum`, `fused_mlp_sum`)
    takes precedence. Off by default: no faster on an H100 (13B, K/V of every head, runs of
    68a3ff2 and dcd3770): after the MLP (264 partials) the kernel took 9.6 us (6.8 in 16-column
    blocks) against 2.0 (XLA's sum) + 3.1; after the out-projection (27) 5.6 (4.65 in 16-column
    blocks) against 5.1: its atomic and the last program's second pass over the row cost
    about what the launch it saves did (4.45 ms/token with XLA's sums, 4.52 with the
    out-projection's summed in the boundary, 4.51 with both in 16-column blocks)."""
    return bool(SUMS_IN_BOUNDARY) and batch == 1 and fused_glue(impl, batch)


def mosaic_mlp_boundary(impl: str, batch: int) -> bool:
    """Batch 1, fused boundaries: the residual add + LayerNorm before each sparse MLP runs as the
    Mosaic GPU kernel (`add_layer_norm(impl="mosaic")`) instead of the Triton one. With
    `pallas_kernels.layer_norm.PDL` and `pallas_kernels._mosaic_mlp.PDL` both kernels are
    programmatic dependent launches: the boundary lets the MLP launch at its start, and the MLP
    loads its first weight rows before it waits for the boundary's output. `MOSAIC_MLP_BOUNDARY`."""
    return MOSAIC_MLP_BOUNDARY and batch == 1 and fused_glue(impl, batch)


# The boundary before the MLP computed in the MLP's kernel (see boundary_in_mlp). On: H100,
# threshold 10% / half the heads, ms a token against its own kernel in the same job: 1.3B 0.92 vs
# 0.96, 6.7B 2.62 vs 2.68 (boundary_small.json), 13B 4.28 vs 4.34, 30B 9.51 vs 9.52 (boundary_in_mlp.json).
BOUNDARY_IN_MLP = True


def boundary_in_mlp(impl: str, batch: int) -> bool:
    """Batch 1, fused boundaries, the Mosaic MLP: the residual add + LayerNorm before each sparse
    MLP computed by every CTA of the MLP's kernel (`pallas_kernels.boundary_mlp`) instead of
    in a boundary kernel of its own. `BOUNDARY_IN_MLP`; not with the sums added in-kernel or
    summed by the boundary kernels."""
    from pallas_kernels import dispatch

    mosaic = impl == "mosaic" or (impl == "auto" and dispatch.backend_for("sparse_mlp", batch=batch) == "mosaic")
    return BOUNDARY_IN_MLP and mosaic and batch == 1 and fused_glue(impl, batch)


def _hidden_in_qkv(config, sparsity: SparsityConfig, pred: Predictors, batch: int) -> bool:
    """`fused_hidden` for this decode: lookahead predictors, a threshold, a pre-LayerNorm model."""
    return (pred.lookahead and sparsity.mlp_threshold is not None and config.do_layer_norm_before
            and not sparsity.predictor_stream and fused_hidden(sparsity.impl, batch))


def fused_glue(impl: str, batch: int) -> bool:
    """Whether a step's layer boundaries run as fused kernels: the residual add + LayerNorm
    (`pallas_kernels.layer_norm.add_layer_norm`, one kernel instead of three or four XLA
    ones) and q + the K/V of the kv_policy's heads into the cache (`head_sparse_q_kv_update`,
    one kernel instead of two, a scaling and two cache updates).
    Where the dispatch table picks add_layer_norm (see `_kernel_named`)."""
    return _kernel_named(impl, "add_layer_norm", batch)


def _residual_norm(x, delta, ln, eps, fused, impl, bias=None, acc=None, arrivals=None):
    """(x + delta, LayerNorm(x + delta), acc), delta + bias rounded to x's dtype first: one
    kernel when ``fused``, else XLA ops. ``ln`` None: no LayerNorm (h is None). ``acc`` (the
    buffer delta was summed into): returned zeroed for the next sum, by the kernel itself
    when fused (delta is then that buffer). ``arrivals`` (fused, delta f32 partials [S, B, d]):
    the kernel sums them (`add_layer_norm(arrivals=)`) and returns the counts zeroed in
    acc's place."""
    if arrivals is not None and ln is not None:
        return add_layer_norm(x, delta, ln["scale"], ln["bias"], eps, bias=bias, impl=impl, arrivals=arrivals)
    if fused and ln is not None:
        if acc is not None:
            return add_layer_norm(x, delta, ln["scale"], ln["bias"], eps, bias=bias, impl=impl, recycle=True)
        return (*add_layer_norm(x, delta, ln["scale"], ln["bias"], eps, bias=bias, impl=impl), None)
    if acc is not None:
        acc = jnp.zeros_like(acc)
    if delta.ndim == 3:  # copies of one sum (`MLP_SUM_COPIES`)
        delta = delta.sum(0)
    if bias is not None:
        delta = delta.astype(F32) + bias.astype(F32)
    x = x + delta.astype(x.dtype)
    return x, None if ln is None else M.layer_norm(ln, x, eps), acc


def _before(value, work):
    """(value, work) with every array of ``work`` computed before anything that reads the
    returned value (an optimization barrier over both)."""
    leaves, tree = jax.tree.flatten(work)
    arrays = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]  # not static fields
    value, held = jax.lax.optimization_barrier((value, [leaves[i] for i in arrays]))
    for i, leaf in zip(arrays, held):
        leaves[i] = leaf
    return value, jax.tree.unflatten(tree, leaves)


def _lookahead_sets(pred, layer, x, *, budgets, block, sparsity, hidden=None, scatter=True):
    """`layer_sets` for a sparse layer (None for a dense one), on the second stream when
    ``sparsity.predictor_stream``."""
    mlp_k, head_k = budgets
    if layer in sparsity.dense_layers:
        return None
    fn = functools.partial(layer_sets, head_k=head_k[layer], mlp_k=mlp_k[layer], block=block,
                           threshold=sparsity.mlp_threshold, impl=sparsity.impl, hidden=hidden, scatter=scatter)
    if not sparsity.predictor_stream or x.shape[0] > 1 or sparsity.mlp_threshold is not None:
        # B > 1 or a threshold: the compaction (cumsum) lowers to nested calls, which XLA cannot
        # run inside a streamed call (see dejavu_jax.streams); those sets stay on the main stream.
        return fn(pred, layer, x)
    # on the second stream the scores stay XLA einsums, as measured (`predictor_stream` docs)
    return on_stream(lambda p, x: fn(p, layer, x, scores_impl="xla"), 1)(pred, x)


def sparse_step(weights, tokens, positions, cache, kv_valid, slot, *, config, sparsity: SparsityConfig,
                budgets):
    """One sparse decode step (T = 1); signature of `decode.StepFn`.
    weights = (params, predictors[, w1t]): w1t, `stack_w1t` of the predictors, lets layer l's
    q + K/V kernel compute layer l+1's predictor hidden (`fused_hidden`). Returns (logits [B, V],
    cache, stats)."""
    params, pred, *w1t = weights
    mlp_k, head_k = budgets
    L, F, H = config.num_hidden_layers, config.ffn_dim, config.num_attention_heads
    block = sparsity.block or pred.block_size
    eps, impl, mode = config.layer_norm_eps, sparsity.impl, sparsity.batch_mode
    x = M.embed(params, tokens, positions)[:, 0]  # [B, d]
    B = x.shape[0]
    pre = config.do_layer_norm_before
    fused = pre and fused_glue(impl, B)  # the boundary kernels are pre-LayerNorm ones
    # layer l+1's predictor hidden from layer l's q + K/V launch (where it runs fused, below)
    w1t = w1t[0] if w1t and fused and _hidden_in_qkv(config, sparsity, pred, B) else None
    # and each sparse layer's MLP set scattered in that layer's q + K/V launch
    scatter = not (fused and pred.lookahead and sparsity.mlp_threshold is not None and fused_scatter(impl, B))
    # the f32 buffers the out-projection's and the MLP's sums are added into in-kernel, zeroed by
    # the boundary kernel that reads them (`fused_out_sum`, `fused_mlp_sum`); a memset a step
    mlp_sum, out_sum = fused and fused_mlp_sum(impl, B), fused and fused_out_sum(impl, B)
    acc = jnp.zeros((B, config.hidden_size), F32) if out_sum else None
    mlp_acc = jnp.zeros((MLP_SUM_COPIES, B, config.hidden_size), F32) if mlp_sum else None
    # or the partials summed by the boundary kernels, which count their programs in `arrivals`
    split = fused and boundary_sums(impl, B)
    split_out, split_mlp = split and "out" in SUMS_IN_BOUNDARY, split and "mlp" in SUMS_IN_BOUNDARY
    arrivals = jnp.zeros((B,), jnp.int32) if split else None
    new_cache, mlp_used, head_used = [], [], []
    ahead = functools.partial(_lookahead_sets, pred, budgets=budgets, block=block, sparsity=sparsity,
                              scatter=scatter)
    # Lookahead: layer l's sets come from layer l-1's attention input (layer 0: its own).
    sets = ahead(0, x) if pred.lookahead else None
    # pre-LayerNorm: each residual add and the LayerNorm after it are one `_residual_norm`,
    # so h (the next sublayer's input) is carried from the previous boundary
    h = M.layer_norm(params["layers"][0]["attn_ln"], x, eps) if pre else x
    for layer, (lp, layer_cache) in enumerate(zip(params["layers"], cache)):
        dense = layer in sparsity.dense_layers
        side = scores_of = out_into = mlp_into = None  # the buffers this layer's sums went into, if any
        if pred.lookahead and layer + 1 < L:  # independent of this layer: off its critical path
            if w1t is not None and not dense and layer + 1 not in sparsity.dense_layers:
                side = hidden_gemv(x, w1t, layer + 1, pred.rank, pred.head_rank)  # sets after attention
                if fused_scores(impl, B):  # and their scores in the attention's or out-projection's launch
                    scores_of = functools.partial(scores_job, (pred.mlp_w1, pred.mlp_w2, pred.mlp_b2),
                                                  (pred.head_w1, pred.head_w2, pred.head_b2), sparsity.mlp_threshold,
                                                  layer=layer + 1, mlp_k=mlp_k[layer + 1], head_k=head_k[layer + 1])
            else:
                next_sets = ahead(layer + 1, x)
        if dense:
            out, layer_cache = _dense_attention(lp["attn"], h, layer_cache, kv_valid, slot, config)
            head_used.append(jnp.float32(1.0))
        else:
            if pred.lookahead:
                heads, hcount, hmask = sets[0]
            else:
                heads, hcount, hmask = select(decode_scores(pred, layer, x, "head", impl), head_k[layer], 1)
            if B > 1 and mode == "union":
                hmask = (jnp.arange(heads.shape[0]) < hcount)[None].repeat(B, 0)
            pending = sets[1] if pred.lookahead and isinstance(sets[1], TileSets) else None
            out_into = acc if out_sum and (scores_of is None or SCORES_IN_ATTENTION) else None
            out, layer_cache, extra = sparse_attention(lp["attn"], h, layer_cache, kv_valid, slot, heads, hmask,
                                                       config=config, kv_policy=sparsity.kv_policy, impl=impl,
                                                       fused=fused, side=side, scatter=pending, scores_of=scores_of,
                                                       scores_in_attention=SCORES_IN_ATTENTION,
                                                       acc=out_into, unsummed=split_out and out_into is None)
            if pending is not None:
                sets = (sets[0], (*extra["sets"], None))
            if scores_of is not None:  # the MLP set is scattered in layer l+1's launch, or here
                top, tiles = extra["scores"]
                next_sets = ((top, None, None), tiles if not scatter else (*scatter_sets(tiles), None))
            elif side is not None:
                next_sets = ahead(layer + 1, x, hidden=extra["hidden"])
            head_used.append((hcount if hcount is not None else heads.shape[0]) / H)
        # the boundary before the MLP in the MLP's kernel (`boundary_in_mlp`): x and h come from it
        in_mlp = (pre and fused and not dense and out_into is None and not (split_out or mlp_sum or split_mlp)
                  and boundary_in_mlp(impl, B))
        if pre and not in_mlp:  # fused: a sparse layer's `out` is the f32 sum without the out-projection's bias
            bias = lp["attn"]["bo"] if fused and not dense else None
            counts = arrivals if split_out and not dense and out_into is None else None
            ln_impl = "mosaic" if not dense and mosaic_mlp_boundary(impl, B) else impl
            if ln_impl == "mosaic" and pred.lookahead and layer + 1 < L:
                # the next layer's sets before this boundary, so that no kernel of theirs falls
                # between it and the MLP, whose launch it lets start early
                out, next_sets = _before(out, next_sets)
            x, h, back = _residual_norm(x, out, lp["mlp_ln"], eps, fused, ln_impl, bias, out_into, counts)
            if out_into is not None:
                acc = back
            elif counts is not None:
                arrivals = back
        elif not pre:
            x = h = M.layer_norm(lp["attn_ln"], x + out, eps)
        if dense:
            y = M.mlp(lp["mlp"], h[:, None])[:, 0]
            mlp_used.append(jnp.float32(1.0))
        else:
            if pred.lookahead:
                idx, count, rmask = sets[1]
            else:
                idx, count, rmask = select(decode_scores(pred, layer, x, "mlp", impl), mlp_k[layer], block,
                                           sparsity.mlp_threshold, impl)
            mp = lp["mlp"]
            # fused: the f32 sum without b2, which the boundary kernel adds before its rounding
            b2, out_dtype = (None, F32) if fused else (mp["b2"], None)
            if in_mlp:
                ln = lp["mlp_ln"]
                x, y = boundary_sparse_mlp(x, out, ln["scale"], ln["bias"], mp["fc1"], mp["b1"], mp["fc2_t"], b2, idx,
                                           count=count, eps=eps, bias=lp["attn"]["bo"], impl=impl, checked=False,
                                           out_dtype=out_dtype)
            elif B > 1 and mode == "per_row":
                y = sparse_mlp_masked(h, mp["fc1"], mp["b1"], mp["fc2_t"], b2, idx, rmask, count=count,
                                      impl=impl, checked=False, out_dtype=out_dtype)
            else:
                mlp_into = mlp_acc if mlp_sum else None
                y = sparse_mlp(h, mp["fc1"], mp["b1"], mp["fc2_t"], b2, idx, count=count, impl=impl,
                               checked=False, out_dtype=out_dtype, acc=mlp_into,
                               unsummed=split_mlp and mlp_into is None and layer + 1 < L)
            mlp_used.append((count if count is not None else idx.shape[0]) / F)
        if pre:  # the last layer's LayerNorm is the LM head's
            bias = lp["mlp"]["b2"] if fused and not dense else None
            ln = params["layers"][layer + 1]["attn_ln"] if layer + 1 < L else None
            counts = arrivals if split_mlp and not dense and mlp_into is None and ln is not None else None
            x, h, back = _residual_norm(x, y, ln, eps, fused, impl, bias, mlp_into, counts)
            if mlp_into is not None:
                mlp_acc = back
            elif counts is not None:
                arrivals = back
        else:
            x = h = M.layer_norm(lp["mlp_ln"], x + y, eps)
        new_cache.append(layer_cache)
        if pred.lookahead and layer + 1 < L:
            sets = next_sets
    stats = {"mlp_density": jnp.stack(mlp_used).astype(F32), "head_density": jnp.stack(head_used).astype(F32)}
    return M.lm_head(params, x, config), new_cache, stats


def _prefill(weights, tokens, positions, cache, kv_valid, write_index, *, config):
    """Dense prefill; with the "selected" policy every head is valid on every prompt slot."""
    params = weights[0]
    kv = [{"k": c["k"], "v": c["v"]} for c in cache]
    logits, kv = M.forward_cached(params, tokens, positions, kv, kv_valid, write_index, config)
    if "head_valid" in cache[0]:
        T = tokens.shape[1]
        for c_new, c_old in zip(kv, cache):
            c_new["head_valid"] = c_old["head_valid"].at[:, :, :T].set(True)
    return logits, kv, None


def init_sparse_cache(config, batch, max_len, dtype, kv_policy):
    cache = M.init_cache(config, batch, max_len, dtype)
    if kv_policy == "selected":
        for c in cache:
            c["head_valid"] = jnp.zeros((batch, config.num_attention_heads, max_len), bool)
    return cache


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "temperature", "top_k", "top_p",
                                             "eos_token_id", "sparsity", "budgets"))
def _sparse_decode_jit(model, predictors, prompt, mask, key, *, max_new_tokens, temperature, top_k, top_p,
                       eos_token_id, sparsity, budgets):
    cfg = model.config
    B, T = prompt.shape
    cache = init_sparse_cache(cfg, B, T + max_new_tokens, model.dtype, sparsity.kv_policy)
    step = functools.partial(sparse_step, config=cfg, sparsity=sparsity, budgets=budgets)
    prefill = functools.partial(_prefill, config=cfg)
    weights = (model.params, predictors)
    if fused_glue(sparsity.impl, B) and _hidden_in_qkv(cfg, sparsity, predictors, B):
        weights += (stack_w1t(predictors.mlp_w1, predictors.head_w1),)  # once per call, not per token
    return generate_tokens(step, prefill, weights, prompt, mask, key, cache,
                           max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, eos_token_id=eos_token_id, pad_token_id=cfg.pad_token_id)


def sparse_decode(model: M.OPTModel, predictors: Predictors, prompt_tokens, max_new_tokens: int = 32, *,
                  sparsity: SparsityConfig | None = None, attention_mask=None, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                  eos_token_id: int | None = None, return_stats: bool = False):
    """`dense_decode`'s arguments and output, decoding each new token sparsely.

    Returns int32 [B, T + max_new_tokens]; with ``return_stats=True`` also a dict of per-step
    densities actually used ({"mlp_density", "head_density"}: [max_new_tokens - 1, L])."""
    sparsity = sparsity or SparsityConfig(lookahead=predictors.lookahead)
    check_predictors(model, predictors, sparsity)
    budgets = sparsity.layer_budgets(model.config, predictors)
    cfg = model.config
    check_sampling(cfg, temperature, top_k, top_p)
    tokens, mask, extra = prepare_prompt(cfg, prompt_tokens, attention_mask, max_new_tokens)
    predictors = predictors.astype(model.dtype)
    new, stats = _sparse_decode_jit(model, predictors, jnp.asarray(tokens), jnp.asarray(mask),
                                    jax.random.key(seed), max_new_tokens=int(max_new_tokens),
                                    temperature=float(temperature), top_k=top_k, top_p=top_p,
                                    eos_token_id=eos_token_id, sparsity=sparsity, budgets=budgets)
    out = jnp.concatenate([jnp.asarray(tokens[:, extra:]), new], axis=1)
    return (out, stats) if return_stats else out


def sparse_decode_fn(predictors: Predictors, sparsity: SparsityConfig | None = None):
    """A function with `dense_decode`'s signature that decodes sparsely (for `dj.generate`)."""
    def fn(model, prompt_tokens, max_new_tokens=32, **kwargs):
        return sparse_decode(model, predictors, prompt_tokens, max_new_tokens, sparsity=sparsity, **kwargs)
    return fn


