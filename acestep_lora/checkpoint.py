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
from typing import Optional
from collections.abc import Iterable

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


def describe_dit_folders(checkpoint_dir: str) -> list[dict]:
    """Each DiT folder (``acestep-v15-*``, XL folders ``acestep-v15-xl-*`` included) with what its config.json
    says: ``{"name", "variant", "family" ("2B" or "XL"), "hidden_size"}``, or ``{"name", "error"}`` when the
    config.json does not parse."""
    out = []
    for name in list_dit_configs(checkpoint_dir):
        try:
            cfg = AceStepConfig.from_json(os.path.join(checkpoint_dir, name, "config.json"))
            out.append({"name": name, "variant": cfg.variant, "family": cfg.family, "hidden_size": cfg.hidden_size})
        except (ValueError, TypeError, OSError) as e:
            out.append({"name": name, "error": str(e)})
    return out


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
        out.update(read_tensors(path, {n: n for n in names}, device=device, dtype=dtype))
    return out


def read_tensors(path: str, names: dict[str, str], device="cpu",
                 dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """``{our name: tensor}`` for ``{our name: key in the file}``, reading only those tensors (safetensors maps the
    file, so a training run that needs only the decoder never reads the condition encoder's bytes)."""
    out = {}
    with safe_open(path, framework="pt", device=str(device)) as f:
        for name, key in names.items():
            t = f.get_tensor(key)
            out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def read_header(path: str) -> tuple[dict[str, tuple[str, tuple]], dict[str, str]]:
    """``({key: (dtype, shape)}, metadata)`` from a safetensors header, without reading any tensor data."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100 << 20:
                raise ValueError(f"header length {size}")
            header = json.loads(f.read(size))
        metadata = header.pop("__metadata__", None) or {}
        return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}, metadata
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"'{path}' is not a readable safetensors file ({e}). Re-download it.") from None


def check_state_keys(where: str, expected: dict[str, tuple], found: dict[str, tuple], hint: str) -> None:
    """Exact match of key sets and shapes, else a ValueError naming ``where`` (the file) and the keys."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where} does not match the expected layout: {len(missing)} missing keys "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). {hint}")
    for name in sorted(expected):
        if tuple(found[name]) != tuple(expected[name]):
            raise ValueError(f"{where}: '{name}' has shape {tuple(found[name])}, the config expects "
                             f"{tuple(expected[name])}. {hint}")


def component_prefixes(components: Iterable[str]) -> tuple:
    """State-dict key prefixes of model components (``null_condition_emb`` is a bare key)."""
    return tuple(c if c == "null_condition_emb" else c + "." for c in components)


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
    files = _weight_files(directory, f"DiT weights ({config_path})")
    shapes = {}
    for path in sorted(set(files.values())):
        shapes.update({k: shape for k, (_, shape) in read_header(path)[0].items()})
    wanted = component_prefixes(model.components)
    check_state_keys(f"{directory}/model.safetensors", {k: tuple(v.shape) for k, v in model.state_dict().items()},
                     {k: shapes[k] for k in files if k.startswith(wanted)},
                     "Is config.json from the same model as the weights?")
    state = read_safetensors(files, model.state_dict().keys(), device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


def load_silence_latent(checkpoint_dir: str, config_path: str = DEFAULT_CONFIG_PATH, device="cpu",
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The DiT's silence latent as [1, T_sil, 64] (stored as [1, 64, T_sil])."""
    path = require_file(os.path.join(dit_dir(checkpoint_dir, config_path), "silence_latent.pt"),
                        f"silence latent ({config_path})")
    return read_silence_latent(path, device, dtype)


def read_silence_latent(path: str, device="cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A ``silence_latent.pt`` file ([1, 64, T]) as [1, T, 64]."""
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


def file_identity(path: str) -> str:
    """``folder_identity`` of one file (its name, size and first/last MiB)."""
    return folder_identity(os.path.dirname(os.path.abspath(path)), [os.path.basename(path)])


def dit_identity(checkpoint_dir: str, config_path: str) -> str:
    """Fingerprint of a DiT folder's config, silence latent and weights (not its remote-code .py files)."""
    directory = dit_dir(checkpoint_dir, config_path)
    return folder_identity(directory, ["config.json", "silence_latent.pt"] + [
        n for n in os.listdir(directory) if n.endswith((".safetensors", ".safetensors.index.json"))])
