"""LoRA files: the PEFT adapter folder (official app, kaola) and the single ComfyUI file (LoraLoaderModelOnly).

PEFT folder: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.layers.N.{self_attn,cross_attn}.{q,k,v,o}_proj.lora_{A,B}.weight`` (decoder-relative), loadable
with ``peft.PeftModel.from_pretrained(<official decoder>, path)``.

ComfyUI file: the same ``base_model.model.<module>.lora_{A,B}.weight`` keys, which ComfyUI maps to
``diffusion_model.decoder.<module>.weight`` for ACE-Step 1.5, plus one ``base_model.model.<module>.alpha`` scalar
per module. ComfyUI scales a LoRA by ``alpha / rank`` only when that tensor exists, and by 1.0 otherwise — which is
why LoRAs without it play at rank/alpha of their trained strength (half strength at alpha = 2·rank).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

import torch

from .fileio import atomic_save

PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:decoder\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def lora_pairs(state: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Group a PEFT/our state dict into {decoder-relative module path: {"A": tensor, "B": tensor}}."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _KEY.match(key)
        if m:
            pairs.setdefault(m.group("module"), {})[m.group("ab")] = value
    incomplete = [k for k, v in pairs.items() if set(v) != {"A", "B"}]
    if incomplete:
        raise ValueError(f"LoRA weights incomplete for {incomplete[:3]} (need lora_A and lora_B).")
    return pairs


def comfy_state_dict(pairs: dict, alpha: float, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    out = {}
    for module, ab in sorted(pairs.items()):
        prefix = PEFT_PREFIX + module
        out[prefix + ".lora_A.weight"] = ab["A"].detach().to("cpu", dtype).contiguous()
        out[prefix + ".lora_B.weight"] = ab["B"].detach().to("cpu", dtype).contiguous()
        out[prefix + ".alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def save_comfy_lora(path: str, pairs: dict, alpha: float, metadata: dict,
                    dtype: torch.dtype = torch.bfloat16) -> str:
    from safetensors.torch import save_file

    tensors = comfy_state_dict(pairs, alpha, dtype)
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}
    atomic_save(path, lambda p: save_file(tensors, p, metadata=meta))
    return path


def read_comfy_lora(path: str) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def merged_delta(pairs: dict, alpha: float, rank: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """ΔW = scale · (alpha / rank) · B @ A per module (what ComfyUI adds to each weight at strength ``scale``)."""
    return {m: scale * (alpha / rank) * (ab["B"].float() @ ab["A"].float()) for m, ab in pairs.items()}


def unique_path(directory: str, name: str, ext: str = ".safetensors", same_run: Optional[str] = None) -> str:
    """``directory/name.ext``, or ``name_2.ext``, ``name_3.ext``... so a different run's file is never replaced.

    A file whose metadata carries ``run_id == same_run`` belongs to this run and may be replaced.
    """
    os.makedirs(directory, exist_ok=True)
    n = 1
    while True:
        candidate = os.path.join(directory, f"{name}{'' if n == 1 else f'_{n}'}{ext}")
        if not os.path.exists(candidate):
            return candidate
        if same_run is not None:
            try:
                _, meta = read_comfy_lora(candidate)
                if meta.get("acestep_lora.run_id") == same_run:
                    return candidate
            except Exception:
                pass
        n += 1


def publish_copy(source: str, target: str) -> str:
    """Copy a finished LoRA file to ``target`` (e.g. where ComfyUI's loaders list LoRAs) atomically: a loader never
    sees half a file."""
    atomic_save(target, lambda tmp: shutil.copyfile(source, tmp))
    return target
