"""Find and load the parts of an official ACE-Step 1.5 checkpoint folder (spec §1.1).

    checkpoints/
      acestep-v15-turbo/{config.json, model.safetensors, silence_latent.pt}   (any acestep-v15-* DiT folder)
      vae/{config.json, diffusion_pytorch_model.safetensors}
      Qwen3-Embedding-0.6B/{config.json, model.safetensors, tokenizer files}

Every loader fails with a message that names the missing piece and shows this layout.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional

import torch
from safetensors import safe_open

from .config import AceStepConfig
from .model import COMPONENTS, AceStepModel

DIT_PREFIX = "acestep-v15-"
VAE_DIR = "vae"
TEXT_ENCODER_DIR = "Qwen3-Embedding-0.6B"
DEFAULT_CONFIG_PATH = "acestep-v15-turbo"

EXPECTED_LAYOUT = (
    "Expected layout (huggingface-cli download ACE-Step/Ace-Step1.5 --local-dir <checkpoint_dir>):\n"
    "  <checkpoint_dir>/acestep-v15-turbo/{config.json, model.safetensors, silence_latent.pt}\n"
    "  <checkpoint_dir>/vae/{config.json, diffusion_pytorch_model.safetensors}\n"
    "  <checkpoint_dir>/Qwen3-Embedding-0.6B/{config.json, model.safetensors, tokenizer.json, tokenizer_config.json}"
)


def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} folder not found: '{path}'.\n{EXPECTED_LAYOUT}")
    return path


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: '{path}'.\n{EXPECTED_LAYOUT}")
    return path


def list_dit_configs(checkpoint_dir: str) -> list[str]:
    """DiT folders (``acestep-v15-*`` holding a config.json) under ``checkpoint_dir``, sorted."""
    if not os.path.isdir(checkpoint_dir):
        return []
    return sorted(name for name in os.listdir(checkpoint_dir)
                  if name.startswith(DIT_PREFIX) and os.path.isfile(os.path.join(checkpoint_dir, name, "config.json")))


def dit_dir(checkpoint_dir: str, config_path: str) -> str:
    """Folder of the DiT ``config_path`` (a folder name under checkpoint_dir, or an absolute folder path)."""
    if not config_path:
        raise ValueError(f"config_path is empty; choose a DiT folder such as '{DEFAULT_CONFIG_PATH}'.")
    if os.path.isabs(config_path):
        path = config_path
    else:
        require_dir(checkpoint_dir, "checkpoint_dir")
        path = os.path.join(checkpoint_dir, config_path)
    if not os.path.isdir(path):
        found = list_dit_configs(checkpoint_dir) if not os.path.isabs(config_path) else []
        hint = f"Folders found there: {', '.join(found)}." if found else "No acestep-v15-* folder was found there."
        raise FileNotFoundError(f"config_path '{config_path}': DiT folder '{path}' does not exist. {hint}\n"
                                f"{EXPECTED_LAYOUT}")
    require_file(os.path.join(path, "config.json"), f"DiT config ({config_path})")
    return path


def load_config(checkpoint_dir: str, config_path: str) -> AceStepConfig:
    return AceStepConfig.from_json(os.path.join(dit_dir(checkpoint_dir, config_path), "config.json"))


def _weight_files(directory: str, what: str) -> dict[str, str]:
    """Map tensor name -> safetensors file, for a single file or an HF sharded index."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(directory, v) for k, v in weight_map.items()}
    single = require_file(os.path.join(directory, "model.safetensors"), what)
    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def read_safetensors(files: dict[str, str], keys: Iterable[str], device="cpu",
                     dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    by_file: dict[str, list[str]] = {}
    for k in keys:
        by_file.setdefault(files[k], []).append(k)
    out = {}
    for path, names in by_file.items():
        with safe_open(path, framework="pt", device=str(device)) as f:
            for name in names:
                t = f.get_tensor(name)
                out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def load_dit(checkpoint_dir: str, config_path: str = DEFAULT_CONFIG_PATH, device="cpu",
             dtype: torch.dtype = torch.float32, components: tuple = COMPONENTS) -> AceStepModel:
    """Load the official DiT checkpoint strictly (every key present, no extra key, every shape equal).

    ``components`` limits what is built and read, e.g. ``("decoder", "null_condition_emb")`` for training, so the
    condition encoder and tokenizer never occupy memory when they are not needed.
    """
    directory = dit_dir(checkpoint_dir, config_path)
    cfg = AceStepConfig.from_json(os.path.join(directory, "config.json"))
    with torch.device("meta"):
        model = AceStepModel(cfg, components=tuple(components))
    expected = model.state_dict()
    files = _weight_files(directory, f"DiT weights ({config_path})")
    wanted_prefixes = tuple(c if c == "null_condition_emb" else c + "." for c in model.components)
    present = {k for k in files if k.startswith(wanted_prefixes)}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{directory}/model.safetensors does not match the ACE-Step 1.5 layout for this config.json: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]}). Is config.json from the same model as the weights?")
    state = read_safetensors(files, expected.keys(), device=device, dtype=dtype)
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{directory}/model.safetensors: '{name}' has shape {tuple(tensor.shape)}, the config "
                             f"expects {tuple(expected[name].shape)}. Is config.json from the same model?")
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


def load_silence_latent(checkpoint_dir: str, config_path: str = DEFAULT_CONFIG_PATH, device="cpu",
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The DiT's silence latent as [1, T_sil, 64] (stored as [1, 64, T_sil])."""
    path = require_file(os.path.join(dit_dir(checkpoint_dir, config_path), "silence_latent.pt"),
                        f"silence latent ({config_path})")
    latent = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(latent, torch.Tensor) or latent.dim() != 3:
        raise ValueError(f"{path}: expected one tensor [1, 64, T]; got {type(latent).__name__}. Re-download it.")
    return latent.transpose(1, 2).to(device=device, dtype=dtype).contiguous()


def folder_identity(directory: str, names: Optional[Iterable[str]] = None) -> str:
    """Cheap content fingerprint of a model folder: file names, sizes and the first/last MiB of each file.

    Hashing 5 GB on every run would take longer than the preprocessing it protects; this still changes whenever
    a file is replaced by a different one (safetensors headers, holding every tensor's offsets, are in the first MiB).
    """
    h = hashlib.sha256()
    for name in sorted(names if names is not None else os.listdir(directory)):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        size = os.path.getsize(path)
        h.update(f"{name}:{size}".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def dit_identity(checkpoint_dir: str, config_path: str) -> str:
    """Fingerprint of a DiT folder's config, silence latent and weights (not its remote-code .py files)."""
    directory = dit_dir(checkpoint_dir, config_path)
    return folder_identity(directory, ["config.json", "silence_latent.pt"] + [
        n for n in os.listdir(directory) if n.endswith((".safetensors", ".safetensors.index.json"))])
