"""Training hyper-parameters, and the shape of the reference model.

Reference shape (`reference_model_config`): d_model 256, 6 layers, 8 heads of 32,
d_ff 1024 (= 4 d_model, like every OPT), 512 positions, vocab 50272, tied embeddings,
pre-LayerNorm, ReLU: 17.74 M parameters, 35.5 MB in 16-bit safetensors (budget 36 MB).

Why this shape. The tied 50272-row embedding takes 2 x 50272 x d bytes, so the budget
trades width for depth: d 320 leaves room for 1 layer, d 288 for 3, d 256 for 6, d 240
for 8, d 192 for 18 (4.7 M, 3.0 M, 5.6 M, 8.0 M non-embedding parameters). By FLOPs per
token the shapes are about equal (6 N plus the 6 V d of the tied LM head: ~1.05e8 for both
256/6 and 192/18), and Kaplan et al. (2020) find loss depends mostly on non-embedding N, so
the deep narrow shapes would win slightly (~4% lower loss at 192/18 by their N^-0.076)
if they cost the same time. They do not here: at d <= 256 a step is bound by memory
traffic of activations, which grows with L x d (2.25x more at 192/18, plus 3x the
sequential layer launches), and the run is capped by wall clock on data we repeat several
times (37 M tokens), where extra capacity buys less. d 256 / 6 layers (d/L ~ 43, the flat
part of Kaplan's aspect-ratio curve) keeps every matrix dimension a multiple of 128 (the
sparse kernels' block) and 8 heads per layer for head sparsity. 512 positions suit the
book text and the eval window; a 2048-row table would cost 0.8 MB more.
"""

from __future__ import annotations

import dataclasses

from dejavu_jax.config import OPTConfig

REFERENCE_NAME = "opt-gutenberg-6l"


def reference_model_config(**changes) -> OPTConfig:
    """The reference model's `OPTConfig` (see module docstring); ``changes`` override fields
    (built fresh, so a new hidden_size also sets word_embed_proj_dim)."""
    fields = dict(vocab_size=50272, hidden_size=256, num_hidden_layers=6, ffn_dim=1024,
                  num_attention_heads=8, max_position_embeddings=512)
    return OPTConfig(**{**fields, **changes})


def tiny_model_config(**changes) -> OPTConfig:
    """A CPU-sized OPT for tests and dry runs (real vocabulary, 2 layers of width 32)."""
    fields = dict(vocab_size=50272, hidden_size=32, num_hidden_layers=2, ffn_dim=128,
                  num_attention_heads=4, max_position_embeddings=64)
    return OPTConfig(**{**fields, **changes})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``batch_size`` is global (sequences per step, split over
    devices); a step sees ``batch_size * seq_len`` tokens. ``total_steps`` None: chosen from the
    time budget after timing the first steps (then stored in the checkpoint)."""

    seq_len: int = 512
    batch_size: int = 128
    peak_lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    total_steps: int | None = None
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    init_std: float = 0.02
    seed: int = 0
    loss_chunk: int = 64  # positions per chunk of the chunked cross-entropy (0: unchunked)
    compute_dtype: str = "bfloat16"
    log_every: int = 50
    eval_every: int = 500
    eval_sequences: int = 64
    checkpoint_every: int = 1000

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
