"""A training run on disk: its resumable state, the checkpoint folders, and what a request does with an output
folder (start fresh, continue a checkpoint, reuse a finished run, or refuse).

A checkpoint folder holds ``adapter/`` and a ComfyUI LoRA file (export.py), ``training_state.pt`` (a ``RunState``:
tensors and plain values only, loaded with ``weights_only=True``) and ``checkpoint.json`` (the few facts that
choose between checkpoints and runs, read without loading the optimizer-sized state).

The run signature holds every input that changes the trained adapter, plus ``TRAINING_VERSION``: a finished run
is reused only when all of it is equal, so a fix to training never hands back an old LoRA. What can be derived
from the finished adapter without training (comfy_dtype, lora_name, trigger_tag, loras_dir) is not part of it;
export.py re-exports those.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
from dataclasses import dataclass, field
from typing import Optional

import torch

STATE_FILE = "training_state.pt"
INFO_FILE = "checkpoint.json"
STATE_FORMAT = 1
# Bump when a change to objective.py, the training loop, the optimizer or the schedule changes what the same
# signature trains: finished runs of an older version are then trained again instead of reused.
# 2: each micro-batch's random draws are seeded from (seed, step, part) (seed_draws), not drawn in sequence.
TRAINING_VERSION = 2
IDENTITY_KEYS = ("lora_rank", "lora_alpha", "target_modules", "config_path")  # what a resume must keep


class TrainingStopped(RuntimeError):
    """Training cannot continue (NaN/inf loss, out of memory); the message says why and what to change."""


@dataclass
class Resumable:
    """Where a cancelled run stopped and the checkpoint that continues it."""

    epoch: int
    step: int
    checkpoint: str

    def message(self, how_to_continue: str) -> str:
        return (f"stopped at epoch {self.epoch} step {self.step}; resumable checkpoint: {self.checkpoint} — "
                f"{how_to_continue}")


class TrainingCancelled(Exception):
    """Cancel (the node) or Ctrl-C (the command line) stopped training at a step boundary, after a resumable
    checkpoint was saved (``resumable``)."""

    def __init__(self, resumable: Resumable):
        super().__init__(resumable.message("resume_from = latest continues it"))
        self.resumable = resumable


@dataclass
class Position:
    """Where training continues: ``epoch``, and inside it (``order`` not None) the batches ``order[next_batch:]``,
    the epoch's loss so far (sum, micro-batches) and the RNG states at that step boundary."""

    epoch: int
    next_batch: int = 0
    order: Optional[list] = None
    epoch_loss: tuple = (0.0, 0)
    rng: Optional[dict] = None


@dataclass
class RunState:
    """Everything a resumed run needs to continue exactly (training_state.pt; the keys of STATE_FORMAT 1)."""

    run_id: str
    epoch: int  # saved at the end of this epoch (epoch_order None) or inside it
    global_step: int
    next_batch: int
    epoch_order: Optional[list]
    optimizer: dict
    scheduler: dict
    scaler: Optional[dict]
    rng: dict
    data_rng: torch.Tensor
    history: list  # [step, loss, lr] per optimizer step
    epoch_log: list  # train_log.jsonl's epoch entries
    epoch_loss: tuple
    identity: dict
    signature: dict
    settings: dict  # the schedule's inputs when saved (train_epochs, batch_size, ..., dataset_size, trigger_tag)
    dataset_keys: Optional[list] = None  # each sample's cache key, in dataset order
    steps_per_epoch: int = 0
    notes: list = field(default_factory=list)  # {"note", "epoch", "step"} lines of train_log.jsonl
    epoch_loras: list = field(default_factory=list)  # periodic LoRAs published in loras_dir
    lora_file: str = ""  # the ComfyUI file in the checkpoint folder
    format: int = STATE_FORMAT

    @property
    def position(self) -> Position:
        if self.epoch_order is None:  # saved at the end of an epoch
            return Position(self.epoch + 1)
        return Position(self.epoch, self.next_batch, self.epoch_order, tuple(self.epoch_loss))

    def info(self) -> dict:
        return {"run_id": self.run_id, "epoch": self.epoch, "global_step": self.global_step,
                "complete_epoch": self.epoch_order is None, **self.identity, "signature": self.signature,
                "lora_file": self.lora_file}

    def save(self, directory: str) -> None:
        """Into a folder being built (fileio.atomic_directory swaps it in whole)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # not asdict: it copies tensors
        torch.save(values, os.path.join(directory, STATE_FILE))
        with open(os.path.join(directory, INFO_FILE), "w", encoding="utf-8") as f:
            json.dump(self.info(), f, indent=2)

    @classmethod
    def load(cls, directory: str, role: str = "resume_from") -> RunState:
        """``role`` names the folder in errors (what the user set that led here)."""
        path = os.path.join(directory, STATE_FILE)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch's own text would ask whether to trust the file and run it: never
            text = str(e)
            refused = isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text
            why = ("it holds Python objects other than tensors and plain values" if refused else
                   f"unreadable: {(text.splitlines() or [type(e).__name__])[0][:200]}")
            raise ValueError(_not_ours(role, directory, path, why)) from None
        fields = dataclasses.fields(cls)
        required = [f.name for f in fields
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if not isinstance(data, dict) or name not in data]
        if missing:
            raise ValueError(_not_ours(role, directory, path, f"no {', '.join(missing[:4])}"))
        state = cls(**{f.name: data[f.name] for f in fields if f.name in data})
        if state.format != STATE_FORMAT:
            raise ValueError(f"{role} '{directory}': unknown checkpoint format {state.format} (written by another "
                             "version of acestep-lora).")
        return state

    def check_identity(self, directory: str, identity: dict) -> None:
        diffs = [f"{k}: checkpoint {self.identity.get(k)!r}, now {identity[k]!r}" for k in identity
                 if self.identity.get(k) != identity[k]]
        if diffs:
            raise ValueError(f"resume_from '{directory}' was trained with other settings ({'; '.join(diffs)}). "
                             "Use the checkpoint's settings to continue it, or leave resume_from empty for a new run.")


def _not_ours(role: str, directory: str, path: str, why: str) -> str:
    return (f"{role} '{directory}': {path} is not a training state this pack wrote, or it is damaged ({why}). "
            "It was not executed: only tensors and plain values are ever loaded from it. Choose another checkpoint "
            "folder, or leave resume_from empty to start a new run.")


def run_signature(cfg, sampling: str, dataset: str, base_model: str, compute: str, world_size: int = 1) -> dict:
    """Everything that determines the trained adapter: same signature, same result. ``cfg``: a TrainConfig;
    ``world_size``: the number of training processes (distributed.py)."""
    return {"training_version": TRAINING_VERSION, "config_path": os.path.basename(os.path.normpath(cfg.config_path)),
            "base_model": base_model, "compute": compute, "world_size": world_size, "lora_rank": cfg.lora_rank,
            "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout, "learning_rate": cfg.learning_rate, "train_epochs": cfg.train_epochs,
            "batch_size": cfg.batch_size, "gradient_accumulation": cfg.gradient_accumulation, "seed": cfg.seed,
            "target_modules": sorted({t.strip() for t in cfg.target_modules.split(",") if t.strip()}),
            "timestep_sampling": sampling, "cfg_dropout": cfg.cfg_dropout, "warmup_steps": cfg.warmup_steps,
            "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm, "dataset": dataset}


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint folders

def find_checkpoints(output_dir: str) -> list[str]:
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, d) for d in sorted(os.listdir(root))
            if not d.startswith(".") and os.path.isfile(os.path.join(root, d, STATE_FILE))]


def read_info(directory: str) -> dict:
    """checkpoint.json beside a training state (steps, epoch, identity, signature), read instead of the state
    itself, which holds the optimizer and can be hundreds of MB; falls back to the state if it is missing."""
    try:
        with open(os.path.join(directory, INFO_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return RunState.load(directory, role="checkpoint").info()


def _rank(directory: str) -> tuple:
    """(optimizer steps, saved at an epoch end): how 'latest' orders checkpoints."""
    info = read_info(directory)
    return info["global_step"], info["complete_epoch"]


def latest_checkpoint(output_dir: str, include_final: bool = True) -> Optional[str]:
    candidates = find_checkpoints(output_dir)
    final = os.path.join(output_dir, "final")
    if include_final and os.path.isfile(os.path.join(final, STATE_FILE)):
        candidates.append(final)
    return max(candidates, key=_rank) if candidates else None


def resolve_resume(resume_from: str, output_dir: str) -> Optional[str]:
    """'' -> None; 'latest' -> the checkpoint with the most optimizer steps in output_dir (incl. final/)."""
    text = (resume_from or "").strip()
    if not text:
        return None
    if text.lower() == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            raise FileNotFoundError(f"resume_from 'latest': no checkpoint found in '{output_dir}/checkpoints'. "
                                    "Leave resume_from empty to start a new run.")
        return found
    path = os.path.expanduser(text)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    raise FileNotFoundError(f"resume_from '{text}' is not a training checkpoint (a folder with {STATE_FILE}, e.g. "
                            f"'{output_dir}/checkpoints/epoch_200'), nor 'latest'.")


def plan(output_dir: str, resume_from: str, signature: dict) -> tuple[Optional[str], Optional[str]]:
    """-> (checkpoint to continue, finished run folder to reuse); at most one is set, neither for a fresh run.

    A finished run with exactly this signature is reused (re-queuing a workflow must not fail or retrain);
    anything else already in output_dir is never overwritten: FileExistsError says what to do."""
    resume = resolve_resume(resume_from, output_dir)
    if resume is not None:
        return resume, None
    final = os.path.join(output_dir, "final")
    if os.path.isfile(os.path.join(final, STATE_FILE)):
        old = read_info(final).get("signature") or {}
        if old == signature:
            return None, final
        changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in signature.items() if old.get(k) != v]
        why = " — this version of the pack trains differently" if old.get("training_version") != TRAINING_VERSION \
            else ""
        raise FileExistsError(
            f"output_dir '{output_dir}' already holds a finished run with other settings "
            f"({'; '.join(changed[:4]) or 'unknown'}{why}). Choose another output_dir for a new run, or set "
            "resume_from to 'latest' to continue this one (e.g. after raising train_epochs). Nothing was "
            "overwritten.")
    if find_checkpoints(output_dir):
        raise FileExistsError(
            f"output_dir '{output_dir}' already holds an unfinished training run. Set resume_from to "
            "'latest' to continue it, or choose another output_dir for a new run (nothing was overwritten).")
    return None, None


# ---------------------------------------------------------------------------------------------------------------
# Resuming on the dataset and settings as they are now

@dataclass
class Continuation:
    position: Position
    total_steps: int
    note: Optional[str]  # for the log and train_log.jsonl when the schedule changed


def continue_on(state: RunState, position: Position, keys: Optional[list], dataset: str, dataset_size: int,
                cfg, steps_per_epoch: int, world_size: int = 1) -> Continuation:
    """Continue ``state`` on the dataset (``keys``: each sample's cache key; ``dataset``: its fingerprint) and the
    settings (``cfg``, ``world_size`` processes) as they are now.

    Unchanged, nothing moves and the run continues bit for bit. Changed (samples removed or added since the
    checkpoint): the rest of an interrupted epoch keeps the samples that still exist, found by their key
    (removed ones are dropped), new samples join from the next epoch, and the total step count — steps done +
    the rest of this epoch + the remaining epochs x the new steps per epoch — is recomputed (as it is when
    train_epochs, batch_size, gradient_accumulation or the number of processes changed); the caller recomputes the
    schedule over it. The position is one in the run's global order of micro-batches, whatever the number of
    processes: the same global batch (processes x gradient_accumulation) continues the same training."""
    saved, order, next_batch = state.dataset_keys, position.order, position.next_batch
    keyed = saved is not None and keys is not None
    changed = saved != keys if keyed else state.signature.get("dataset") != dataset
    what = ""
    if changed:
        if keyed:
            gone, new = set(saved) - set(keys), set(keys) - set(saved)
            what = f"{len(gone)} sample{'' if len(gone) == 1 else 's'} removed, {len(new)} added"
        else:
            what = f"{state.settings['dataset_size']} -> {dataset_size} samples"
        if order is not None:
            if keyed:
                where = {key: i for i, key in enumerate(keys)}
                rest = [[where[saved[i]] for i in batch if saved[i] in where] for batch in order[next_batch:]]
                order = [batch for batch in rest if batch]
            else:  # which samples the rest of that epoch held is unknown (an older checkpoint): it ends here
                order = []
                what += "; the interrupted epoch ends here"
            next_batch = 0
    rest = 0
    if order is not None and position.epoch <= cfg.train_epochs:
        rest = math.ceil((len(order) - next_batch) / (cfg.gradient_accumulation * world_size))
    later = max(0, cfg.train_epochs - position.epoch + (1 if order is None else 0))
    total = state.global_step + rest + later * steps_per_epoch
    moved = dataclasses.replace(position, order=order, next_batch=next_batch)
    was, was_world = state.settings, state.settings.get("world_size", 1)
    settings = [f"{k} {was.get(k)} -> {getattr(cfg, k)}" for k in ("train_epochs", "batch_size",
                                                                     "gradient_accumulation")
                if was.get(k) != getattr(cfg, k)]
    if was_world != world_size:
        settings.append(f"processes {was_world} -> {world_size} (global batch "
                        f"{was_world * was['batch_size'] * was['gradient_accumulation']} -> "
                        f"{world_size * cfg.batch_size * cfg.gradient_accumulation} samples)")
    if not changed and not settings:
        return Continuation(moved, total, None)
    old_steps = state.steps_per_epoch or math.ceil(math.ceil(was["dataset_size"] / was["batch_size"])
                                                   / (was["gradient_accumulation"] * was_world))
    reasons = ([f"dataset changed since the checkpoint: {what}"] if changed else []) + settings
    note = (f"{'; '.join(reasons)}; {old_steps} -> {steps_per_epoch} steps per epoch, {total} steps in all; "
            "schedule recomputed")
    return Continuation(moved, total, note)


# ---------------------------------------------------------------------------------------------------------------
# Random number generators

def seed_draws(seed: int, step: int, part: int, device: torch.device, noise_gen: torch.Generator) -> None:
    """Seed the random draws of micro-batch ``part`` of optimizer step ``step`` from (seed, step, part) alone: the
    noise, timesteps and condition dropout (``noise_gen``) and the LoRA dropout masks (``device``'s default
    generator). A micro-batch so draws the same in whichever process computes it (distributed.py) and after any
    resume; nothing drawn between steps (an epoch hook's) changes training."""
    draws = _mix(seed, step, part)
    noise_gen.manual_seed(draws)
    dropout = _mix(draws, 1)  # another stream: a CUDA noise generator and the default one share the algorithm
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None
                                      else torch.cuda.current_device()].manual_seed(dropout)
    elif device.type == "mps":
        torch.mps.manual_seed(dropout)
    else:
        torch.default_generator.manual_seed(dropout)


def _mix(*values: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 over each in turn)."""
    mask, h = 2 ** 64 - 1, 0
    for v in values:
        h = (h ^ (v & mask)) + 0x9E3779B97F4A7C15 & mask
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & mask
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & mask
        h ^= h >> 31
    return h >> 1


def rng_snapshot(device: torch.device, noise_gen: torch.Generator) -> dict:
    """The global CPU RNG, the noise generator, and CUDA's RNG on a GPU (every micro-batch reseeds the ones training
    draws from, seed_draws; the snapshot keeps the rest of the process as it was)."""
    snap = {"torch": torch.get_rng_state(), "noise": noise_gen.get_state()}
    if device.type == "cuda":
        snap["cuda"] = torch.cuda.get_rng_state(device)
    return snap


def restore_rng(snap: dict, device: torch.device, noise_gen: torch.Generator) -> None:
    torch.set_rng_state(snap["torch"])
    noise_gen.set_state(snap["noise"])
    if "cuda" in snap and device.type == "cuda":
        torch.cuda.set_rng_state(snap["cuda"], device)
