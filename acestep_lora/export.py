"""A run's LoRA for people: the checkpoint folder's LoRA files, the copies where ComfyUI's loaders list them, the
re-export of a finished run in another dtype or under another name, and the run's result with its summary.

Files (lora_io.py has their formats): ``adapter/`` (PEFT: kaola's nodes, the official app; fp32) and one ComfyUI
file with alpha baked in, in ``comfy_dtype``. The final file goes to ``<loras_dir>/<lora_name>.safetensors`` (or
``output_dir`` without a loras_dir); each periodic checkpoint's to ``<loras_dir>/<lora_name>/epoch_<N>.safetensors``.
A file of another run is never replaced (``_2``, ``_3``... instead). Everything here can be redone from the fp32
adapter alone, which is why comfy_dtype, lora_name, trigger_tag and loras_dir are not part of the run signature.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import lora
from .lora_io import PEFT_WEIGHTS_NAME, lora_pairs, publish_copy, save_comfy_lora, unique_path
from .run_state import RunState

log = logging.getLogger("acestep_lora.export")


@dataclass
class TrainResult:
    output_dir: str
    adapter_dir: str
    comfy_lora_path: str
    epochs: int
    steps: int
    final_loss: float
    log: str
    run_id: str
    summary: str = ""
    trigger_tag: str = ""
    history: list = field(default_factory=list)
    epoch_loras: list = field(default_factory=list)  # the periodic checkpoints' files published in loras_dir


def lora_name_for(lora_name: str, output_dir: str) -> str:
    """The typed name, else the output folder's name, as a safe file name."""
    name = lora_name.strip() or os.path.basename(os.path.normpath(output_dir)) or "acestep_lora"
    return re.sub(r"[^\w.-]+", "_", name)


def lora_metadata(run_id: str, cfg, variant: str, targets: list, sampling: str, epochs: int, steps: int,
                  dataset_size: int, trigger_tag: str, processes: int = 1) -> dict:
    """The ComfyUI file's safetensors metadata: what the LoRA is and how it was trained (``cfg``: TrainConfig;
    ``processes``: how many trained it together, distributed.py)."""
    return {"format": "pt", "acestep_lora.run_id": run_id, "acestep_lora.rank": str(cfg.lora_rank),
            "acestep_lora.alpha": f"{cfg.lora_alpha:g}",
            "acestep_lora.base_config": os.path.basename(os.path.normpath(cfg.config_path)),
            "acestep_lora.variant": variant, "acestep_lora.epochs": str(epochs), "acestep_lora.steps": str(steps),
            "acestep_lora.dataset_size": str(dataset_size), "acestep_lora.trigger_tag": trigger_tag,
            "acestep_lora.target_modules": ",".join(targets), "acestep_lora.timestep_sampling": sampling,
            "acestep_lora.learning_rate": str(cfg.learning_rate), "acestep_lora.processes": str(processes)}


def write_lora_files(directory: str, layers: dict, targets: list, rank: int, alpha: float, dropout: float,
                     comfy_name: str, metadata: dict, comfy_dtype: str) -> None:
    """``adapter/`` (PEFT, fp32) and the ComfyUI file ``comfy_name`` into a checkpoint folder being built."""
    lora.save_peft_adapter(os.path.join(directory, "adapter"), layers, targets, rank, alpha, dropout)
    save_comfy_lora(os.path.join(directory, comfy_name), lora.pairs(layers), alpha, metadata,
                    getattr(torch, comfy_dtype))


def epoch_lora_path(loras_dir: str, lora_name: str, epoch: int, run_id: str) -> str:
    return unique_path(os.path.join(loras_dir, lora_name), f"epoch_{epoch}", same_run=run_id)


def final_lora_path(loras_dir: Optional[str], output_dir: str, lora_name: str, run_id: str) -> str:
    return unique_path(loras_dir or output_dir, lora_name, same_run=run_id)


def publish(source: str, target: str) -> str:
    """Copy a checkpoint's ComfyUI file to where the loaders list it (atomically; nothing when it is the same)."""
    if os.path.abspath(source) != os.path.abspath(target):
        publish_copy(source, target)
    return target


def reexport(final_dir: str, lora_file: str, target: str, comfy_dtype: str, trigger_tag: str) -> str:
    """Make ``target`` the finished run's ComfyUI file in ``comfy_dtype`` with ``trigger_tag``, rebuilt from the
    fp32 adapter when the file there is missing or differs (another dtype, tag or name asked on a re-queue)."""
    _, metadata = _facts(os.path.join(final_dir, lora_file))
    metadata["acestep_lora.trigger_tag"] = trigger_tag
    dtype = getattr(torch, comfy_dtype)
    if os.path.isfile(target) and _facts(target) == (dtype, metadata):
        return target
    from safetensors.torch import load_file

    pairs = lora_pairs(load_file(os.path.join(final_dir, "adapter", PEFT_WEIGHTS_NAME)))
    save_comfy_lora(target, pairs, float(metadata["acestep_lora.alpha"]), metadata, dtype)
    log.info(f"re-exported the finished run's LoRA ({comfy_dtype}): {target}")
    return target


def _facts(path: str) -> tuple:
    """(weights dtype, metadata) of a ComfyUI LoRA file, without reading all of it."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        key = next(k for k in f.keys() if not k.endswith(".alpha"))
        return f.get_tensor(key).dtype, dict(f.metadata() or {})


def files_text(adapter_dir: str, comfy_path: str, epoch_loras: list, loras_dir: Optional[str]) -> str:
    """Where the run's files are, for the summary."""
    lines = [f"PEFT adapter: {adapter_dir}", f"ComfyUI LoRA: {comfy_path}"]
    if epoch_loras:
        names = [os.path.relpath(p, loras_dir) if loras_dir else p for p in epoch_loras]
        shown = names if len(names) <= 8 else [*names[:3], "...", *names[-3:]]
        lines.append(f"per-epoch LoRAs ({len(names)}) in {loras_dir}: {', '.join(shown)}")
    return "\n".join(lines)


def reuse_finished(final_dir: str, cfg, lora_name: str, trigger_tag: str) -> TrainResult:
    """The finished run in ``final_dir`` (same signature) as the result of this request, its ComfyUI file in the
    dtype and under the name asked now (``cfg``: TrainConfig)."""
    state = RunState.load(final_dir, role="the finished run")
    trigger_tag = cfg.trigger_tag or state.settings.get("trigger_tag") or trigger_tag
    comfy_path = reexport(final_dir, state.lora_file, final_lora_path(cfg.loras_dir, cfg.output_dir, lora_name,
                                                                       state.run_id), cfg.comfy_dtype, trigger_tag)
    final_loss = state.epoch_log[-1]["loss"] if state.epoch_log else float("nan")
    epoch_loras = [p for p in state.epoch_loras if os.path.isfile(p)]
    adapter = os.path.join(final_dir, "adapter")
    summary = (f"already trained with these settings: reused {final_dir} (choose another output_dir, or delete "
               "this one, to train again; raise train_epochs with resume_from = latest to train longer)\n"
               + files_text(adapter, comfy_path, epoch_loras, cfg.loras_dir))
    log.info(summary)
    return TrainResult(cfg.output_dir, adapter, comfy_path, state.epoch, state.global_step, final_loss, summary,
                       state.run_id, summary, trigger_tag, list(state.history), epoch_loras)
