"""Hugging Face torch peers for the evaluations: load an exported directory with
`transformers.OPTForCausalLM` and score windows with it (torch is an optional dependency)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_hf_model(path: str | Path, dtype: str = "float32", device: str | None = None):
    """``OPTForCausalLM.from_pretrained(path)`` offline, eval mode, eager attention, on
    ``device`` (default: cuda when available)."""
    import torch
    from transformers import OPTForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = OPTForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype),
                                           local_files_only=True, attn_implementation="eager")
    return model.to(device).eval()


def torch_scorer(hf_model):
    """``score_fn(inputs [B, C] int32) -> log p(inputs[:, 1:]) [B, C - 1] f32`` for a HF causal LM
    (logits upcast to f32 before the log-softmax)."""
    import torch

    device = next(hf_model.parameters()).device

    @torch.no_grad()
    def score(inputs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(inputs, np.int64), device=device)
        logits = hf_model(input_ids=x).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        return logp.gather(-1, x[:, 1:, None])[..., 0].cpu().numpy()

    return score
