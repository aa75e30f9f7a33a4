"""LoRA files: the PEFT adapter folder (official app, kaola) and the single ComfyUI file (LoraLoaderModelOnly).

PEFT folder: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.layers.N.{self_attn,cross_attn}.{q,k,v,o}_proj.lora_{A,B}.weight`` (decoder-relative), loadable
with ``peft.PeftModel.from_pretrained(<official decoder>, path)``.

ComfyUI file: the same ``base_model.model.<module>.lora_{A,B}.weight`` keys, which ComfyUI maps to
``diffusion_model.decoder.<module>.weight`` for ACE-Step 1.5, plus one ``base_model.model.<module>.alpha`` scalar
per module. ComfyUI scales a LoRA by ``alpha / rank`` only when that tensor exists, and by 1.0 otherwise — which is
why LoRAs without it play at rank/alpha of their trained strength (half strength at alpha = 2·rank).

``adapter_config.json`` is written here, not by ``peft.LoraConfig``: PEFT 0.21's LoraConfig writes ~20 fields that
older PEFT does not know (0.12/0.13 refuse the file with a TypeError, 0.14-0.18 warn "Unexpected keyword
arguments"). ``PEFT_CONFIG_FIELDS`` is the field set PEFT 0.12's ``LoraConfig`` has (its dataclass fields minus the
runtime-only ``runtime_config``), with the values LoraConfig writes, so every PEFT from 0.12 on reads the file with
no error and no warning (tests/test_peft_compat.py loads it with 0.12, 0.14, 0.18 and the installed PEFT).

``read_lora`` reads any of these (and our run's ``final/`` or ``checkpoints/epoch_N/`` folder, which hold
``adapter/``) for listening to a LoRA; ``check_lora_fits`` and ``merge_lora_`` apply it to a decoder.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Optional

import torch

from .fileio import atomic_save, atomic_write_text

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


# ---------------------------------------------------------------------------------------------------------------
# adapter_config.json that every PEFT from 0.12 on loads without error or warning

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT 0.12.0 LoraConfig's serialised fields and the value LoraConfig writes for each when left at its default
# (peft/config.py PeftConfig + peft/tuners/lora/config.py LoraConfig of 0.12.0). The fields we set are filled in
# by peft_adapter_config.
PEFT_CONFIG_FIELDS = {
    "alpha_pattern": {},
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "peft_type": "LORA",
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "task_type": "FEATURE_EXTRACTION",  # what the official trainer passes (spec §4.1)
    "use_dora": False,
    "use_rslora": False,
}


def peft_adapter_config(rank: int, alpha: float, dropout: float, targets: list[str],
                        base_model_name_or_path: Optional[str] = None) -> dict:
    """The adapter_config.json content for a plain LoRA on the decoder's ``targets`` Linears."""
    config = json.loads(json.dumps(PEFT_CONFIG_FIELDS))  # a deep copy
    config.update(r=int(rank), lora_alpha=int(alpha) if float(alpha).is_integer() else float(alpha),
                  lora_dropout=float(dropout), target_modules=sorted(targets),
                  base_model_name_or_path=base_model_name_or_path)
    return config


def write_peft_config(directory: str, config: dict) -> None:
    """As PEFT writes it: sorted keys, indent 2."""
    atomic_write_text(os.path.join(directory, PEFT_CONFIG_NAME), json.dumps(config, indent=2, sort_keys=True))


# ---------------------------------------------------------------------------------------------------------------
# Reading a LoRA to listen to it: PEFT folder, ComfyUI file, our run folders

@dataclass
class LoRAWeights:
    """A LoRA as read from disk: per decoder module its A [r, in] and B [out, r], and the factor ΔW = factor·B·A
    (alpha / r, or alpha / sqrt(r) for rsLoRA) it is applied with at strength 1."""

    pairs: dict
    factors: dict
    source: str
    kind: str  # "PEFT adapter folder" | "ComfyUI LoRA file"
    notes: list = field(default_factory=list)  # what was assumed while reading, for the user to see

    @property
    def ranks(self) -> set:
        return {int(ab["A"].shape[0]) for ab in self.pairs.values()}

    def describe(self) -> str:
        ranks = ", ".join(str(r) for r in sorted(self.ranks))
        alphas = sorted({round(self.factors[m] * self.pairs[m]["A"].shape[0], 6) for m in self.pairs})
        alpha = ", ".join(f"{a:g}" for a in alphas)
        return f"{self.kind} '{self.source}' (rank {ranks}, alpha {alpha}, {len(self.pairs)} layers)"


def resolve_lora_path(path: str) -> tuple[str, str]:
    """-> ("peft", adapter folder) or ("comfy", file). Accepts a PEFT folder, its adapter_model.safetensors, our
    run's final/ or checkpoints/epoch_N/ (they hold adapter/), or a single ComfyUI .safetensors file."""
    if not path:
        raise ValueError("lora: no path given; pass a PEFT adapter folder, a ComfyUI .safetensors LoRA file, or a "
                         "training run's final/ or checkpoints/epoch_N/ folder.")
    if os.path.isdir(path):
        for folder in (path, os.path.join(path, "adapter")):
            if os.path.isfile(os.path.join(folder, PEFT_CONFIG_NAME)):
                return "peft", folder
        hint = (f" It looks like a training run folder: pass '{os.path.join(path, 'final')}'."
                if os.path.isdir(os.path.join(path, "final")) else "")
        raise FileNotFoundError(f"lora '{path}' is a folder without {PEFT_CONFIG_NAME} (nor adapter/"
                                f"{PEFT_CONFIG_NAME}); pass a PEFT adapter folder, a training run's final/ or "
                                f"checkpoints/epoch_N/ folder, or a ComfyUI .safetensors file.{hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lora '{path}' does not exist; pass a PEFT adapter folder, a ComfyUI .safetensors "
                                "LoRA file, or a training run's final/ or checkpoints/epoch_N/ folder.")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(path) == PEFT_WEIGHTS_NAME and os.path.isfile(os.path.join(folder, PEFT_CONFIG_NAME)):
        return "peft", folder
    if not path.endswith(".safetensors"):
        raise ValueError(f"lora '{path}' is not a .safetensors file; pass a ComfyUI .safetensors LoRA or a PEFT "
                         "adapter folder.")
    return "comfy", path


def _split_keys(state: dict, source: str) -> tuple[dict, dict]:
    """-> (A/B pairs per module, alpha tensors per module); refuses keys that are neither."""
    pairs, alphas, unknown = {}, {}, []
    for key, value in state.items():
        m = _KEY.match(key)
        if m:
            pairs.setdefault(m.group("module"), {})[m.group("ab")] = value
        elif key.endswith(".alpha") and value.numel() == 1:
            module = re.sub(r"^(?:base_model\.model\.)?(?:decoder\.)?", "", key[: -len(".alpha")])
            alphas[module] = float(value.item())
        else:
            unknown.append(key)
    if unknown or not pairs:
        shown = ", ".join(sorted(unknown or state)[:4]) or "(none)"
        raise ValueError(f"lora '{source}' is not a plain LoRA for the ACE-Step 1.5 decoder: keys such as {shown} "
                         "are not of the form 'base_model.model.layers.N.<module>.lora_A.weight' / 'lora_B.weight' "
                         "(+ '.alpha'). LoHa/LoKr, DoRA and LoRAs for other models are not supported.")
    incomplete = sorted(k for k, v in pairs.items() if set(v) != {"A", "B"})
    if incomplete:
        raise ValueError(f"lora '{source}': lora_A and lora_B are not both present for {incomplete[:3]}.")
    return pairs, alphas


def _read_peft_folder(folder: str) -> LoRAWeights:
    from safetensors.torch import load_file

    try:
        with open(os.path.join(folder, PEFT_CONFIG_NAME), encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"lora '{folder}': {PEFT_CONFIG_NAME} is not valid JSON ({e}).") from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise ValueError(f"lora '{folder}': peft_type is {config.get('peft_type')!r}; only LoRA adapters "
                         "(peft_type LORA) can be applied.")
    for name, unsupported in (("use_dora", True), ("fan_in_fan_out", True)):
        if config.get(name) is unsupported:
            raise ValueError(f"lora '{folder}': {name} = true is not supported; only plain LoRA adapters can be "
                             "applied.")
    if config.get("bias", "none") != "none":
        raise ValueError(f"lora '{folder}': bias = {config['bias']!r} (trained biases) is not supported; only "
                         "bias 'none' adapters can be applied.")
    if config.get("alpha_pattern"):
        raise ValueError(f"lora '{folder}': per-layer alpha_pattern {config['alpha_pattern']} is not supported.")
    weights = os.path.join(folder, PEFT_WEIGHTS_NAME)
    if os.path.isfile(weights):
        state = load_file(weights)
    elif os.path.isfile(os.path.join(folder, "adapter_model.bin")):
        state = torch.load(os.path.join(folder, "adapter_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"lora '{folder}' has {PEFT_CONFIG_NAME} but no {PEFT_WEIGHTS_NAME}.")
    pairs, _ = _split_keys(state, folder)
    alpha = float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora", False))
    factors = {m: alpha / (math.sqrt(ab["A"].shape[0]) if rslora else ab["A"].shape[0]) for m, ab in pairs.items()}
    notes = ["rsLoRA scaling alpha/sqrt(r)"] if rslora else []
    return LoRAWeights(pairs, factors, folder, "PEFT adapter folder", notes)


def _read_comfy_file(path: str) -> LoRAWeights:
    state, _ = read_comfy_lora(path)
    pairs, alphas = _split_keys(state, path)
    notes = []
    missing = [m for m in pairs if m not in alphas]
    if missing:  # ComfyUI applies such a LoRA with factor 1.0; so do we, and we say so
        notes.append(f"{len(missing)} of {len(pairs)} layers have no '.alpha' tensor: applied with factor 1.0 "
                     "(alpha = rank), as ComfyUI does")
    factors = {m: (alphas[m] / ab["A"].shape[0] if m in alphas else 1.0) for m, ab in pairs.items()}
    return LoRAWeights(pairs, factors, path, "ComfyUI LoRA file", notes)


def read_lora(path: str) -> LoRAWeights:
    kind, resolved = resolve_lora_path(path)
    return _read_peft_folder(resolved) if kind == "peft" else _read_comfy_file(resolved)


def check_lora_fits(weights: LoRAWeights, decoder: torch.nn.Module) -> None:
    """Refuse a LoRA whose modules are not Linear layers of this decoder or whose shapes do not fit them."""
    missing, wrong = [], []
    for module, ab in sorted(weights.pairs.items()):
        try:
            layer = decoder.get_submodule(module)
        except AttributeError:
            layer = None
        if not isinstance(layer, torch.nn.Linear):
            missing.append(module)
            continue
        a, b = tuple(ab["A"].shape), tuple(ab["B"].shape)
        if len(a) != 2 or len(b) != 2 or a[1] != layer.in_features or b[0] != layer.out_features or a[0] != b[1]:
            wrong.append(f"{module}: lora_A {list(a)}, lora_B {list(b)} vs layer [{layer.out_features}, "
                         f"{layer.in_features}]")
    if missing:
        layers = sum(1 for n, m in decoder.named_modules()
                     if isinstance(m, torch.nn.Linear) and n.startswith("layers."))
        raise ValueError(f"lora '{weights.source}' does not match this model: {len(missing)} of its "
                         f"{len(weights.pairs)} modules are not Linear layers of the decoder, e.g. "
                         f"{', '.join(PEFT_PREFIX + m for m in missing[:3])}. The decoder has "
                         f"{layers} such layers (layers.0 .. layers.{len(decoder.layers) - 1}). Was it trained "
                         "for another model?")
    if wrong:
        raise ValueError(f"lora '{weights.source}' does not fit this model's layer shapes (rank or width): "
                         f"{'; '.join(wrong[:3])}. Was it trained for another model size?")


@torch.no_grad()
def merge_lora_(decoder: torch.nn.Module, weights: LoRAWeights, scale: float = 1.0) -> None:
    """W ← W + scale·factor·B·A for every module, computed in fp32 and stored in W's dtype (what ComfyUI does)."""
    check_lora_fits(weights, decoder)
    for module, ab in weights.pairs.items():
        layer = decoder.get_submodule(module)
        w = layer.weight
        delta = (scale * weights.factors[module]) * (ab["B"].to(w.device, torch.float32) @
                                                     ab["A"].to(w.device, torch.float32))
        w.copy_((w.float() + delta).to(w.dtype))
