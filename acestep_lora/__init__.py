"""acestep_lora: the plain-PyTorch core of the ACE-Step 1.5 LoRA trainer (no ComfyUI imports here).

Heavy optional imports (transformers, peft) happen inside the functions that need them, so importing
this package (as ComfyUI does at start-up) stays fast.
"""
from .checkpoint import (DEFAULT_CONFIG_PATH, EXPECTED_LAYOUT, dit_identity, list_dit_configs, load_config,
                         load_dit, load_silence_latent)
from .config import AceStepConfig
from .model import AceStepModel


def _version() -> str:
    """The version has one source, ``[project] version`` in pyproject.toml (where the ComfyUI registry reads it).

    A source tree (a checkout, ComfyUI's custom_nodes folder, an editable install) has that file beside this
    package and it wins, so an older installed copy cannot misreport it; an installed wheel has the metadata."""
    import os
    import re

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    try:
        with open(path, encoding="utf-8") as f:
            table = re.search(r"^\[project\][ \t]*$(.*?)(?=^\[|\Z)", f.read(), re.M | re.S)
    except OSError:
        table = None
    if table and re.search(r'^name\s*=\s*"acestep-lora"', table.group(1), re.M):
        found = re.search(r'^version\s*=\s*"([^"]+)"', table.group(1), re.M)
        if found:
            return found.group(1)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("acestep-lora")
    except PackageNotFoundError:
        return "unknown"


__version__ = _version()


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
