"""`SparsityConfig` (how sparse `dejavu_jax.sparse.sparse_decode` decodes) and the check that
predictors fit a model and a config. Re-exported by `dejavu_jax.sparse`."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from dejavu_jax import model as M
from dejavu_jax.errors import ConfigError
from dejavu_jax.predictors.modules import Predictors, config_fingerprint


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """How sparse to decode. ``None`` fields take the predictors' calibrated per-layer k.

    mlp_density: fraction of MLP neurons kept per layer (rounded up to ``block``).
    mlp_threshold: instead of a fixed k, keep neurons whose predictor logit exceeds this
        (capped at the density's k, or the predictors' k): fewer rows read when the
        predictor is confident. At batch 1 the set is found without a sort (compaction of
        the scores above the threshold); if more than the cap pass, the cap lowest-indexed
        are kept, so give a generous cap (e.g. mlp_density=1.0: the MLP kernel's cost follows
        the count, not the cap). Batches rank each row first (the cap keeps its best), except
        without a cap (k = F), where a row's set is simply its scores above the threshold.
    head_keep: fraction of attention heads kept per layer.
    dense_layers: layers run dense (e.g. the paper keeps the last layers' MLPs dense).
    lookahead: must match the predictors (trained on layer l-1's input, or in-layer).
    batch_mode: "union" or "per_row" (see the module docstring).
    kv_policy: "all" or "selected" (see the module docstring).
    block: neuron-count granularity (default: the predictors' block size).
    impl: kernel backend for `pallas_kernels` ("auto", "triton", "mosaic", "xla", ...).
    predictor_stream: lookahead, batch 1. Run layer l+1's predictors and top-k selection on
        a second GPU stream (`dejavu_jax.streams.on_stream`) so they can overlap layer l's
        weight kernels. Same sets, same tokens; on a CPU the call runs inline; batches > 1
        and thresholds (their compaction cannot run there) keep their sets on the main
        stream. Off by default: on an H100 it measured slower (13B: 8.27 vs 8.01 ms/token;
        docs/performance.md says why).
    """

    mlp_density: float | None = None
    mlp_threshold: float | None = None
    head_keep: float | None = None
    dense_layers: tuple[int, ...] = ()
    lookahead: bool = True
    batch_mode: Literal["union", "per_row"] = "union"
    kv_policy: Literal["all", "selected"] = "all"
    block: int | None = None
    impl: str = "auto"
    predictor_stream: bool = False

    def __post_init__(self):
        if self.mlp_density is not None and not 0.0 < self.mlp_density <= 1.0:
            raise ConfigError(f"mlp_density must lie in (0, 1], got {self.mlp_density}.")
        if self.head_keep is not None and not 0.0 < self.head_keep <= 1.0:
            raise ConfigError(f"head_keep must lie in (0, 1], got {self.head_keep}.")
        if self.batch_mode not in ("union", "per_row"):
            raise ConfigError(f"batch_mode must be 'union' or 'per_row', got {self.batch_mode!r}.")
        if self.kv_policy not in ("all", "selected"):
            raise ConfigError(f"kv_policy must be 'all' or 'selected', got {self.kv_policy!r}.")
        if self.predictor_stream and not self.lookahead:
            raise ConfigError("predictor_stream=True needs lookahead=True: in-layer predictors read "
                              "the layer's own input, so there is nothing to overlap them with.")
        object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))

    def layer_budgets(self, config, predictors: Predictors) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Static (mlp_k, head_k) per layer; a dense layer keeps all F neurons and H heads."""
        L, F, H = config.num_hidden_layers, config.ffn_dim, config.num_attention_heads
        bad = [i for i in self.dense_layers if not 0 <= i < L]
        if bad:
            raise ConfigError(f"dense_layers {bad} are outside the model's layers [0, {L}).")
        block = self.block or predictors.block_size
        mlp_k, head_k = [], []
        for layer in range(L):
            if layer in self.dense_layers:
                mlp_k.append(F)
                head_k.append(H)
                continue
            if self.mlp_density is None:
                mlp_k.append(predictors.mlp_k[layer])
            else:
                mlp_k.append(min(F, max(block, math.ceil(self.mlp_density * F / block) * block)))
            if self.head_keep is None:
                head_k.append(predictors.head_k[layer])
            else:
                if self.head_keep * H < 1 - 1e-9:
                    raise ConfigError(f"head_keep={self.head_keep} keeps no head of {H}; use at least 1/{H}.")
                head_k.append(min(H, math.ceil(self.head_keep * H - 1e-9)))
        return tuple(mlp_k), tuple(head_k)


def check_predictors(model: M.OPTModel, predictors: Predictors, sparsity: SparsityConfig) -> None:
    """Refuse predictors of another model or of the other lookahead kind, with a clear error."""
    predictors.check(model.config)
    if predictors.fingerprint and predictors.fingerprint != config_fingerprint(model.config):
        raise ConfigError("these predictors were trained for a model with another config "
                          "(fingerprint mismatch); train predictors for this model.")
    if predictors.lookahead != sparsity.lookahead:
        raise ConfigError(f"SparsityConfig(lookahead={sparsity.lookahead}) but the predictors were "
                          f"trained with lookahead={predictors.lookahead}; use matching ones.")
