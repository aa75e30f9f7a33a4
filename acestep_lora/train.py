"""The LoRA training engine (spec §4): PEFT LoRA on the DiT decoder, flow-matching loss, resumable checkpoints.

Follows the official trainer's objective and schedule, and fixes what it gets wrong:
- turbo configs: t drawn from the 8 discrete shift-3 timesteps (official); base/sft: the max of two logit-normal
  draws (mu, sigma from config.json) with condition dropout through ``null_condition_emb`` (the newer official
  trainer), so base/sft are trained the way they were pre-trained;
- LoRA weights and AdamW state stay fp32 (the official trainer casts them to bf16); compute runs under bf16
  autocast on CUDA, fp16 on MPS, fp32 on CPU; the frozen base weights are stored in the compute dtype;
- resume restores the LoRA weights too (the official trainer and the FL pack silently restart them), plus
  optimizer, scheduler, step and every RNG, so a resumed run reproduces the uninterrupted one exactly on CPU;
- padded frames are masked out of the loss and padded keys out of attention, so a padded batch computes what
  each of its samples computes alone; batches group samples of similar length;
- Cancel (or running out of memory) saves a resumable checkpoint before the error propagates; a NaN/inf loss
  stops training and leaves the last good checkpoint untouched;
- resuming after samples were removed or added continues on the dataset as it is now: samples are recognised by
  Prepare's cache key, the step count and learning-rate schedule are recomputed, and the log says so;
- the loss is read back to the host only every ``log_every`` optimizer steps, never every step.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import lora
from .checkpoint import dit_dir, load_config, load_dit
from .data import Batch, TensorDataset, collate, make_batches
from .console import say
from .device import compute_dtype, release_memory, resolve_device
from .fileio import atomic_directory, atomic_write_text
from .lora_io import publish_copy, save_comfy_lora, unique_path

TURBO_SHIFT3_TIMESTEPS = (1.0, 0.9545454545454546, 0.9, 0.8333333333333334, 0.75, 0.6428571428571429, 0.5, 0.3)
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj"
TIMESTEP_SAMPLING = ("auto", "turbo_discrete", "logit_normal")
STATE_FILE = "training_state.pt"
STATE_FORMAT = 1


class TrainingStopped(RuntimeError):
    """Training cannot continue (NaN/inf loss, out of memory); the message says why and what to change."""


@dataclass
class Resumable:
    """Where a cancelled run stopped. Attached to the Cancel / Ctrl-C exception as ``error.resumable`` once the
    checkpoint is saved, so whoever started the run (node, command line) tells the user how to continue."""

    epoch: int
    step: int
    checkpoint: str

    def message(self, how_to_continue: str) -> str:
        return (f"stopped at epoch {self.epoch} step {self.step}; resumable checkpoint: {self.checkpoint} — "
                f"{how_to_continue}")


from .options import TrainConfig  # noqa: E402  (declared in the option table with its node and CLI facts)


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


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers (unit-tested on their own)


def lr_factor(step: int, total_steps: int, warmup: int, eta_min_ratio: float = 0.01) -> float:
    """Official schedule: linear warm-up 0.1 -> 1 over ``warmup`` steps, then cosine to 1% (warm restarts
    with period total - warmup, i.e. a single cycle over the run)."""
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    period = max(1, total_steps - warmup)
    cur = (step - warmup) % period
    return eta_min_ratio + (1 - eta_min_ratio) * (1 + math.cos(math.pi * cur / period)) / 2


def warmup_for(total_steps: int, warmup_steps: int) -> int:
    return min(warmup_steps, max(1, total_steps // 10))


def parse_targets(text: str, valid: set[str]) -> list[str]:
    targets = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not targets:
        raise ValueError(f"target_modules is empty; use e.g. '{DEFAULT_TARGETS}'. Valid names: "
                         f"{', '.join(sorted(valid))}.")
    unknown = [t for t in targets if t not in valid]
    if unknown:
        raise ValueError(f"target_modules: {', '.join(unknown)} not found in the decoder. Valid names: "
                         f"{', '.join(sorted(valid))}.")
    return sorted(dict.fromkeys(targets))


def decoder_linear_names(decoder: torch.nn.Module) -> set[str]:
    """Names a LoRA can target: leaf names of the decoder's transformer Linears (q_proj, ..., down_proj)."""
    return {name.split(".")[-1] for name, m in decoder.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith("layers.")}


def resolve_sampling(mode: str, variant: str) -> str:
    if mode not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep_sampling '{mode}' is not one of {', '.join(TIMESTEP_SAMPLING)}.")
    if mode == "auto":
        return "turbo_discrete" if variant == "turbo" else "logit_normal"
    return mode


def find_checkpoints(output_dir: str) -> list[str]:
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, d) for d in sorted(os.listdir(root))
            if not d.startswith(".") and os.path.isfile(os.path.join(root, d, STATE_FILE))]


def resolve_resume(resume_from: str, output_dir: str) -> Optional[str]:
    """'' -> None; 'latest' -> the checkpoint with the most optimizer steps in output_dir (incl. final/)."""
    text = (resume_from or "").strip()
    if not text:
        return None
    if text.lower() == "latest":
        candidates = find_checkpoints(output_dir)
        final = os.path.join(output_dir, "final")
        if os.path.isfile(os.path.join(final, STATE_FILE)):
            candidates.append(final)
        if not candidates:
            raise FileNotFoundError(f"resume_from 'latest': no checkpoint found in '{output_dir}/checkpoints'. "
                                    "Leave resume_from empty to start a new run.")
        return max(candidates, key=_checkpoint_rank)
    path = os.path.expanduser(text)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    raise FileNotFoundError(f"resume_from '{text}' is not a training checkpoint (a folder with {STATE_FILE}, e.g. "
                            f"'{output_dir}/checkpoints/epoch_200'), nor 'latest'.")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _checkpoint_info(directory: str) -> dict:
    """The small checkpoint.json beside a training state (steps, epoch, identity, signature): read instead of the
    state itself, which holds the optimizer and can be hundreds of MB. Falls back to the state if it is missing."""
    try:
        with open(os.path.join(directory, "checkpoint.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        state = _read_state(directory)
        return {"global_step": state["global_step"], "complete_epoch": state["epoch_order"] is None,
                "signature": state.get("signature")}


def _checkpoint_rank(directory: str) -> tuple:
    """(optimizer steps, saved at an epoch end): how 'latest' orders checkpoints."""
    info = _checkpoint_info(directory)
    return info["global_step"], info["complete_epoch"]


def _grad_scaler(device: torch.device):
    """Loss scaling for fp16 autocast (MPS, old CUDA GPUs); None where this torch has no scaler for the device."""
    try:
        return torch.amp.GradScaler(device.type)
    except (RuntimeError, ValueError, TypeError):
        say(f"no fp16 gradient scaler for {device.type} in this torch; training without one")
        return None


def _read_state(directory: str) -> dict:
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: TrainConfig, progress: Optional[Callable[[dict], None]] = None,
                 check_cancel: Optional[Callable[[], None]] = None):
        self.cfg, self.progress, self.check_cancel = cfg, progress, check_cancel
        self._validate_numbers()
        self.device = resolve_device(cfg.device)
        self.dtype = compute_dtype(self.device)
        dit_dir(cfg.checkpoint_dir, cfg.config_path)
        self.model_cfg = load_config(cfg.checkpoint_dir, cfg.config_path)
        self.data = TensorDataset(cfg.tensor_dir)
        self._check_dataset()
        self.sample_keys = self._sample_keys()
        self.sampling = resolve_sampling(cfg.timestep_sampling, self.model_cfg.variant)
        self.lora_name = cfg.lora_name.strip() or os.path.basename(os.path.normpath(cfg.output_dir)) or "acestep_lora"
        self.lora_name = re.sub(r"[^\w.-]+", "_", self.lora_name)
        self.trigger_tag = cfg.trigger_tag or (self.data.manifest.get("metadata") or {}).get("custom_tag", "")
        self.resume_dir = resolve_resume(cfg.resume_from, cfg.output_dir)
        self.finished_state = None
        if self.resume_dir is None:
            self._check_fresh_output_dir()

    def _sample_keys(self) -> Optional[list]:
        """Each sample's identity (Prepare's ``cache_key``) in dataset order; None when the manifest lacks them."""
        keys = [entry.get("cache_key") for entry in self.data.manifest.get("samples_info") or []]
        if len(keys) != len(self.data) or not all(keys) or len(set(keys)) != len(keys):
            return None
        return keys

    def _signature(self) -> dict:
        """Everything that determines the trained LoRA: same signature, same result."""
        c = self.cfg
        samples = self.data.manifest.get("samples_info") or self.data.manifest.get("samples")
        return {"config_path": os.path.basename(os.path.normpath(c.config_path)), "lora_rank": c.lora_rank,
                "lora_alpha": c.lora_alpha, "lora_dropout": c.lora_dropout, "learning_rate": c.learning_rate,
                "train_epochs": c.train_epochs, "batch_size": c.batch_size,
                "gradient_accumulation": c.gradient_accumulation, "seed": c.seed,
                "target_modules": sorted({t.strip() for t in c.target_modules.split(",") if t.strip()}),
                "timestep_sampling": self.sampling, "cfg_dropout": c.cfg_dropout, "warmup_steps": c.warmup_steps,
                "weight_decay": c.weight_decay, "max_grad_norm": c.max_grad_norm,
                "dataset": hashlib.sha256(json.dumps(samples, sort_keys=True).encode()).hexdigest()[:16]}

    def _check_fresh_output_dir(self):
        """A finished run with exactly these settings is reused (re-queuing a workflow must not fail or retrain);
        anything else in output_dir is never overwritten."""
        cfg = self.cfg
        final = os.path.join(cfg.output_dir, "final")
        if os.path.isfile(os.path.join(final, STATE_FILE)):
            old = _checkpoint_info(final).get("signature") or {}
            if old == self._signature():
                self.finished_state = _read_state(final)  # the full state (optimizer included) only when reused
                return
            changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in self._signature().items() if old.get(k) != v]
            raise FileExistsError(
                f"output_dir '{cfg.output_dir}' already holds a finished run with other settings "
                f"({'; '.join(changed[:4]) or 'unknown'}). Choose another output_dir for a new run, or set "
                "resume_from to 'latest' to continue this one (e.g. after raising train_epochs). Nothing was "
                "overwritten.")
        if find_checkpoints(cfg.output_dir):
            raise FileExistsError(
                f"output_dir '{cfg.output_dir}' already holds an unfinished training run. Set resume_from to "
                "'latest' to continue it, or choose another output_dir for a new run (nothing was overwritten).")

    # -- validation --------------------------------------------------------------------------------------------
    def _validate_numbers(self):
        c = self.cfg
        checks = [(c.lora_rank >= 1, f"lora_rank must be >= 1 (got {c.lora_rank})"),
                  (c.lora_alpha > 0, f"lora_alpha must be > 0 (got {c.lora_alpha})"),
                  (0 <= c.lora_dropout < 1, f"lora_dropout must be in [0, 1) (got {c.lora_dropout})"),
                  (c.learning_rate > 0, f"learning_rate must be > 0 (got {c.learning_rate})"),
                  (c.train_epochs >= 1, f"train_epochs must be >= 1 (got {c.train_epochs})"),
                  (c.batch_size >= 1, f"batch_size must be >= 1 (got {c.batch_size})"),
                  (c.gradient_accumulation >= 1, f"gradient_accumulation must be >= 1 (got {c.gradient_accumulation})"),
                  (c.save_every_n_epochs >= 0, f"save_every_n_epochs must be >= 0 (got {c.save_every_n_epochs})"),
                  (0 <= c.cfg_dropout < 1, f"cfg_dropout must be in [0, 1) (got {c.cfg_dropout})"),
                  (c.gradient_checkpointing in ("auto", "on", "off"),
                   f"gradient_checkpointing must be auto, on or off (got {c.gradient_checkpointing})"),
                  (c.comfy_dtype in ("bfloat16", "float16", "float32"),
                   f"comfy_dtype must be bfloat16, float16 or float32 (got {c.comfy_dtype})")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def _check_dataset(self):
        cfg, manifest = self.cfg, self.data.manifest
        prepared_with = (manifest.get("checkpoint") or {}).get("config_path")
        wanted = os.path.basename(os.path.normpath(cfg.config_path))
        if prepared_with and prepared_with != wanted:
            raise ValueError(f"tensor_dir '{cfg.tensor_dir}' was prepared with config_path '{prepared_with}', but "
                             f"training uses '{wanted}'. Train with '{prepared_with}' or run Prepare again with "
                             f"'{wanted}' (the conditioning comes from that model's encoder).")
        width = self.model_cfg.encoder_hidden_size or self.model_cfg.hidden_size
        if self.data.condition_width != width:
            raise ValueError(f"tensor_dir '{cfg.tensor_dir}' holds conditioning of width {self.data.condition_width}, "
                             f"but '{wanted}' expects {width}: the tensors come from another model. Run Prepare "
                             "again with this checkpoint.")
        if cfg.batch_size > len(self.data):
            raise ValueError(f"batch_size {cfg.batch_size} is larger than the dataset ({len(self.data)} samples); "
                             f"use batch_size <= {len(self.data)} or add samples.")

    # -- set-up ------------------------------------------------------------------------------------------------
    def _build(self):
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        model = self._load_model()
        self.null_condition = model.null_condition_emb.detach()
        decoder = model.decoder
        self.targets = parse_targets(cfg.target_modules, decoder_linear_names(decoder))
        # LoRA weights (and so AdamW state) are fp32 whatever the compute dtype; the frozen base stays as loaded.
        self.lora_layers = lora.inject(decoder, self.targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        self.net = decoder
        self.net.gradient_checkpointing = self._use_checkpointing()
        self.net.train()
        self.params = lora.lora_parameters(self.lora_layers)

        # Fused AdamW (CUDA, CPU): one kernel for all parameters, no per-parameter .item() host syncs.
        fused = self.device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                           fused=fused or None, foreach=None if fused else True)
        self.batches_per_epoch = math.ceil(len(self.data) / cfg.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.gradient_accumulation)
        self.total_steps = self.steps_per_epoch * cfg.train_epochs
        self.warmup = warmup_for(self.total_steps, cfg.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, self.warmup))
        self.scaler = _grad_scaler(self.device) if self.dtype == torch.float16 else None
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.turbo_table = torch.tensor(TURBO_SHIFT3_TIMESTEPS, device=self.device, dtype=self.dtype)
        self.data.to(self.device, self.dtype)
        self._reset_progress()

    def _reset_progress(self):
        """Counters, logs and pending (not yet read back) losses of a fresh run; resume overwrites the first ones."""
        self.run_id = uuid.uuid4().hex[:12]
        self.step, self.history, self.epoch_log, self.log_lines = 0, [], [], []
        self.notes = []  # {"note", "epoch", "step"}: events train_log.jsonl records between the epochs
        self.epoch_loras = []  # periodic checkpoints' LoRA files published in loras_dir
        self.pending_steps = []  # (step, loss tensor, lr): not yet read back from the device
        self.pending_epochs = []  # (epoch, loss-sum tensor, micro-batches, lr, seconds)
        self.epoch_loss_snapshot = (0.0, 0)
        self.started, self.steps_at_start, self.last_print = time.time(), 0, 0.0
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.current_epoch = 1

    def _load_model(self):
        """Only what training needs: the decoder and the null condition (no encoder, tokenizer, VAE, LM)."""
        return load_dit(self.cfg.checkpoint_dir, self.cfg.config_path, device=self.device, dtype=self.dtype,
                        components=("decoder", "null_condition_emb"))

    def _use_checkpointing(self) -> bool:
        mode = self.cfg.gradient_checkpointing
        if mode != "auto":
            return mode == "on"
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).total_memory < 20 * 2 ** 30
        return self.device.type == "mps"

    # -- one micro-batch ---------------------------------------------------------------------------------------
    def _timesteps(self, n: int) -> torch.Tensor:
        if self.sampling == "turbo_discrete":
            idx = torch.randint(0, len(TURBO_SHIFT3_TIMESTEPS), (n,), generator=self.noise_gen, device=self.device)
            return self.turbo_table[idx]
        mu, sigma = self.model_cfg.timestep_mu, self.model_cfg.timestep_sigma
        draws = torch.randn((2, n), generator=self.noise_gen, device=self.device, dtype=self.dtype)
        return torch.sigmoid(draws * sigma + mu).amax(dim=0)  # t = max of two logit-normal draws, r = t

    def _loss(self, batch: Batch) -> torch.Tensor:
        if batch.target_latents.device != self.device:  # dataset too large to stage on the GPU
            batch = batch.to(self.device)
        x0 = batch.target_latents
        n = x0.shape[0]
        noise = torch.randn(x0.shape, generator=self.noise_gen, device=self.device, dtype=x0.dtype)
        t = self._timesteps(n)
        xt = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
        condition = batch.encoder_hidden_states
        if self.sampling == "logit_normal" and self.cfg.cfg_dropout > 0:
            keep = torch.rand(n, generator=self.noise_gen, device=self.device) >= self.cfg.cfg_dropout
            condition = torch.where(keep[:, None, None], condition, self.null_condition.expand_as(condition))
        padded = batch.frame_mask is not None or batch.encoder_mask is not None
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            pred = self.net(hidden_states=xt, timestep=t, timestep_r=t, attention_mask=batch.frame_mask,
                            encoder_hidden_states=condition, encoder_attention_mask=batch.encoder_mask,
                            context_latents=batch.context_latents, mask_padding=padded)[0]
        err = (pred.float() - (noise - x0).float()).pow(2)
        if batch.frame_mask is None:
            return err.mean()
        mask = batch.frame_mask.float()[:, :, None]
        return (err * mask).sum() / (mask.sum() * err.shape[-1])

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _rng_snapshot(self) -> dict:
        snap = {"torch": torch.get_rng_state(), "noise": self.noise_gen.get_state()}
        if self.device.type == "cuda":
            snap["cuda"] = torch.cuda.get_rng_state(self.device)
        return snap

    def _restore_rng(self, snap: dict):
        torch.set_rng_state(snap["torch"])
        self.noise_gen.set_state(snap["noise"])
        if "cuda" in snap and self.device.type == "cuda":
            torch.cuda.set_rng_state(snap["cuda"], self.device)

    def _identity(self) -> dict:
        """The part of the signature a checkpoint can only be resumed with (the LoRA's shape and base model)."""
        signature = self._signature()
        return {k: signature[k] for k in ("lora_rank", "lora_alpha", "target_modules", "config_path")}

    def _state(self, epoch: int, next_batch: int, order, rng: dict) -> dict:
        c = self.cfg
        return {
            "format": STATE_FORMAT, "run_id": self.run_id, "epoch": epoch, "global_step": self.step,
            "next_batch": next_batch, "epoch_order": order, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng, "data_rng": self.data_gen.get_state(), "history": self.history,
            "epoch_log": self.epoch_log, "epoch_loss": self.epoch_loss_snapshot,
            "identity": self._identity(), "signature": self._signature(),
            "dataset_keys": self.sample_keys, "steps_per_epoch": self.steps_per_epoch, "notes": self.notes,
            "epoch_loras": self.epoch_loras,
            "settings": {"lora_dropout": c.lora_dropout, "learning_rate": c.learning_rate,
                         "train_epochs": c.train_epochs, "batch_size": c.batch_size,
                         "gradient_accumulation": c.gradient_accumulation, "seed": c.seed,
                         "timestep_sampling": self.sampling, "cfg_dropout": c.cfg_dropout,
                         "dataset_size": len(self.data), "trigger_tag": self.trigger_tag},
        }

    def _metadata(self, epochs_done: int) -> dict:
        c = self.cfg
        return {"format": "pt", "acestep_lora.run_id": self.run_id, "acestep_lora.rank": str(c.lora_rank),
                "acestep_lora.alpha": f"{c.lora_alpha:g}",
                "acestep_lora.base_config": self._identity()["config_path"],
                "acestep_lora.variant": self.model_cfg.variant, "acestep_lora.epochs": str(epochs_done),
                "acestep_lora.steps": str(self.step), "acestep_lora.dataset_size": str(len(self.data)),
                "acestep_lora.trigger_tag": self.trigger_tag, "acestep_lora.target_modules": ",".join(self.targets),
                "acestep_lora.timestep_sampling": self.sampling, "acestep_lora.learning_rate": str(c.learning_rate)}

    def _write_checkpoint(self, directory: str, state: dict, comfy_name: str) -> None:
        """adapter/ (PEFT) + training_state.pt + a ComfyUI file, swapped in as one folder."""
        dtype = getattr(torch, self.cfg.comfy_dtype)
        with atomic_directory(directory) as tmp:
            lora.save_peft_adapter(os.path.join(tmp, "adapter"), self.lora_layers, self.targets, self.cfg.lora_rank,
                                   self.cfg.lora_alpha, self.cfg.lora_dropout)
            torch.save(state, os.path.join(tmp, STATE_FILE))
            with open(os.path.join(tmp, "checkpoint.json"), "w", encoding="utf-8") as f:
                json.dump({"run_id": state["run_id"], "epoch": state["epoch"], "global_step": state["global_step"],
                           "complete_epoch": state["epoch_order"] is None, **state["identity"],
                           "signature": state["signature"]}, f, indent=2)
            save_comfy_lora(os.path.join(tmp, comfy_name), self._pairs(), self.cfg.lora_alpha,
                            self._metadata(state["epoch"]), dtype)

    def _pairs(self) -> dict:
        return lora.pairs(self.lora_layers)

    def _resume(self):
        from safetensors.torch import load_file

        state = _read_state(self.resume_dir)
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"resume_from '{self.resume_dir}': unknown checkpoint format {state.get('format')}.")
        saved, now = state["identity"], self._identity()
        diffs = [f"{k}: checkpoint {saved[k]!r}, now {now[k]!r}" for k in now if saved.get(k) != now[k]]
        if diffs:
            raise ValueError(f"resume_from '{self.resume_dir}' was trained with other settings ({'; '.join(diffs)}). "
                             "Use the checkpoint's settings to continue it, or leave resume_from empty for a new run.")
        weights = load_file(os.path.join(self.resume_dir, "adapter", "adapter_model.safetensors"))
        try:
            lora.load_peft_state_dict(self.lora_layers, weights)
        except ValueError as e:
            raise ValueError(f"resume_from '{self.resume_dir}': {e}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.run_id, self.step = state["run_id"], state["global_step"]
        self.history, self.epoch_log = list(state["history"]), list(state["epoch_log"])
        self.notes, self.epoch_loras = list(state.get("notes", [])), list(state.get("epoch_loras", []))
        self.data_gen.set_state(state["data_rng"])
        self._restore_rng(state["rng"])
        self.trigger_tag = state["settings"].get("trigger_tag", self.trigger_tag) or self.trigger_tag
        return state

    def _follow_dataset(self, state: dict, epoch: int, order, next_batch: int):
        """Continue on the dataset and settings as they are now; returns the interrupted epoch's remaining
        ``(order, next_batch)`` and a note for the log when the schedule changed (None when it did not).

        Unchanged, nothing moves and the run continues bit for bit. Changed (samples removed or added since the
        checkpoint): the rest of an interrupted epoch keeps the samples that still exist, found by their key
        (removed ones are dropped), new samples join from the next epoch, and the total step count — steps done +
        the rest of this epoch + the remaining epochs x the new steps per epoch — and the learning-rate schedule
        over it are recomputed (as they are when train_epochs, batch_size or gradient_accumulation changed).
        ``epoch`` is the epoch to run next (``order`` not None: the interrupted one)."""
        cfg, saved, now = self.cfg, state.get("dataset_keys"), self.sample_keys
        keyed = saved is not None and now is not None
        changed = saved != now if keyed else state["signature"]["dataset"] != self._signature()["dataset"]
        what = ""
        if changed:
            if keyed:
                gone, new = set(saved) - set(now), set(now) - set(saved)
                what = f"{_plural(len(gone), 'sample')} removed, {len(new)} added"
            else:
                what = f"{state['settings']['dataset_size']} -> {len(self.data)} samples"
            if order is not None:
                if keyed:
                    position = {key: i for i, key in enumerate(now)}
                    rest = [[position[saved[i]] for i in batch if saved[i] in position] for batch in order[next_batch:]]
                    order = [batch for batch in rest if batch]
                else:  # which samples the rest of that epoch held is unknown (an older checkpoint): it ends here
                    order = []
                    what += "; the interrupted epoch ends here"
                next_batch = 0
        rest = 0
        if order is not None and epoch <= cfg.train_epochs:
            rest = math.ceil((len(order) - next_batch) / cfg.gradient_accumulation)
        later = max(0, cfg.train_epochs - epoch + (1 if order is None else 0))
        self.total_steps = self.step + rest + later * self.steps_per_epoch
        self.warmup = warmup_for(self.total_steps, cfg.warmup_steps)
        # The optimizer holds the rate for the next step from the checkpoint's schedule; recompute it from this one
        # (the same number, bit for bit, when nothing changed).
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * lr_factor(self.scheduler.last_epoch, self.total_steps, self.warmup)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        settings = [f"{k} {state['settings'].get(k)} -> {getattr(cfg, k)}"
                    for k in ("train_epochs", "batch_size", "gradient_accumulation")
                    if state["settings"].get(k) != getattr(cfg, k)]
        if not changed and not settings:
            return order, next_batch, None
        old_steps = state.get("steps_per_epoch") or math.ceil(math.ceil(
            state["settings"]["dataset_size"] / state["settings"]["batch_size"])
            / state["settings"]["gradient_accumulation"])
        reasons = ([f"dataset changed since the checkpoint: {what}"] if changed else []) + settings
        note = (f"{'; '.join(reasons)}; {old_steps} -> {self.steps_per_epoch} steps per epoch, {self.total_steps} "
                "steps in all; schedule recomputed")
        self.notes.append({"note": note, "epoch": epoch, "step": self.step})
        return order, next_batch, note

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        if self.finished_state is not None:
            return self._reuse_finished()
        if self.device.type == "cpu":
            # Adam's second moments of the still-tiny LoRA gradients become denormal floats, which make CPU
            # arithmetic ~50x slower; flushing them to zero changes nothing measurable.
            torch.set_flush_denormal(True)
        self._build()
        start_epoch, next_batch, order, epoch_loss, note = 1, 0, None, (0.0, 0), None
        if self.resume_dir is not None:
            state = self._resume()
            if state["epoch_order"] is None:  # saved at the end of an epoch
                start_epoch = state["epoch"] + 1
            else:  # saved mid-epoch (Cancel / out of memory): continue that epoch where it stopped
                start_epoch, next_batch, order = state["epoch"], state["next_batch"], state["epoch_order"]
                epoch_loss = tuple(state["epoch_loss"])
            order, next_batch, note = self._follow_dataset(state, start_epoch, order, next_batch)
        os.makedirs(cfg.output_dir, exist_ok=True)
        self._rewrite_jsonl()
        header = (f"training on {_plural(len(self.data), 'sample')}: {_plural(cfg.train_epochs, 'epoch')} of "
                  f"{_plural(self.steps_per_epoch, 'step')}, {self.total_steps} steps in all, rank {cfg.lora_rank}, "
                  f"alpha {cfg.lora_alpha:g}, lr {cfg.learning_rate:g}, {self.sampling} timesteps, "
                  f"{self.device.type}/{str(self.dtype)[6:]}, {sum(p.numel() for p in self.params):,} trainable "
                  "parameters" + (f", resumed from {self.resume_dir} at step {self.step}" if self.resume_dir else "")
                  + (f"\n{note}" if note else ""))
        say(header)
        self.log_lines = [header]
        self.started, self.steps_at_start, self.current_epoch = time.time(), self.step, start_epoch
        try:
            for epoch in range(start_epoch, cfg.train_epochs + 1):
                self._run_epoch(epoch, next_batch, order, epoch_loss)
                next_batch, order, epoch_loss = 0, None, (0.0, 0)
                if cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0 and epoch < cfg.train_epochs:
                    self._flush()
                    self._save_epoch(epoch)
            self._flush()
            return self._finish()
        finally:
            if self.device.type == "cpu":
                torch.set_flush_denormal(False)
            release_memory(self.device)

    def _save_epoch(self, epoch: int) -> None:
        """A periodic checkpoint; with a ``loras_dir``, its LoRA also goes where ComfyUI's LoRA loaders list it,
        ``<loras_dir>/<lora_name>/epoch_<N>.safetensors`` (never replacing another run's file), so epochs can be
        compared without copying files."""
        directory = os.path.join(self.cfg.output_dir, "checkpoints", f"epoch_{epoch}")
        name = f"{self.lora_name}_epoch_{epoch}.safetensors"
        published = None
        if self.cfg.loras_dir:
            published = unique_path(os.path.join(self.cfg.loras_dir, self.lora_name), f"epoch_{epoch}",
                                    same_run=self.run_id)
            if published not in self.epoch_loras:
                self.epoch_loras.append(published)
        self._write_checkpoint(directory, self._state(epoch, 0, None, self._rng_snapshot()), name)
        if published is not None:
            publish_copy(os.path.join(directory, name), published)

    def _run_epoch(self, epoch: int, first_batch: int, order, epoch_loss):
        cfg = self.cfg
        self.current_epoch = epoch
        if order is None:
            order = make_batches(self.data.lengths, cfg.batch_size, self.data_gen)
        loss_sum = torch.tensor(float(epoch_loss[0]), device=self.device)
        count = int(epoch_loss[1])
        epoch_start = time.time()
        accum = cfg.gradient_accumulation
        # loss_sum is rebound, never updated in place, so keeping a reference is a free snapshot of it.
        group_start, group_rng, snapshot = first_batch, self._rng_snapshot(), (loss_sum, count)
        index = first_batch
        try:
            while index < len(order):
                if (index - first_batch) % accum == 0:  # start of an optimizer step: a consistent resume point
                    group_start, group_rng, snapshot = index, self._rng_snapshot(), (loss_sum, count)
                    group_loss = 0.0
                if self.check_cancel is not None:
                    self.check_cancel()
                group_end = min(group_start + accum, len(order))
                loss = self._loss(collate([self.data.samples[i] for i in order[index]]))
                scaled = loss / (group_end - group_start)
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                loss_sum = loss_sum + loss.detach().float()
                group_loss = scaled.detach().float() + group_loss
                count += 1
                index += 1
                if index == group_end:
                    self._optimizer_step(group_loss)
                    self._report(epoch)
        except BaseException as error:  # Cancel, Ctrl-C, out of memory: keep what was trained
            oom = isinstance(error, torch.OutOfMemoryError)
            if oom or not isinstance(error, Exception):
                self.optimizer.zero_grad(set_to_none=True)
                self.pending_steps = [p for p in self.pending_steps if p[0] <= self.step]
                self._flush(check=False)
                self._save_interrupted(epoch, group_start, order, group_rng, (float(snapshot[0]), snapshot[1]))
                if oom:
                    raise TrainingStopped(self._oom_message()) from error
                error.resumable = Resumable(epoch, self.step, self.interrupted_checkpoint)
            raise
        self.pending_epochs.append((epoch, loss_sum, count, self.last_lr, time.time() - epoch_start))
        if self.device.type == "cpu":
            self._flush()

    def _optimizer_step(self, step_loss: torch.Tensor):
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        lr = self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.pending_steps.append((self.step, step_loss, lr))
        if self.device.type == "cpu" or len(self.pending_steps) >= self.cfg.log_every:
            self._flush()

    def _report(self, epoch: int):
        """Per-step progress without reading the loss back (that would wait for the GPU)."""
        if self.progress is not None:
            self.progress({"step": self.step, "total_steps": self.total_steps, "epoch": epoch,
                           "total_epochs": self.cfg.train_epochs, "elapsed": time.time() - self.started,
                           "eta": self._eta(), "history": self.history, "new_points": []})

    def _eta(self) -> float:
        done = self.step - self.steps_at_start
        if done <= 0:
            return float("nan")
        return (time.time() - self.started) / done * (self.total_steps - self.step)

    def _flush(self, check: bool = True):
        """Read pending step and epoch losses back in one transfer, check them, log them."""
        if not self.pending_steps and not self.pending_epochs:
            return
        values = torch.stack([p[1] for p in self.pending_steps] + [p[1] for p in self.pending_epochs]).tolist()
        step_values, epoch_values = values[:len(self.pending_steps)], values[len(self.pending_steps):]
        new_points = []
        for (step, _, lr), loss in zip(self.pending_steps, step_values):
            if check and not math.isfinite(loss):
                self._diverged(f"step {step}", loss)
            point = [step, loss, lr]
            self.history.append(point)
            new_points.append(point)
        for (epoch, _, count, lr, seconds), total in zip(self.pending_epochs, epoch_values):
            loss = total / max(count, 1)
            if check and not math.isfinite(loss):
                self._diverged(f"epoch {epoch}", loss)
            eta = self._eta()
            entry = {"epoch": epoch, "step": self.step, "loss": loss, "lr": lr, "seconds": round(seconds, 3),
                     "eta_seconds": round(eta, 1) if math.isfinite(eta) else None}
            self.epoch_log.append(entry)
            self.log_lines.append(f"epoch {epoch}/{self.cfg.train_epochs} step {self.step}/{self.total_steps} "
                                  f"loss {loss:.5f} lr {lr:.2e} {seconds:.2f}s/epoch ETA {_fmt_seconds(eta)}")
            with open(os.path.join(self.cfg.output_dir, "train_log.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        if self.pending_epochs and (time.time() - self.last_print > 10 or self.step == self.total_steps):
            say(self.log_lines[-1])
            self.last_print = time.time()
        self.pending_steps, self.pending_epochs = [], []
        if self.progress is not None and new_points:
            last = new_points[-1]
            self.progress({"step": self.step, "total_steps": self.total_steps, "epoch": self.current_epoch,
                           "total_epochs": self.cfg.train_epochs, "loss": last[1], "lr": last[2],
                           "elapsed": time.time() - self.started, "eta": self._eta(), "history": self.history,
                           "new_points": new_points})

    def _diverged(self, where: str, loss: float):
        self.pending_steps, self.pending_epochs = [], []
        saved = find_checkpoints(self.cfg.output_dir)
        last = max(saved, key=_checkpoint_rank) if saved else "none was saved yet"
        raise TrainingStopped(
            f"the loss became {loss} at {where}: training diverged and was stopped. Lower learning_rate (now "
            f"{self.cfg.learning_rate}) or check the data. The last good checkpoint is kept: {last}.")

    def _rewrite_jsonl(self):
        """train_log.jsonl from the state: the epochs, and the notes where they happened (sorted by step; a note
        after the epoch entries of its step)."""
        entries = sorted(self.epoch_log + self.notes, key=lambda e: (e["step"], "note" in e))
        text = "".join(json.dumps(e) + "\n" for e in entries)
        atomic_write_text(os.path.join(self.cfg.output_dir, "train_log.jsonl"), text)

    def _save_interrupted(self, epoch, next_batch, order, rng, epoch_loss):
        self.epoch_loss_snapshot = epoch_loss
        directory = os.path.join(self.cfg.output_dir, "checkpoints", f"cancelled_epoch_{epoch}_step_{self.step}")
        self._write_checkpoint(directory, self._state(epoch, next_batch, order, rng),
                               f"{self.lora_name}_step_{self.step}.safetensors")
        self.interrupted_checkpoint = directory

    def _oom_message(self) -> str:
        c = self.cfg
        longest = max(self.data.lengths) / 25
        return (f"out of {self.device.type} memory (batch_size {c.batch_size}, longest sample {longest:.0f} s, rank "
                f"{c.lora_rank}, gradient_checkpointing {'on' if self.net.gradient_checkpointing else 'off'}). "
                "Turn gradient_checkpointing on, lower batch_size, lower max_duration in Prepare, or lower lora_rank; "
                f"a resumable checkpoint was saved in {self.interrupted_checkpoint}.")

    def _finish(self) -> TrainResult:
        cfg = self.cfg
        final_dir = os.path.join(cfg.output_dir, "final")
        state = self._state(cfg.train_epochs, 0, None, self._rng_snapshot())
        self._write_checkpoint(final_dir, state, f"{self.lora_name}.safetensors")
        loras_dir = cfg.loras_dir or cfg.output_dir
        comfy_path = unique_path(loras_dir, self.lora_name, same_run=self.run_id)
        if os.path.abspath(os.path.dirname(comfy_path)) != os.path.abspath(final_dir):
            publish_copy(os.path.join(final_dir, f"{self.lora_name}.safetensors"), comfy_path)
        final_loss = self.epoch_log[-1]["loss"] if self.epoch_log else float("nan")
        elapsed = time.time() - self.started
        summary = (f"done: {cfg.train_epochs} epochs, {self.step} steps in {_fmt_seconds(elapsed)}; final loss "
                   f"{final_loss:.5f}\n" + self._files_text(final_dir, comfy_path, self.epoch_loras))
        self.log_lines.append(summary)
        say(summary)
        return TrainResult(cfg.output_dir, os.path.join(final_dir, "adapter"), comfy_path, cfg.train_epochs,
                           self.step, final_loss, _compact_log(self.log_lines), self.run_id, summary,
                           self.trigger_tag, self.history, list(self.epoch_loras))

    def _files_text(self, final_dir: str, comfy_path: str, epoch_loras: list) -> str:
        """Where the run's files are, for the summary."""
        lines = [f"PEFT adapter: {os.path.join(final_dir, 'adapter')}", f"ComfyUI LoRA: {comfy_path}"]
        if epoch_loras:
            names = [os.path.relpath(p, self.cfg.loras_dir) if self.cfg.loras_dir else p for p in epoch_loras]
            shown = names if len(names) <= 8 else [*names[:3], "...", *names[-3:]]
            lines.append(f"per-epoch LoRAs ({len(names)}) in {self.cfg.loras_dir}: {', '.join(shown)}")
        return "\n".join(lines)

    def _reuse_finished(self) -> TrainResult:
        state, cfg = self.finished_state, self.cfg
        final_dir = os.path.join(cfg.output_dir, "final")
        self.run_id = state["run_id"]
        source = os.path.join(final_dir, f"{self.lora_name}.safetensors")
        comfy_path = unique_path(cfg.loras_dir or cfg.output_dir, self.lora_name, same_run=self.run_id)
        if not os.path.exists(comfy_path) and os.path.isfile(source):
            publish_copy(source, comfy_path)
        log = state["epoch_log"]
        final_loss = log[-1]["loss"] if log else float("nan")
        epoch_loras = [p for p in state.get("epoch_loras", []) if os.path.isfile(p)]
        summary = (f"already trained with these settings: reused {final_dir} (choose another output_dir, or delete "
                   "this one, to train again; raise train_epochs with resume_from = latest to train longer)\n"
                   + self._files_text(final_dir, comfy_path, epoch_loras))
        say(summary)
        return TrainResult(cfg.output_dir, os.path.join(final_dir, "adapter"), comfy_path, state["epoch"],
                           state["global_step"], final_loss, summary, self.run_id, summary,
                           state["settings"].get("trigger_tag", ""), list(state["history"]), epoch_loras)


def _fmt_seconds(seconds) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _compact_log(lines: list[str], keep: int = 60) -> str:
    """Header, up to ``keep`` evenly spaced epoch lines, and the summary (a 4000-epoch log stays readable)."""
    if len(lines) <= keep + 2:
        return "\n".join(lines)
    body = lines[1:-1]
    stride = math.ceil(len(body) / keep)
    picked = body[::stride]
    if picked[-1] != body[-1]:
        picked.append(body[-1])
    return "\n".join([lines[0], *picked, lines[-1]])


def train_lora(cfg: TrainConfig, progress: Optional[Callable[[dict], None]] = None,
               check_cancel: Optional[Callable[[], None]] = None) -> TrainResult:
    """Train (or resume) a LoRA; see TrainConfig. Returns where the PEFT adapter and ComfyUI file are.

    ComfyUI runs every node under ``torch.inference_mode()``; training needs autograd and ordinary tensors, so
    both are switched back on for the whole run (including loading the data and the model).
    """
    with torch.inference_mode(False), torch.enable_grad():
        return Trainer(cfg, progress, check_cancel).run()
