"""OPT hyper-parameters: read from a Hugging Face ``config.json``, or a named preset.

`OPTConfig` uses Hugging Face's field names, so ``OPTConfig.from_hf_dict(json)`` and
``cfg.to_hf_dict()`` round-trip a real ``facebook/opt-*`` config. It is a frozen,
hashable dataclass: jit-compiled functions take it as a static argument.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from dejavu_jax.errors import ConfigError

# OPT's learned position table has two extra rows: position p is stored at row p + 2.
POSITION_OFFSET = 2


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int | None = None  # None means hidden_size
    do_layer_norm_before: bool = True  # False only for opt-350m (post-LayerNorm)
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    tie_word_embeddings: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm's default, which HF OPT uses

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; fix config.json so that heads divide the width."
            )
        if self.activation_function != "relu":
            raise ConfigError(
                f"activation_function {self.activation_function!r} is not supported: dejavu-jax "
                "implements OPT's ReLU MLP (contextual sparsity relies on exact zeros)."
            )
        if not self.tie_word_embeddings:
            raise ConfigError(
                "tie_word_embeddings=False is not supported: every public OPT ties lm_head to "
                "embed_tokens."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_projections(self) -> bool:
        """True when embeddings live in a smaller space (opt-350m): project_in / project_out."""
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before

    def num_params(self) -> int:
        d, f, h = self.hidden_size, self.ffn_dim, self.word_embed_proj_dim
        per_layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
        total = self.vocab_size * h + (self.max_position_embeddings + POSITION_OFFSET) * d
        total += self.num_hidden_layers * per_layer
        if self.has_projections:
            total += 2 * d * h
        if self.has_final_layer_norm:
            total += 2 * d
        return total

    # ---- Hugging Face config.json -------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str = "config") -> "OPTConfig":
        model_type = data.get("model_type")
        if model_type != "opt":
            raise ConfigError(
                f"{source} describes model_type={model_type!r}, not an OPT model. dejavu-jax "
                "loads OPT checkpoints (facebook/opt-* or OPTForCausalLM saves) only."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        if data.get("_remove_final_layer_norm"):
            raise ConfigError(f"{source}: _remove_final_layer_norm=True is not supported.")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "ffn_dim", "num_attention_heads")
                   if k not in data]
        if missing:
            raise ConfigError(f"{source} lacks required OPT fields {missing}.")
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "OPTConfig":
        """Read ``<path>/config.json`` (or a config.json path itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not path.exists():
            raise ConfigError(f"{path} does not exist; pass a Hugging Face OPT directory.")
        if not file.exists():
            raise ConfigError(
                f"no config.json in {path}; a Hugging Face OPT directory holds config.json beside "
                "its weights (save it with model.save_pretrained(dir))."
            )
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        return cls.from_hf_dict(data, source=str(file))

    def to_hf_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("layer_norm_eps")
        data.update(
            model_type="opt",
            architectures=["OPTForCausalLM"],
            dropout=0.1,
            attention_dropout=0.0,
            layerdrop=0.0,
            init_std=0.02,
            use_cache=True,
            _remove_final_layer_norm=False,
        )
        return data

    def replace(self, **changes) -> "OPTConfig":
        return dataclasses.replace(self, **changes)


def _preset(d: int, layers: int, heads: int, **kw) -> OPTConfig:
    return OPTConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                     ffn_dim=4 * d, **kw)


# Real shapes of the public OPT models, for benchmarks on random weights.
PRESETS: dict[str, OPTConfig] = {
    "opt-125m": _preset(768, 12, 12),
    "opt-350m": _preset(1024, 24, 16, word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": _preset(2048, 24, 32),
    "opt-2.7b": _preset(2560, 32, 32),
    "opt-6.7b": _preset(4096, 32, 32),
    "opt-13b": _preset(5120, 40, 40),
    "opt-30b": _preset(7168, 48, 56),
    "opt-66b": _preset(9216, 64, 72),
    "opt-175b": _preset(12288, 96, 96),
}


def preset(name: str) -> OPTConfig:
    """`preset("opt-13b")` (also accepts "13b")."""
    key = name if name.startswith("opt-") else f"opt-{name}"
    if key not in PRESETS:
        raise ConfigError(f"unknown OPT preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[key]
