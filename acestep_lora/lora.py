"""LoRA layers for training: the PEFT LoRA formulation in fewer kernel launches, saved in PEFT's format.

``y = W x + (alpha / r) · B A dropout(x)`` exactly as PEFT's ``lora.Linear`` (same A init: Kaiming-uniform with
a = √5; B = 0), but the scale and the add are fused into one ``addmm`` and the input is never cast back and forth
between dtypes. PEFT's wrapper costs ~10 kernels per adapted layer per forward under bf16 autocast (input cast to
fp32 and back, weight casts, separate scale and add), about a third of all launches of a training step; this costs
the base GEMM, one dropout and two GEMMs.

The adapter is written as a PEFT folder (``adapter_config.json`` with the fields every PEFT from 0.12 on knows,
see lora_io.PEFT_CONFIG_FIELDS, + ``adapter_model.safetensors`` with PEFT's key names), so
``PeftModel.from_pretrained`` loads it as if PEFT had trained it (tests/test_lora.py checks outputs and gradients
against PEFT itself; tests/test_peft_compat.py loads the folder with PEFT 0.12, 0.14, 0.18 and the installed
PEFT). Writing it needs no PEFT.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .lora_io import PEFT_PREFIX, PEFT_WEIGHTS_NAME, peft_adapter_config, write_peft_config

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj"  # the official trainer's: attention projections


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.scaling = alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        h = F.linear(h, self.lora_A)  # (..., r)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, self.rank), self.lora_B.t(), alpha=self.scaling)
        return out.view(y.shape)


def linear_names(decoder: nn.Module, prefix: str = "layers.") -> set[str]:
    """Names a LoRA can target: leaf names of the decoder's transformer Linears (q_proj, ..., down_proj)."""
    return {name.split(".")[-1] for name, m in decoder.named_modules()
            if isinstance(m, nn.Linear) and name.startswith(prefix)}


def parse_targets(text: str, valid: set[str]) -> list[str]:
    """``target_modules`` as typed ("q_proj, v_proj") -> sorted unique names, each one of ``valid``."""
    targets = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not targets:
        raise ValueError(f"target_modules is empty; use e.g. '{DEFAULT_TARGETS}'. Valid names: "
                         f"{', '.join(sorted(valid))}.")
    unknown = [t for t in targets if t not in valid]
    if unknown:
        raise ValueError(f"target_modules: {', '.join(unknown)} not found in the decoder. Valid names: "
                         f"{', '.join(sorted(valid))}.")
    return sorted(dict.fromkeys(targets))


def inject(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float,
           prefix: str = "layers.") -> dict[str, LoRALinear]:
    """Wrap every ``nn.Linear`` under ``prefix`` whose leaf name is in ``targets``; freeze everything else."""
    model.requires_grad_(False)
    wrapped = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.startswith(prefix) and name.split(".")[-1] in targets:
            parent_name, leaf = name.rsplit(".", 1)
            layer = LoRALinear(module, rank, alpha, dropout)
            setattr(model.get_submodule(parent_name), leaf, layer)
            wrapped[name] = layer
    if not wrapped:
        raise ValueError(f"no Linear layer matched target_modules {targets}")
    return wrapped


def lora_parameters(layers: dict[str, LoRALinear]) -> list[nn.Parameter]:
    return [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]


def pairs(layers: dict[str, LoRALinear]) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"A": lora_A, "B": lora_B}} — the shape lora_io's exporters take."""
    return {name: {"A": layer.lora_A.detach(), "B": layer.lora_B.detach()} for name, layer in layers.items()}


def peft_state_dict(layers: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """PEFT's saved key names: ``base_model.model.<module>.lora_{A,B}.weight``."""
    out = {}
    for name, layer in layers.items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().float().cpu().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().float().cpu().contiguous()
    return out


def load_peft_state_dict(layers: dict[str, LoRALinear], state: dict[str, torch.Tensor]) -> None:
    expected = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"adapter does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(state[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            layer.lora_B.copy_(state[f"{PEFT_PREFIX}{name}.lora_B.weight"])


def load_peft_adapter(directory: str, layers: dict[str, LoRALinear]) -> None:
    """Load a PEFT folder's weights (ours, e.g. a checkpoint's ``adapter/``) into the injected ``layers``."""
    from safetensors.torch import load_file

    try:
        load_peft_state_dict(layers, load_file(os.path.join(directory, PEFT_WEIGHTS_NAME)))
    except ValueError as e:
        raise ValueError(f"'{directory}': {e}") from None


def save_peft_adapter(directory: str, layers: dict[str, LoRALinear], targets: list[str], rank: int, alpha: float,
                      dropout: float) -> None:
    """``adapter_config.json`` (loadable by PEFT 0.12 .. today) + ``adapter_model.safetensors``."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    write_peft_config(directory, peft_adapter_config(rank, alpha, dropout, targets))
    save_file(peft_state_dict(layers), os.path.join(directory, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})


@contextlib.contextmanager
def disabled(layers: dict[str, LoRALinear]) -> Iterator[None]:
    """The LoRA layers act as their frozen base while inside (scale 0), e.g. for the base model's answer to a
    preview prompt; the trained weights are not touched and the scales come back on exit."""
    scales = {name: layer.scaling for name, layer in layers.items()}
    for layer in layers.values():
        layer.scaling = 0.0
    try:
        yield
    finally:
        for name, layer in layers.items():
            layer.scaling = scales[name]
