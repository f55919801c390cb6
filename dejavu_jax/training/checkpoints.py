"""Orbax checkpoints of the training state, for resuming after an interruption.

``run_dir/checkpoints/<step>/`` holds ``state`` (params, optimizer state, step: orbax
StandardSave) and ``meta`` (JSON: the model config, the train config, the total steps chosen
for the schedule, tokens seen). Saves are asynchronous (training goes on while the files are
written) and atomic (orbax finalizes a step directory only once complete); the last
``keep`` are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from dejavu_jax.errors import CheckpointError


class TrainCheckpoints:
    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.directory = (Path(run_dir) / "checkpoints").absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=True),
            item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start saving (returns at once; `wait` blocks until written)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state placed like ``target``'s shardings, meta) of ``step`` (default: the latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory} to resume from.")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(
                f"cannot restore step {step} from {self.directory} ({type(e).__name__}: {e}); "
                "was it written for another model or train config? Start a new run directory, or "
                "pass the same settings as the run that wrote it.") from None
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
