"""ACE-Step 1.5 DiT configuration, read from the official ``config.json``.

Field names and defaults are the official ``AceStepConfig`` ones (spec §1.2). Unknown fields are kept in
``extra`` so a newer config still loads; only the fields below influence the model.

The XL models (``acestep-v15-xl-{turbo,base,sft}``, April 2026) differ from the defaults only in the widths and
depth in ``XL_FIELDS``: the DiT runs at 2560 wide with 32 layers, the condition encoder, audio tokenizer and
detokenizer stay at 2048 (``encoder_*`` fields). Sources: the official XL model code builds the encoder, tokenizer,
detokenizer and ``null_condition_emb`` from a copy of the config with ``encoder_hidden_size``,
``encoder_intermediate_size``, ``encoder_num_attention_heads`` and ``encoder_num_key_value_heads``
(``acestep/models/xl_turbo/modeling_acestep_v15_xl_turbo.py`` @3450c05, ``AceStepConditionGenerationModel``);
ComfyUI 0.20.1 derives the same fields from tensor shapes (``comfy/model_detection.py``, ACE-Step 1.5 branch); the
numbers below are the ones published for the XL checkpoints (hidden 2560, intermediate 9728, 32 heads / 8 KV
heads, 32 layers, encoder 2048 / 6144 / 16 heads / 8 KV heads, head_dim 128).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

# What tells the three variants apart in config.json; the weights have the same keys and shapes.
VARIANT_FIELDS = {
    "turbo": {"is_turbo": True, "model_version": "turbo"},
    "base": {"is_turbo": False, "model_version": "base"},
    "sft": {"is_turbo": False, "model_version": "sft"},
}

# The XL models' departures from the 2B defaults below (sources in the module docstring).
XL_FIELDS = {
    "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "encoder_hidden_size": 2048, "encoder_intermediate_size": 6144,
    "encoder_num_attention_heads": 16, "encoder_num_key_value_heads": 8,
}


@dataclass
class AceStepConfig:
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 24  # DiT layers
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 32768
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_sliding_window: bool = True
    sliding_window: int = 128
    layer_types: Optional[list] = None  # default: even layers sliding, odd layers full
    in_channels: int = 192  # 128 context channels + 64 noisy-latent channels
    audio_acoustic_hidden_dim: int = 64  # VAE latent channels
    patch_size: int = 2
    text_hidden_dim: int = 1024  # Qwen3-Embedding-0.6B hidden size
    num_lyric_encoder_hidden_layers: int = 8
    timbre_hidden_dim: int = 64
    num_timbre_encoder_hidden_layers: int = 4
    timbre_fix_frame: int = 750
    num_attention_pooler_hidden_layers: int = 2
    pool_window_size: int = 5
    fsq_dim: int = 2048
    fsq_input_levels: list = field(default_factory=lambda: [8, 8, 8, 5, 5, 5])
    fsq_input_num_quantizers: int = 1
    vocab_size: int = 64003
    data_proportion: float = 0.5
    timestep_mu: float = -0.4
    timestep_sigma: float = 1.0
    is_turbo: bool = True
    model_version: str = "turbo"
    # The XL models run the condition encoder at a different width than the DiT.
    encoder_hidden_size: Optional[int] = None
    encoder_intermediate_size: Optional[int] = None
    encoder_num_attention_heads: Optional[int] = None
    encoder_num_key_value_heads: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.rope_scaling not in (None, {}) and self.rope_scaling.get("rope_type", "default") != "default":
            raise ValueError(
                f"config.json: rope_scaling={self.rope_scaling!r} is not supported; ACE-Step 1.5 uses plain RoPE "
                "(rope_scaling null). Is this an ACE-Step 1.5 DiT config?"
            )
        needed = max(self.num_hidden_layers, self.num_lyric_encoder_hidden_layers,
                     self.num_timbre_encoder_hidden_layers, self.num_attention_pooler_hidden_layers)
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(needed)]
        elif len(self.layer_types) < needed:
            raise ValueError(f"config.json: layer_types has {len(self.layer_types)} entries, needs at least {needed}")

    def window_for_layer(self, layer_idx: int) -> Optional[int]:
        """Bidirectional window half-width for ``layer_idx`` (|i - j| <= w), or None for full attention."""
        if self.use_sliding_window and self.layer_types[layer_idx] == "sliding_attention":
            return self.sliding_window
        return None

    def encoder_config(self) -> AceStepConfig:
        """Config the condition encoder / tokenizer / detokenizer are built with (differs only for XL)."""
        width = self.encoder_hidden_size or self.hidden_size
        if width == self.hidden_size:
            return self
        return dataclasses.replace(
            self,
            hidden_size=width,
            intermediate_size=self.encoder_intermediate_size or self.intermediate_size,
            num_attention_heads=self.encoder_num_attention_heads or self.num_attention_heads,
            num_key_value_heads=self.encoder_num_key_value_heads or self.num_key_value_heads,
        )

    @property
    def variant(self) -> str:
        """"turbo" for the distilled models (discrete 8-step schedule), else "sft" or "base"."""
        if self.is_turbo:
            return "turbo"
        return "sft" if "sft" in str(self.model_version).lower() else "base"

    @property
    def condition_width(self) -> int:
        """Width of the condition encoder's output (the DiT's cross-attention input before projection)."""
        return self.encoder_hidden_size or self.hidden_size

    @property
    def family(self) -> str:
        """"XL" when the condition encoder runs at a different width than the DiT (the XL models), else "2B"."""
        return "XL" if self.condition_width != self.hidden_size else "2B"

    @classmethod
    def from_dict(cls, data: dict) -> AceStepConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        if "is_turbo" not in data:
            known["is_turbo"] = "turbo" in str(data.get("model_version", "turbo")).lower()
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: str) -> AceStepConfig:
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e}); re-download the checkpoint folder.") from e
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out.update(self.extra)
        return out

    def save(self, directory: str) -> None:
        from .fileio import atomic_write_text

        atomic_write_text(os.path.join(directory, "config.json"), json.dumps(self.to_dict(), indent=2))
