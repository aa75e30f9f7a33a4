"""acestep_lora: the plain-PyTorch core of the ACE-Step 1.5 LoRA trainer (no ComfyUI imports here).

Heavy optional imports (transformers, peft) happen inside the functions that need them, so importing
this package (as ComfyUI does at start-up) stays fast.
"""
from .checkpoint import (DEFAULT_CONFIG_PATH, EXPECTED_LAYOUT, dit_identity, list_dit_configs, load_config,
                         load_dit, load_silence_latent)
from .config import AceStepConfig
from .model import AceStepModel

__version__ = "0.1.0"


def load_vae(checkpoint_dir, device="cpu", dtype=None):
    import torch

    from .vae import load_vae as _load

    return _load(checkpoint_dir, device=device, dtype=dtype or torch.float32)


def load_text_encoder(checkpoint_dir, device="cpu", dtype=None):
    import torch

    from .text import load_text_encoder as _load

    return _load(checkpoint_dir, device=device, dtype=dtype or torch.float32)


__all__ = ["AceStepConfig", "AceStepModel", "DEFAULT_CONFIG_PATH", "EXPECTED_LAYOUT", "dit_identity",
           "list_dit_configs", "load_config", "load_dit", "load_silence_latent", "load_text_encoder", "load_vae"]
