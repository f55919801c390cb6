"""Train the predictors on collected activations: ``dj.train_predictors``.

All layers train at once: the per-layer LowRankScorer params are stacked on a leading layer
axis and the loss vmaps over it (layers never interact, and AdamW is elementwise, so this
is exactly L independent trainings). An epoch is one jit-compiled `lax.scan` over
minibatches with the data on the device; labels stay packed (bits) until a batch needs them.

* MLP: binary cross-entropy on "neuron active" (fc1 > 0), positives weighted 0.5 / p and
  negatives 0.5 / (1 - p), p = the layer's active fraction (the paper's class balancing).
* Heads: binary cross-entropy on "head among the top ``label_k`` by output norm"
  (label_k = round(head_label_frac * H)), balanced the same way.
* AdamW (lr 3e-3, cosine decay: on our small model it matched or beat the original code's
  constant 1e-3 in every layer, in half the epochs); after every epoch the held-out (validation) recall per layer decides early
  stopping and which epoch's weights each layer keeps: MLP, the recall of active neurons at
  ``eval_density``; heads, the top-label_k overlap.
* Then each layer's mlp_k / head_k is calibrated on the validation positions: the smallest
  k (mlp_k a multiple of ``block_size``) whose recall reaches the target (MLP: recall of
  active neurons, or of activation mass; heads: share of the summed head output norm, or
  recall of the true top-label_k heads).

Validation positions are the last ``val_fraction`` of the collection's train split (whole
windows, so no window is on both sides); the held-out split stays for `evaluate.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dejavu_jax.errors import InputError
from dejavu_jax.model import OPTModel
from dejavu_jax.predictors import metrics as MT
from dejavu_jax.predictors.instrument import top_k_mask
from dejavu_jax.predictors.modules import Predictors, config_fingerprint, from_stacked, init_stacked, low_rank_scores
from dejavu_jax.predictors.shards import ActivationSet

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Predictor training hyper-parameters (defaults follow the original code where it has one)."""

    rank: int = 128
    head_rank: int | None = None  # None: min(rank, H); a rank above H adds bytes, not power
    lookahead: bool = True
    batch_size: int = 1024
    max_epochs: int = 20
    patience: int = 3
    lr: float = 3e-3
    head_lr: float = 3e-3
    weight_decay: float = 0.01
    lr_schedule: str = "cosine"  # decays to 5% over max_epochs; or "constant" (the original code's 1e-3)
    mass_weight: float = 0.0  # > 0: positives also weighted by (activation / mean) ** mass_weight
    head_label_frac: float = 0.3
    eval_density: float = 0.1
    stop_recall: float = 0.999
    val_fraction: float = 0.1
    max_positions: int | None = None
    layer_group: int | None = None  # train this many layers at a time (None: all)
    recall_target: float = 0.99  # MLP calibration
    calibrate_on: str = "active"  # or "mass"
    head_calibrate_on: str = "mass"  # head_k reaches head_recall_target of: "mass" (share of the summed
    head_recall_target: float = 0.95  # head output norm) or "label" (the true top-label_k heads)
    block_size: int | None = None  # None: metrics.default_block_size(F)
    seed: int = 0


# ---- data ---------------------------------------------------------------------------------------
def input_layers(num_layers: int, lookahead: bool) -> tuple[list[int], str, str]:
    """(source layer of each layer's predictors, MLP input field, head input field)."""
    if lookahead:
        return [max(l - 1, 0) for l in range(num_layers)], "attn_in", "attn_in"
    return list(range(num_layers)), "mlp_in", "attn_in"


def load_layer_data(acts: ActivationSet, layers: list[int], lookahead: bool, limit: int | None = None,
                    start: int = 0) -> dict[str, np.ndarray]:
    """Host arrays for ``layers``, positions [start, limit): x_mlp, x_head [L', N, d] (the
    predictors' inputs), bits [L', N, F/8] uint8 (active fc1 neurons), head_norm [L', N, H] f32.
    (Magnitudes, the largest field, are loaded apart: ``acts.load("mlp_act", ...)``.)"""
    src, f_mlp, f_head = input_layers(acts.num_layers, lookahead)
    src = [src[l] for l in layers]
    out = {"x_mlp": acts.load(f_mlp, src if f_mlp == "attn_in" else layers, limit, start)}
    out["x_head"] = out["x_mlp"] if f_head == f_mlp else acts.load(f_head, layers, limit, start)
    out["bits"] = acts.load("mlp_active", layers, limit, start)
    out["head_norm"] = acts.load("head_norm", layers, limit, start)
    return out


def split_validation(n: int, val_fraction: float, positions_per_seq: int) -> int:
    """Index where validation starts: the last val_fraction of positions, on a window boundary."""
    n_val = max(positions_per_seq, int(round(val_fraction * n / positions_per_seq)) * positions_per_seq)
    if n - n_val < positions_per_seq:
        raise InputError(f"only {n} training positions: too few to hold out {val_fraction:.0%} for "
                         "validation. Collect more tokens.")
    return n - n_val


# ---- one stacked fit ------------------------------------------------------------------------------
def _labels(kind: str, src: jax.Array, n: int, label_k: int) -> jax.Array:
    """Float labels [L, B, n] from a batch of the label source."""
    if kind == "bits":
        return jnp.unpackbits(src, axis=-1, count=n).astype(F32)
    return top_k_mask(src, label_k).astype(F32)


def _scores(params, x):
    return jax.vmap(low_rank_scores)(params["w1"], params["w2"], params["b2"], x)


def _tx(lr: float, wd: float, total_steps: int, schedule: str):
    if schedule == "cosine":
        lr = optax.cosine_decay_schedule(lr, max(1, total_steps), alpha=0.05)
    return optax.adamw(lr, weight_decay=wd)


@functools.partial(jax.jit, static_argnames=("kind", "n", "label_k", "tx_args", "mass_weight"))
def _train_epoch(params, opt_state, x, src, mag, batches, w_pos, w_neg, mag_scale, *, kind, n, label_k, tx_args,
                 mass_weight):
    """One epoch. x: [L, N, d]; src: [L, N, ...] label source; mag: None or [L, N, n] magnitudes
    (positives weighted by (mag / mag_scale[l]) ** mass_weight); batches: [S, B] int32."""
    tx = _tx(*tx_args)

    def step(carry, idx):
        params, opt_state = carry
        xb = x[:, idx].astype(F32)
        y = _labels(kind, src[:, idx], n, label_k)
        pos = w_pos[:, None, None]
        if mag is not None and mass_weight:
            pos = pos * (mag[:, idx].astype(F32) / mag_scale[:, None, None]) ** mass_weight
        w = y * pos + (1 - y) * w_neg[:, None, None]

        def loss_fn(p):
            bce = optax.sigmoid_binary_cross_entropy(_scores(p, xb), y)
            return jnp.sum(jnp.mean(bce * w, axis=(1, 2)))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
    return params, opt_state, losses.mean() / x.shape[0]


@functools.partial(jax.jit, static_argnames=("kind", "n", "label_k", "k_eval"))
def _recall_sums(params, x, src, *, kind, n, label_k, k_eval):
    """Per layer, the sum over positions of recall at k_eval: [L]."""
    y = _labels(kind, src, n, label_k) > 0
    hit = top_k_mask(_scores(params, x.astype(F32)), k_eval) & y
    tot = y.sum(-1)
    return jnp.where(tot > 0, hit.sum(-1) / jnp.maximum(tot, 1), 1.0).sum(-1)


def _recall(params, x, src, chunk=2048, **kw) -> np.ndarray:
    total = sum(np.asarray(_recall_sums(params, x[:, i:i + chunk], src[:, i:i + chunk], **kw))
                for i in range(0, x.shape[1], chunk))
    return total / x.shape[1]


@jax.jit
def _popcount(bits):
    return jnp.sum(jax.lax.population_count(bits).astype(jnp.int32), axis=(1, 2))


def fit_stacked(key, x, src, x_val, src_val, *, kind: str, n: int, rank: int, label_k: int, k_eval: int,
                lr: float, s: TrainSettings, mag=None, desc: str = "", progress: bool = True) -> tuple[dict, dict]:
    """Train one predictor type for a stack of layers. x: [L, N, d] (device); src: labels
    source (kind "bits": packed active bits [L, N, F/8]; "topk": head norms [L, N, H]);
    mag: optional [L, N, n] magnitudes for ``s.mass_weight``.
    Returns (best params per layer, history {"loss", "val_recall": per epoch, "best_epoch"})."""
    L, N, d = x.shape
    if kind == "bits":
        p = np.asarray(_popcount(src)) / (N * n)
    else:
        p = np.full(L, label_k / n)
    p = np.clip(p, 1e-4, 1 - 1e-4)
    w_pos, w_neg = jnp.asarray(0.5 / p, F32), jnp.asarray(0.5 / (1 - p), F32)
    use_mag = mag is not None and s.mass_weight > 0
    mag_scale = jnp.ones((L,), F32)
    if use_mag:  # mean magnitude of the positives, per layer
        mag_scale = jnp.asarray([float(jnp.sum(m.astype(F32)) / max(1.0, p[i] * N * n)) for i, m in enumerate(mag)], F32)
    k_init, k_perm = jax.random.split(key)
    params = init_stacked(k_init, L, d, rank, n)
    batch = min(s.batch_size, N)
    steps = N // batch
    tx_args = (lr, s.weight_decay, steps * s.max_epochs, s.lr_schedule)
    opt_state = _tx(*tx_args).init(params)
    best = jax.tree.map(jnp.copy, params)
    best_rec = np.full(L, -1.0)
    since = np.zeros(L, int)
    hist = {"loss": [], "val_recall": [], "best_epoch": np.zeros(L, int)}
    eval_kw = dict(kind=kind, n=n, label_k=label_k, k_eval=k_eval)
    from tqdm.auto import tqdm

    bar = tqdm(range(s.max_epochs), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        perm = jax.random.permutation(jax.random.fold_in(k_perm, epoch), N)[:steps * batch].reshape(steps, batch)
        params, opt_state, loss = _train_epoch(params, opt_state, x, src, mag if use_mag else None, perm, w_pos,
                                               w_neg, mag_scale, kind=kind, n=n, label_k=label_k, tx_args=tx_args,
                                               mass_weight=s.mass_weight if use_mag else 0.0)
        rec = _recall(params, x_val, src_val, **eval_kw)
        improved = rec > best_rec + 1e-4
        best = jax.tree.map(lambda b, q: jnp.where(improved.reshape((L,) + (1,) * (q.ndim - 1)), q, b), best, params)
        best_rec = np.where(improved, rec, best_rec)
        hist["best_epoch"] = np.where(improved, epoch, hist["best_epoch"])
        since = np.where(improved, 0, since + 1)
        hist["loss"].append(float(loss))
        hist["val_recall"].append(rec.tolist())
        bar.set_postfix(loss=f"{float(loss):.4f}", recall=f"{rec.mean():.4f}")
        if (since >= s.patience).all() or (best_rec >= s.stop_recall).all():
            break
    hist["best_epoch"] = hist["best_epoch"].tolist()
    hist["epochs"] = len(hist["loss"])
    return best, hist


# ---- all layers -----------------------------------------------------------------------------------
_scores_jit = jax.jit(_scores)


def _scores_np(params, x, chunk=4096) -> np.ndarray:
    return np.concatenate([np.asarray(_scores_jit(params, jnp.asarray(x[:, i:i + chunk]).astype(F32)))
                           for i in range(0, x.shape[1], chunk)], axis=1)


def fit_predictors(model: OPTModel, activations, s: TrainSettings = TrainSettings(), *,
                   progress: bool = True) -> tuple[Predictors, dict]:
    """Train, select by validation recall, calibrate k. ``activations``: a collection
    directory or ActivationSet. Returns (Predictors, report: per-layer validation curves,
    training histories, settings, time)."""
    t0 = time.time()
    acts = activations if isinstance(activations, ActivationSet) else ActivationSet(activations, "train")
    cfg = model.config
    if acts.fingerprint != config_fingerprint(cfg):
        raise InputError(f"the activations in {acts.root} were collected from another model config "
                         f"(fingerprint {acts.fingerprint}, this model {config_fingerprint(cfg)}). "
                         "Collect activations with this model first.")
    if s.calibrate_on not in ("active", "mass") or s.head_calibrate_on not in ("mass", "label"):
        raise InputError(f"calibrate_on must be 'active' or 'mass' (got {s.calibrate_on!r}) and head_calibrate_on "
                         f"'mass' or 'label' (got {s.head_calibrate_on!r}).")
    L, F, H = cfg.num_hidden_layers, cfg.ffn_dim, cfg.num_attention_heads
    head_rank = s.head_rank or min(s.rank, H)
    block = s.block_size or MT.default_block_size(F)
    label_k = MT.label_k_for(H, s.head_label_frac)
    k_eval = max(1, int(round(s.eval_density * F)))
    n_all = min(acts.num_positions, s.max_positions or acts.num_positions)
    cut = split_validation(n_all, s.val_fraction, acts.meta["positions_per_seq"])
    group = s.layer_group or L
    key = jax.random.key(s.seed)
    mlp_parts, head_parts, layer_reports = [], [], []
    for g0 in range(0, L, group):
        layers = list(range(g0, min(L, g0 + group)))
        data = load_layer_data(acts, layers, s.lookahead, n_all)
        dev = {k: jnp.asarray(v[:, :cut]) for k, v in data.items()}
        val = {k: jnp.asarray(v[:, cut:]) for k, v in data.items()}
        mag = jnp.asarray(acts.load("mlp_act", layers, cut)) if s.mass_weight > 0 else None
        kg = jax.random.fold_in(key, g0)
        mlp, mlp_hist = fit_stacked(jax.random.fold_in(kg, 0), dev["x_mlp"], dev["bits"], val["x_mlp"],
                                    val["bits"], kind="bits", n=F, rank=s.rank, label_k=label_k, k_eval=k_eval,
                                    lr=s.lr, s=s, mag=mag, desc=f"mlp layers {layers[0]}-{layers[-1]}",
                                    progress=progress)
        del mag
        head, head_hist = fit_stacked(jax.random.fold_in(kg, 1), dev["x_head"], dev["head_norm"], val["x_head"],
                                      val["head_norm"], kind="topk", n=H, rank=head_rank, label_k=label_k,
                                      k_eval=label_k, lr=s.head_lr, s=s, desc=f"heads layers {layers[0]}-{layers[-1]}",
                                      progress=progress)
        del dev
        mlp_scores = _scores_np(mlp, data["x_mlp"][:, cut:])
        head_scores = _scores_np(head, data["x_head"][:, cut:])
        val_act = acts.load("mlp_act", layers, n_all, cut)
        for j, l in enumerate(layers):
            mc = MT.mlp_curves(mlp_scores[j], val_act[j])
            hc = MT.head_curves(head_scores[j], data["head_norm"][j, cut:], label_k)
            curve = mc["active_recall"] if s.calibrate_on == "active" else mc["mass_recall"]
            layer_reports.append({
                "layer": l, "mlp_k": MT.calibrate_k(curve, s.recall_target, block),
                "mlp_k_active_target": MT.calibrate_k(mc["active_recall"], s.recall_target, block),
                "mlp_k_mass_target": MT.calibrate_k(mc["mass_recall"], s.recall_target, block),
                "head_k": MT.calibrate_k(hc["mass_recall" if s.head_calibrate_on == "mass" else "label_recall"],
                                         s.head_recall_target),
                "mlp_curves": mc, "head_curves": hc,
                "mlp_epochs": mlp_hist["epochs"], "mlp_best_epoch": mlp_hist["best_epoch"][j],
                "head_epochs": head_hist["epochs"], "head_best_epoch": head_hist["best_epoch"][j],
                "mlp_val_recall_at_eval_density": mlp_hist["val_recall"][mlp_hist["best_epoch"][j]][j],
            })
        mlp_parts.append(mlp)
        head_parts.append(head)
        del data
    cat = lambda parts: jax.tree.map(lambda *a: jnp.concatenate(a), *parts)  # noqa: E731
    pred = from_stacked(cat(mlp_parts), cat(head_parts), cfg, mlp_k=[r["mlp_k"] for r in layer_reports],
                        head_k=[r["head_k"] for r in layer_reports], lookahead=s.lookahead, block_size=block)
    report = {"settings": dataclasses.asdict(s), "head_rank": head_rank, "label_k": label_k, "block_size": block,
              "train_positions": cut, "val_positions": n_all - cut, "layers": layer_reports,
              "seconds": time.time() - t0}
    return pred, report


def train_predictors(model: OPTModel, activations, *, rank: int = 128, lookahead: bool = True,
                     progress: bool = True, **settings) -> Predictors:
    """Train MLP and head predictors for every layer of ``model`` from a collection directory
    (`collect_activations`). ``settings``: any field of `TrainSettings` (recall_target,
    block_size, batch_size, max_epochs, ...). Returns Predictors with calibrated mlp_k/head_k."""
    unknown = set(settings) - {f.name for f in dataclasses.fields(TrainSettings)}
    if unknown:
        raise InputError(f"unknown training settings {sorted(unknown)}; see TrainSettings.")
    s = TrainSettings(rank=rank, lookahead=lookahead, **settings)
    return fit_predictors(model, activations, s, progress=progress)[0]


def needed_density(report: dict, target: float, on: str = "active") -> list[float]:
    """Per layer, the smallest density (k / F, no block rounding) whose validation recall reaches target."""
    key = "active_recall" if on == "active" else "mass_recall"
    return [MT.calibrate_k(r["mlp_curves"][key], target) / len(r["mlp_curves"][key]) for r in report["layers"]]


def mean_needed_density(report: dict, target: float, on: str = "active") -> float:
    """Mean of `needed_density` over layers 1.. (layer 0, whose lookahead input is the bare
    embedding, is the usual dense layer; it is included only in a one-layer model)."""
    dens = needed_density(report, target, on)
    return float(np.mean(dens[1:] or dens))


def choose_rank(results: list[dict], tolerance: float = 0.05) -> int:
    """The rank rule: the smallest rank whose mean needed density (at the recall target) is
    within ``tolerance`` (relative) of the best rank's. results: [{"rank", "mean_needed_density"}]."""
    best = min(r["mean_needed_density"] for r in results)
    ok = [r["rank"] for r in results if r["mean_needed_density"] <= best * (1 + tolerance) + 1e-9]
    return min(ok)


def rank_for_width(hidden_size: int, rank_per_width: float, multiple: int = 64, cap: float = 0.1) -> int:
    """The rank for another model width: rank_per_width * d rounded up to ``multiple``, at most
    cap * d (at cap = 0.1 the two predictors read about 5% of a layer's bytes)."""
    r = math.ceil(rank_per_width * hidden_size / multiple) * multiple
    return int(max(multiple, min(r, math.floor(cap * hidden_size / multiple) * multiple or multiple)))


# ---- CLI ---------------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    """Register ``dejavu train-predictors``."""
    from dejavu_jax.predictors import cli as _cli

    p = subparsers.add_parser("train-predictors", help="train Deja Vu predictors on collected activations",
                              description=__doc__.split("\n\n")[0])
    _cli.add_model_args(p)
    p.add_argument("--activations", required=True, help="collection directory (dejavu collect)")
    p.add_argument("--rank", type=int, default=None, help="predictor rank (default: sweep --ranks)")
    p.add_argument("--ranks", default="16,32,64,128,256", help="ranks to sweep when --rank is not given")
    p.add_argument("--same-layer", action="store_true", help="feed each layer its own input (no lookahead)")
    p.add_argument("--out", default=None, help="where to save (default: <model>/predictors)")
    p.add_argument("--recall-target", type=float, default=0.99)
    p.add_argument("--calibrate-on", default="active", choices=["active", "mass"])
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=1024)
    p.set_defaults(func=run_train_cli)


def run_train_cli(args):
    from dejavu_jax.predictors import cli as _cli
    from dejavu_jax.predictors.saving import save_predictors

    model = _cli.load_model(args.model, args.dtype)
    base = TrainSettings(lookahead=not args.same_layer, recall_target=args.recall_target,
                         calibrate_on=args.calibrate_on, block_size=args.block_size, max_epochs=args.epochs,
                         batch_size=args.batch_size)
    acts = ActivationSet(args.activations, "train")
    ranks = [args.rank] if args.rank else [int(r) for r in args.ranks.split(",")]
    fits, sweep = {}, []
    for r in ranks:
        fits[r] = fit_predictors(model, acts, dataclasses.replace(base, rank=r))
        sweep.append({"rank": r, "mean_needed_density": mean_needed_density(fits[r][1], base.recall_target,
                                                                             base.calibrate_on)})
        print(f"rank {r}: mean MLP density for recall {base.recall_target}: {sweep[-1]['mean_needed_density']:.3f}")
    rank = choose_rank(sweep)
    pred, report = fits[rank]
    if args.out is None and not model.source:
        raise InputError("pass --out: this model has no directory to save beside.")
    path = save_predictors(pred, args.out or f"{model.source}/predictors", model.config,
                           summary={"rank": rank, "sweep": sweep, "mlp_k": list(pred.mlp_k)})
    print(f"rank {rank}; mlp_k {list(pred.mlp_k)}; head_k {list(pred.head_k)}; saved to {path}")
    return pred
