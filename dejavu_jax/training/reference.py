"""The reference-model pipeline: tokenize -> train -> export -> evaluate -> sparsity facts.

One command does the whole run on the GPU machine within a wall-clock deadline, writing
results as it goes (so a late stage that runs out of time still leaves the earlier ones):

    python scripts/train_reference_model.py --corpus .carry/corpus --tokenizer .carry/tokenizer \\
        --deadline-s 560 --out $OUT --transport --hf

writes into ``--out``: reference_model.json (figures; sparsity facts under "sparsity"),
reference_model_loss.png, reference_model_train_log.jsonl, sparsity_facts.png, and with ``--transport`` the
weights split for the trip back (`dejavu_jax.training.export.write_transport`). The full HF
directory goes to ``--model-dir``. Back on the development machine,

    python scripts/train_reference_model.py assemble --from DIR --model-dir models/opt-gutenberg-6l \
        --results benchmarks/results

rebuilds the HF directory (and its model card) from those files, checking the weights'
sha256 against the figures file, and copies the figures (+ sparsity_facts.json) to --results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except Exception:
        return "unknown"


def state_digest(state: dict[str, np.ndarray]) -> str:
    """sha256 over the HF state dict (names, shapes, dtypes, bytes), order-independent."""
    h = hashlib.sha256()
    for name in sorted(state):
        a = np.ascontiguousarray(state[name])
        h.update(f"{name}:{a.shape}:{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def build_configs(args):
    from dejavu_jax.training.config import TrainConfig, reference_model_config, tiny_model_config

    base = tiny_model_config if args.shape == "tiny" else reference_model_config
    changes = {k: v for k, v in dict(hidden_size=args.d_model, num_hidden_layers=args.layers,
                                     num_attention_heads=args.heads,
                                     max_position_embeddings=args.positions).items() if v}
    if args.d_model:
        changes["ffn_dim"] = 4 * args.d_model
    model_cfg = base(**changes)
    tc = TrainConfig() if args.shape != "tiny" else TrainConfig(
        seq_len=64, batch_size=8, warmup_steps=10, log_every=10, eval_every=20,
        checkpoint_every=40, eval_sequences=8, loss_chunk=16, peak_lr=3e-3)
    tc = tc.replace(**{k: v for k, v in dict(
        seq_len=args.seq_len, batch_size=args.batch_size, peak_lr=args.lr,
        warmup_steps=args.warmup, total_steps=args.total_steps, seed=args.seed).items()
        if v is not None})
    return model_cfg, tc


def run(args, t0: float | None = None) -> dict:
    """The pipeline (see module docstring). ``t0``: `time.perf_counter()` at process start,
    from which ``--deadline-s`` counts."""
    import jax

    from dejavu_jax.data import tokenize_corpus
    from dejavu_jax.eval.sparsity import plot_sparsity, sparsity_facts
    from dejavu_jax.eval.suite import evaluate
    from dejavu_jax.training.batches import eval_batch
    from dejavu_jax.training.config import REFERENCE_NAME
    from dejavu_jax.training.export import cast_params, export_hf, write_transport
    from dejavu_jax.training.loop import train
    from dejavu_jax.training.plot import plot_loss_curve
    from dejavu_jax import weights

    t0 = time.perf_counter() if t0 is None else t0
    deadline = t0 + args.deadline_s if args.deadline_s else None
    left = (lambda: deadline - time.perf_counter()) if deadline else (lambda: float("inf"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg, tc = build_configs(args)
    name = args.name or (REFERENCE_NAME if args.shape == "reference" else f"opt-{args.shape}-test")
    model_dir = Path(args.model_dir or Path(args.run_dir) / "export" / name)
    devices = jax.devices()
    facts: dict = {
        "name": name, "params": model_cfg.num_params(), "d_model": model_cfg.hidden_size,
        "n_layers": model_cfg.num_hidden_layers, "n_heads": model_cfg.num_attention_heads,
        "d_ff": model_cfg.ffn_dim, "max_positions": model_cfg.max_position_embeddings,
        "vocab_size": model_cfg.vocab_size, "weights_mb": 2 * model_cfg.num_params() / 1e6,
        "device": devices[0].device_kind, "n_devices": len(devices), "platform": devices[0].platform,
        "jax_version": jax.__version__, "commit": args.commit or _git_commit(),
        **{k: v for k, v in tc.to_dict().items() if k not in ("total_steps",)},
        "timings_s": {},
    }
    json_path = out / "reference_model.json"

    def stage_done(stage: str, t: float) -> None:
        facts["timings_s"][stage] = round(time.perf_counter() - t, 2)
        _write_json(json_path, facts)

    t = time.perf_counter()
    cache = tokenize_corpus(args.corpus, args.tokenizer, args.cache)
    facts.update(train_tokens_available=cache.meta["train_tokens"], train_books=cache.meta["train_books"],
                 heldout_books=cache.meta["heldout_books"])
    stage_done("tokenize", t)

    t = time.perf_counter()
    result = train(model_cfg, tc, cache.train, cache.heldout, args.run_dir,
                   deadline=(deadline - args.reserve_s) if deadline else None,
                   resume=not args.fresh, progress=not args.no_progress)
    facts.update(steps=result.steps, total_steps=result.total_steps, finished=result.finished,
                 tokens_seen=result.tokens_seen, epochs=result.tokens_seen / cache.meta["train_tokens"],
                 train_loss=result.final_train_loss(), heldout_loss=result.final_heldout_loss(),
                 train_seconds=round(result.seconds, 1))
    this_call = [r for r in result.history if "loss" in r]
    if len(this_call) > 50:  # throughput over the last logged steps of this call
        a, b = this_call[-50], this_call[-1]
        if b["time"] > a["time"]:
            facts["tokens_per_s"] = round((b["tokens"] - a["tokens"]) / (b["time"] - a["time"]))
    stage_done("train", t)

    t = time.perf_counter()
    export_hf(result.params, model_cfg, model_dir, args.tokenizer, facts)
    state = weights.hf_state_dict_from_params(cast_params(result.params), model_cfg)
    facts["weights_sha256"] = state_digest(state)
    facts["model_dir"] = str(model_dir)
    if args.transport:
        facts["transport_files"] = [p.name for p in write_transport(state, out)]
    del state
    plot_loss_curve(result.history, out / "reference_model_loss.png",
                    title=f"{name}: {facts['params'] / 1e6:.1f}M params, {facts['device']}")
    (out / "reference_model_train_log.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in result.history))
    stage_done("export", t)
    del result

    if left() > 20:
        t = time.perf_counter()
        facts.update(evaluate(model_dir, wikitext=args.wikitext, corpus_dir=args.corpus,
                              heldout_max_tokens=args.heldout_max_tokens, context=args.eval_context,
                              stride=args.eval_stride, hf=False, train_counts=cache.train_counts,
                              wikitext_max_tokens=args.wikitext_max_tokens,
                              batch_size=args.eval_batch_size, progress=not args.no_progress))
        stage_done("eval", t)
    if args.hf and left() > 20:
        t = time.perf_counter()
        hf = evaluate(model_dir, wikitext=args.wikitext, corpus_dir=args.corpus,
                      heldout_max_tokens=args.heldout_max_tokens, context=args.eval_context,
                      stride=args.eval_stride, hf=True, ours=False, batch_size=args.eval_batch_size,
                      wikitext_max_tokens=args.wikitext_max_tokens,
                      progress=not args.no_progress)
        facts.update({k: v for k, v in hf.items() if k.startswith("hf_")})
        for text in ("wikitext2", "heldout"):
            if f"hf_{text}_ppl" in facts and f"{text}_ppl" in facts:
                facts[f"{text}_hf_rel_diff"] = abs(facts[f"hf_{text}_ppl"] / facts[f"{text}_ppl"] - 1)
        stage_done("eval_hf", t)
    if left() > 10:
        t = time.perf_counter()
        from dejavu_jax.checkpoint import load_opt

        model = load_opt(model_dir, dtype="bfloat16", progress=False)
        windows = eval_batch(cache.heldout, args.sparsity_windows, model_cfg.max_position_embeddings - 1)
        sp = sparsity_facts(model, windows, batch_size=args.eval_batch_size)
        sp.update(model=name, dtype="bfloat16", text="held-out books")
        facts["sparsity"] = sp
        plot_sparsity(sp, out / "sparsity_facts.png", title=f"{name} (bf16), {sp['tokens']:,} held-out tokens")
        facts["relu_zero_frac_per_layer"] = sp["relu_zero_frac_per_layer"]
        facts["mlp_top10pct_share_per_layer"] = [l["topk_share"]["0.1"] for l in sp["layers"]]
        stage_done("sparsity", t)
    facts["total_seconds"] = round(time.perf_counter() - t0, 1)
    from dejavu_jax.training.export import write_model_card

    write_model_card(model_dir, model_cfg, facts)
    _write_json(json_path, facts)
    print(json.dumps({k: v for k, v in facts.items() if not isinstance(v, (dict, list))}, indent=1))
    return facts


def assemble(args) -> Path:
    """Rebuild the HF directory from transport files + reference_model.json (see module doc)."""
    from dejavu_jax.config import OPTConfig
    from dejavu_jax.training.export import export_hf, params_from_state, read_transport

    src = Path(args.src)
    facts = json.loads((src / "reference_model.json").read_text())
    state = read_transport(src)
    digest = state_digest(state)
    if facts.get("weights_sha256") not in (None, digest):
        raise SystemExit(f"transport files in {src} do not match reference_model.json "
                         f"(sha256 {digest} != {facts['weights_sha256']}).")
    cfg = OPTConfig(vocab_size=facts["vocab_size"], hidden_size=facts["d_model"],
                    num_hidden_layers=facts["n_layers"], ffn_dim=facts["d_ff"],
                    num_attention_heads=facts["n_heads"], max_position_embeddings=facts["max_positions"])
    params = params_from_state(state, cfg)
    out = export_hf(params, cfg, args.model_dir, args.tokenizer, facts)
    facts["model_dir"] = str(Path(args.model_dir))
    print(f"wrote {out} (weights sha256 {digest})")
    if args.results:
        res = Path(args.results)
        res.mkdir(parents=True, exist_ok=True)
        _write_json(res / "reference_model.json", facts)
        if "sparsity" in facts:
            _write_json(res / "sparsity_facts.json", {**facts["sparsity"], "commit": facts.get("commit"),
                                                     "device": facts.get("device")})
        for f in ("reference_model_loss.png", "sparsity_facts.png"):
            if (src / f).is_file():
                shutil.copyfile(src / f, res / f)
    return out


def build_parser() -> argparse.ArgumentParser:
    from dejavu_jax.training.config import REFERENCE_NAME

    p = argparse.ArgumentParser(prog="train_reference_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="train", choices=["train", "assemble"])
    p.add_argument("--corpus", default=str(SHARED_DATA / "corpus"), help="dir with train-*.txt.xz, heldout.txt.xz")
    p.add_argument("--tokenizer", default=str(SHARED_DATA / "tokenizer" / "opt"), help="OPT vocab.json + merges.txt")
    p.add_argument("--wikitext", default=None, help="raw WikiText-2 test (default: data/wikitext2/wiki.test.raw)")
    p.add_argument("--cache", default=str(REPO_ROOT / ".cache" / "tokens"), help="token cache dir")
    p.add_argument("--run-dir", default=str(REPO_ROOT / "runs" / "reference"), help="checkpoints + log")
    p.add_argument("--model-dir", default=None, help="exported HF dir (default: RUN_DIR/export/NAME)")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"), help="figures, plots")
    p.add_argument("--name", default=None, help=f"model name (default: {REFERENCE_NAME})")
    p.add_argument("--shape", choices=["reference", "tiny"], default="reference")
    p.add_argument("--d-model", type=int), p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int), p.add_argument("--positions", type=int)
    p.add_argument("--seq-len", type=int), p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float), p.add_argument("--warmup", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--total-steps", type=int, help="schedule length (default: from the deadline)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="wall clock for the whole command, from process start")
    p.add_argument("--reserve-s", type=float, default=100.0,
                   help="seconds of the deadline kept for export and evaluation")
    p.add_argument("--fresh", action="store_true", help="do not resume from RUN_DIR's checkpoint")
    p.add_argument("--transport", action="store_true", help="write the weights into OUT in <=15 MB files")
    p.add_argument("--hf", action="store_true", help="also evaluate with transformers (torch)")
    p.add_argument("--eval-context", type=int), p.add_argument("--eval-stride", type=int)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--heldout-max-tokens", type=int, default=None)
    p.add_argument("--wikitext-max-tokens", type=int, default=None)
    p.add_argument("--sparsity-windows", type=int, default=64)
    p.add_argument("--commit", default=None, help="code commit to record (default: git HEAD)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--from", dest="src", help="assemble: dir with transport files + reference_model.json")
    p.add_argument("--results", default=None, help="assemble: also copy figures here")
    return p


def main(argv=None, t0: float | None = None) -> int:
    from dejavu_jax.errors import DejavuError

    args = build_parser().parse_args(argv)
    try:
        if args.mode == "assemble":
            if not args.src or not args.model_dir:
                raise DejavuError("assemble needs --from DIR and --model-dir DIR.")
            assemble(args)
        else:
            run(args, t0)
    except DejavuError as e:
        print(f"train_reference_model: error: {e}", file=sys.stderr)
        return 2
    return 0
