"""The training loop: batches, steps, logging, held-out evaluation, checkpoints, a time budget.

`train` resumes from the latest checkpoint in ``run_dir`` when there is one (same batches,
same schedule: the result equals an uninterrupted run's). With ``total_steps`` unset in the
`TrainConfig`, the schedule's length is chosen from the time budget after timing the first
steps, and stored in the checkpoint, so a resumed run keeps it. Each log line also goes to
``run_dir/train_log.jsonl`` (one JSON record per line).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dejavu_jax.config import OPTConfig
from dejavu_jax.errors import DejavuError
from dejavu_jax.training.batches import eval_batch, train_batch
from dejavu_jax.training.checkpoints import TrainCheckpoints
from dejavu_jax.training.config import TrainConfig
from dejavu_jax.training.step import (abstract_state, data_mesh, init_state, learning_rate,
                                      make_eval_step, make_train_step)

CALIBRATION_STEPS = (5, 25)  # steps timed to choose total_steps from a time budget
# Settings that must match for a resume to continue the same run.
_RESUME_KEYS = ("seq_len", "batch_size", "seed", "peak_lr", "warmup_steps", "min_lr_ratio",
                "weight_decay", "b1", "b2", "grad_clip", "compute_dtype")


@dataclasses.dataclass
class TrainResult:
    params: dict  # f32, replicated
    history: list[dict]  # train records {"step", "loss", ...} and eval records {"heldout_loss"}
    steps: int
    total_steps: int
    tokens_seen: int
    seconds: float  # wall clock of this call's loop
    finished: bool  # reached total_steps (False: stopped by the time budget or max_steps)

    def final_train_loss(self, last: int = 200) -> float:
        """Mean training loss over the last ``last`` steps."""
        recs = [r for r in self.history if "loss" in r]
        recs = [r for r in recs if r["step"] > self.steps - last] or recs[-1:]
        return float(np.mean([r["loss"] for r in recs]))

    def final_heldout_loss(self) -> float | None:
        recs = [r for r in self.history if "heldout_loss" in r]
        return recs[-1]["heldout_loss"] if recs else None


def _read_log(path: Path, max_step: int) -> list[dict]:
    if not path.is_file():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in recs if r["step"] <= max_step]


def train(model_config: OPTConfig, tc: TrainConfig, train_tokens: np.ndarray,
          heldout_tokens: np.ndarray, run_dir: str | Path, *, deadline: float | None = None,
          max_steps: int | None = None, resume: bool = True, progress: bool = True,
          log=print) -> TrainResult:
    """Train (or resume) an OPT on ``train_tokens`` ([N] uint16), evaluating on windows of
    ``heldout_tokens``. ``deadline``: a `time.perf_counter()` value when the loop must stop
    (checkpointing first); ``max_steps``: stop this call after that many steps (for tests)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh = data_mesh()
    n_dev = mesh.devices.size
    if tc.batch_size % n_dev:
        raise DejavuError(f"batch_size {tc.batch_size} is not divisible by the {n_dev} devices; "
                          f"use a multiple of {n_dev}.")
    if tc.seq_len > model_config.max_position_embeddings:
        raise DejavuError(f"seq_len {tc.seq_len} exceeds the model's {model_config.max_position_embeddings} "
                          "positions; lower seq_len or raise max_position_embeddings.")
    if tc.total_steps is None and deadline is None:
        raise DejavuError("set TrainConfig.total_steps or give a time budget (deadline).")
    ckpts = TrainCheckpoints(run_dir)
    total_steps = tc.total_steps
    if resume and ckpts.latest_step() is not None:
        state, meta = ckpts.restore(abstract_state(model_config, tc, mesh))
        if meta["model_config"] != model_config.to_hf_dict():
            raise DejavuError(f"{run_dir} holds a run of another model shape; use a new run dir.")
        changed = [k for k in _RESUME_KEYS if meta["train_config"][k] != getattr(tc, k)]
        if changed:
            raise DejavuError(f"{run_dir} was trained with other settings {changed}; resume with "
                              "the same settings or start a new run dir.")
        total_steps = meta["total_steps"]
        log(f"resumed from step {int(state['step'])} of {total_steps} in {ckpts.directory}")
    else:
        state = init_state(model_config, tc, mesh)
    step0 = step = int(state["step"])
    log_path = run_dir / "train_log.jsonl"
    history = _read_log(log_path, step)
    log_path.write_text("".join(json.dumps(r) + "\n" for r in history))
    log_file = open(log_path, "a")

    batch_sharding = NamedSharding(mesh, P("data"))
    train_step = make_train_step(model_config, tc, mesh)
    eval_step = make_eval_step(model_config, tc, mesh)
    n_eval = max(n_dev, tc.eval_sequences // n_dev * n_dev)
    eval_data = eval_batch(heldout_tokens, n_eval, tc.seq_len)
    eval_data = jax.device_put(eval_data[: len(eval_data) // n_dev * n_dev], batch_sharding)

    def meta() -> dict:
        return {"model_config": model_config.to_hf_dict(), "train_config": tc.to_dict(),
                "total_steps": total_steps, "tokens_seen": step * tc.tokens_per_step}

    def record(rec: dict) -> None:
        history.append(rec)
        log_file.write(json.dumps(rec) + "\n")
        log_file.flush()

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress,
               mininterval=5.0, smoothing=0.1)
    t_loop = time.perf_counter()
    pending: list = []
    calib_t0 = None
    stop_reason = None
    while True:
        if total_steps is not None and step >= total_steps:
            break
        if max_steps is not None and step - step0 >= max_steps:
            stop_reason = "max_steps"
            break
        if deadline is not None and time.perf_counter() > deadline:
            stop_reason = "time budget"
            break
        lr = learning_rate(step, tc, total_steps or 10**9)
        batch = jax.device_put(train_batch(train_tokens, step, tc.batch_size, tc.seq_len, tc.seed),
                               batch_sharding)
        state, metrics = train_step(state, batch, jnp.float32(lr))
        step += 1
        bar.update(1)
        pending.append((step, lr, metrics))
        if total_steps is None and step - step0 in CALIBRATION_STEPS:
            jax.block_until_ready(metrics)
            if step - step0 == CALIBRATION_STEPS[0]:
                calib_t0 = time.perf_counter()
            else:
                per_step = (time.perf_counter() - calib_t0) / (CALIBRATION_STEPS[1] - CALIBRATION_STEPS[0])
                # 5% for evaluations and checkpoints along the way
                total_steps = step + int(0.95 * (deadline - time.perf_counter()) / per_step)
                total_steps = max(total_steps, tc.warmup_steps + 1)
                bar.total = total_steps
                log(f"{per_step * 1e3:.1f} ms/step ({tc.tokens_per_step / per_step:,.0f} tokens/s): "
                    f"schedule set to {total_steps} steps ({total_steps * tc.tokens_per_step:,} tokens)")
        last = total_steps is not None and step >= total_steps
        if step % tc.log_every == 0 or last:
            for s, lr_s, m in pending:
                record({"step": s, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                        "lr": lr_s, "tokens": s * tc.tokens_per_step,
                        "time": round(time.perf_counter() - t_loop, 2)})
            pending = []
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
        if step % tc.eval_every == 0 or last:
            heldout = float(eval_step(state["params"], eval_data))
            record({"step": step, "heldout_loss": heldout, "tokens": step * tc.tokens_per_step,
                    "time": round(time.perf_counter() - t_loop, 2)})
            log(f"step {step}: train loss {history[-2]['loss'] if len(history) > 1 else float('nan'):.4f}, "
                f"held-out loss {heldout:.4f}")
        if step % tc.checkpoint_every == 0 and not last:
            ckpts.save(step, state, meta())
    for s, lr_s, m in pending:
        record({"step": s, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": lr_s,
                "tokens": s * tc.tokens_per_step, "time": round(time.perf_counter() - t_loop, 2)})
    bar.close()
    if ckpts.latest_step() != step:
        ckpts.save(step, state, meta())
    ckpts.close()
    log_file.close()
    if stop_reason:
        log(f"stopped at step {step} of {total_steps} ({stop_reason}); run again to resume.")
    return TrainResult(params=state["params"], history=history, steps=step,
                       total_steps=total_steps if total_steps is not None else step,
                       tokens_seen=step * tc.tokens_per_step,
                       seconds=time.perf_counter() - t_loop,
                       finished=total_steps is not None and step >= total_steps)
