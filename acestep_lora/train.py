"""The LoRA trainer (spec §4): a recipe over small parts, with one training loop you can read on a screen.

    trainer = Trainer(cfg, progress, cancel_requested)  # checks the inputs; fresh / resume / reuse / refuse
    trainer.setup()                                      # model + LoRA, optimizer, RNGs, data on the device
    result = trainer.train()                             # the epochs, periodic save_checkpoint(), the final LoRA
    trainer.cleanup()

Parts: objective.py (the loss and its random draws), optim.py (AdamW, schedule), run_state.py (checkpoints, run
signature, resume), metrics.py (loss read-back, logs, progress events), export.py (LoRA files, loras folder),
distributed.py (several processes under torchrun: each step's micro-batches shared, gradients summed);
validation.py (held-out loss, best/) and previews.py (audio while training) plug in through the Trainer's hooks.
Unlike the official trainer, LoRA weights and AdamW state stay fp32 (compute: bf16 autocast on CUDA, fp16 on MPS,
fp32 on CPU) and resume restores the LoRA weights and every RNG: a resumed run equals the uninterrupted one bit for
bit on CPU. Cancel / Ctrl-C and running out of memory save a resumable checkpoint at a step boundary.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
import uuid
from typing import Optional
from collections.abc import Callable

import torch

from . import distributed, export, lora, previews
from .compile import plan_step
from .data import Batch, TensorDataset, collate, make_batches
from .device import compute_dtype, release_memory
from .export import TrainResult
from .fileio import atomic_directory
from .metrics import MetricsLog, ProgressEvent, format_seconds, plural
from .objective import TIMESTEP_SAMPLING, FlowMatching, resolve_sampling  # noqa: F401  (TIMESTEP_SAMPLING: CLI)
from .optim import Optimizer
from .run_state import (IDENTITY_KEYS, Position, Resumable, RunState, TrainingCancelled, TrainingStopped,
                        continue_on, latest_checkpoint, plan, restore_rng, rng_snapshot, run_signature, seed_draws)
from .options import TrainConfig, check_config  # declared in the option table, with its node and CLI facts
from .source import Folders, from_config
from .validation import Validation

log = logging.getLogger("acestep_lora.train")


class Trainer:
    """Wires the parts to train one LoRA; see the module docstring. ``progress`` gets each ProgressEvent;
    ``cancel_requested()`` is asked before every micro-batch: True saves a resumable checkpoint where the current
    optimizer step began and raises TrainingCancelled."""

    def __init__(self, cfg: TrainConfig, progress: Optional[Callable[[ProgressEvent], None]] = None,
                 cancel_requested: Optional[Callable[[], bool]] = None, folders: Optional[Folders] = None):
        check_config(cfg)
        self.cfg, self.progress, self.cancel_requested = cfg, progress, cancel_requested
        self.device, self.dist = distributed.join(cfg.device, cfg.dist_timeout)  # one process unless torchrun's
        self.dtype = compute_dtype(self.device)
        self.data = TensorDataset(cfg.tensor_dir)
        # the official folder or ComfyUI's files (folders: the nodes' dropdowns), named as Prepare named it
        self.source = from_config(cfg, folders, prepared=self.data.manifest.checkpoint)
        self.model_cfg = self.source.config
        self.data.check_for(self.source.name, self.model_cfg.condition_width, cfg.batch_size)
        self.data, self.validation = Validation.split(cfg, self.data)  # held-out samples leave training
        self.sampling = resolve_sampling(cfg.timestep_sampling, self.model_cfg.variant)
        self.lora_name = export.lora_name_for(cfg.lora_name, cfg.output_dir)
        self.trigger_tag = cfg.trigger_tag or self.data.manifest.metadata.custom_tag
        compute = f"{self.device.type}/{str(self.dtype).replace('torch.', '')}"
        self.signature = run_signature(cfg, self.sampling, self.data.manifest.fingerprint(),
                                       self.source.dit_identity(), compute, self.dist.world)
        self.signature.update(self.validation.signature())
        self.identity = {k: self.signature[k] for k in IDENTITY_KEYS}
        self.resume_dir, self.finished_dir = plan(cfg.output_dir, cfg.resume_from, self.signature)
        self.dist.same_everywhere({"settings": self.signature, "resume": self.resume_dir, "reuse": self.finished_dir})
        self.net = self.step_decoder = None
        # Plug-ins (validation.py, previews.py), in every process; what they record goes into the next checkpoint.
        # start_hooks(trainer): before the first step; epoch_hooks(trainer, epoch): after the epoch is logged, before
        # its checkpoint; checkpoint_hooks(trainer, folder): files into a checkpoint being built (process 0);
        # finish_hooks(trainer) -> a line for the summary, "" for none (process 0).
        self.start_hooks, self.epoch_hooks, self.checkpoint_hooks, self.finish_hooks = [], [], [], []
        self.validation.attach(self)

    # -- set-up ------------------------------------------------------------------------------------------------
    def setup(self, model: Optional[torch.nn.Module] = None) -> None:
        """Model with LoRA, optimizer and schedule, generators, data on the device; a resume restores its
        checkpoint. ``model``: an AceStepModel (decoder, null_condition_emb) to train instead of the one on disk."""
        cfg = self.cfg
        if self.device.type == "cpu":
            # Adam's second moments of the still-tiny LoRA gradients become denormal floats, which make CPU
            # arithmetic ~50x slower; flushing them to zero changes nothing measurable.
            torch.set_flush_denormal(True)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        if model is None:  # only what training needs: no encoder, tokenizer, VAE, LM
            model = self.source.load_dit(("decoder", "null_condition_emb"), device=self.device, dtype=self.dtype)
        self.net = model.decoder
        self.targets = lora.parse_targets(cfg.target_modules, lora.linear_names(self.net))
        # LoRA weights (and so AdamW state) are fp32 whatever the compute dtype; the frozen base stays as loaded.
        self.lora_layers = lora.inject(self.net, self.targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        self.net.train()
        self.params = lora.lora_parameters(self.lora_layers)
        self.dist.broadcast_parameters(self.params)
        self.accum = cfg.gradient_accumulation * self.dist.world  # micro-batches per optimizer step, all processes
        self.steps_per_epoch = math.ceil(math.ceil(len(self.data) / cfg.batch_size) / self.accum)
        self.optim = Optimizer(self.params, self.device, cfg.learning_rate, cfg.weight_decay, cfg.max_grad_norm,
                               cfg.warmup_steps, self.steps_per_epoch * cfg.train_epochs,
                               fp16=self.dtype == torch.float16)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.objective = FlowMatching(self.sampling, self.device, self.dtype, self.model_cfg.timestep_mu,
                                      self.model_cfg.timestep_sigma, cfg.cfg_dropout, model.null_condition_emb.detach())
        self.data.to(self.device, self.dtype)
        self.step_decoder, self.step_notes = plan_step(self.net, cfg, self.model_cfg, self.targets, self.data,
                                                       self.device, self.dtype)  # compiled? checkpointing?
        self.metrics = MetricsLog(cfg.output_dir, cfg.train_epochs, cfg.log_every, self.device.type == "cpu",
                                  self.progress, self._divergence_advice, writes=self.dist.main)
        self.run_id, self.global_step, self.epoch_loras = self.dist.on_main(lambda: uuid.uuid4().hex[:12]), 0, []
        self.start, self.note = Position(1), None  # a fresh run; a resume moves both
        if self.resume_dir is not None:
            self._resume()
        self.metrics.total_steps, self.last_lr = self.optim.total_steps, self.optim.lr

    def _resume(self) -> None:
        state = RunState.load(self.resume_dir)
        state.check_identity(self.resume_dir, self.identity)
        lora.load_peft_adapter(os.path.join(self.resume_dir, "adapter"), self.lora_layers)
        self.optim.load_state_dicts(state.optimizer, state.scheduler, state.scaler)
        self.run_id, self.global_step, self.epoch_loras = state.run_id, state.global_step, list(state.epoch_loras)
        self.metrics.restore(state.history, state.epoch_log, state.notes, state.global_step)
        self.data_gen.set_state(state.data_rng)
        restore_rng(state.rng, self.device, self.noise_gen)
        self.trigger_tag = self.cfg.trigger_tag or state.settings.get("trigger_tag") or self.trigger_tag
        go = continue_on(state, state.position, self.data.manifest.sample_keys(), self.data.manifest.fingerprint(),
                         len(self.data), self.cfg, self.steps_per_epoch, self.dist.world)
        self.start, self.note = go.position, go.note
        self.optim.reschedule(go.total_steps)
        if go.note:
            self.metrics.epoch = self.start.epoch
            self.metrics.note(go.note)

    # -- one step ----------------------------------------------------------------------------------------------
    def loss(self, batch: Batch) -> torch.Tensor:
        """The objective on one batch, its noise and timesteps drawn from the run's generator (no backward)."""
        if batch.target_latents.device != self.device:  # dataset too large to stage on the GPU
            batch = batch.to(self.device)
        return self.objective.loss(self.step_decoder, batch, self.objective.draw(batch, self.noise_gen))

    def step(self, batch: Batch) -> torch.Tensor:
        """One optimizer step on ``batch`` as the loop runs it (draw, forward, backward, gradients summed over the
        processes with theirs, clip, AdamW, schedule, the loss queued for the metrics log); returns the loss."""
        world = self.dist.world
        loss = self._backward(batch, world, self.dist.rank)
        self._optimizer_step(self.dist.sum_gradients(self.params, torch.stack([loss / world, loss]))[0])
        return loss

    def _backward(self, batch: Batch, parts: int, part: int) -> torch.Tensor:
        """Gradients of micro-batch ``part`` of the ``parts`` of the next step, drawn from its own seed; its loss."""
        seed_draws(self.cfg.seed, self.global_step + 1, part, self.device, self.noise_gen)
        loss = self.loss(batch)
        self.optim.backward(loss / parts)
        return loss.detach().float()

    def _optimizer_step(self, step_loss: torch.Tensor) -> None:
        self.last_lr = self.optim.step()
        self.global_step += 1
        self.metrics.add_step(self.global_step, step_loss, self.last_lr)

    # -- the loop ----------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Train to ``train_epochs`` (or reuse the finished run with this signature); returns where the files are."""
        cfg = self.cfg
        if self.finished_dir is not None:
            return self.dist.on_main(export.reuse_finished, self.finished_dir, cfg, self.lora_name, self.trigger_tag)
        if self.net is None:
            self.setup()
        os.makedirs(cfg.output_dir, exist_ok=True)
        self.metrics.start(self.header())
        for hook in self.start_hooks:
            hook(self)
        for epoch in range(self.start.epoch, cfg.train_epochs + 1):
            self._train_epoch(epoch, self.start if epoch == self.start.epoch else Position(epoch))
            for hook in self.epoch_hooks:  # a hook that records flushes the losses first (MetricsLog.record)
                hook(self, epoch)
            if cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0 and epoch < cfg.train_epochs:
                self.metrics.flush()
                self.save_checkpoint(epoch)
        self.metrics.flush()
        return self.dist.on_main(self._finish)

    def _train_epoch(self, epoch: int, start: Position) -> None:
        """The epoch from ``start``: each step takes the next ``self.accum`` micro-batches, this process its share."""
        cfg, accum = self.cfg, self.accum
        order = start.order if start.order is not None else make_batches(self.data.lengths, cfg.batch_size,
                                                                         self.data_gen)
        loss_sum, count = torch.tensor(float(start.epoch_loss[0]), device=self.device), int(start.epoch_loss[1])
        self.metrics.epoch, began, index = epoch, time.time(), start.next_batch
        while index < len(order):  # a step begins: a consistent point to resume (loss_sum is never updated in place)
            here = Position(epoch, index, order, (loss_sum, count), rng_snapshot(self.device, self.noise_gen))
            parts, cancel, out_of_memory = min(accum, len(order) - index), False, None
            sums = torch.zeros(2, device=self.device)  # (the step's loss, the sum of its micro-batch losses)
            try:
                for part in self.dist.share(parts) or [None]:  # None: this process has no part, but asks too
                    cancel = self.cancel_requested is not None and self.cancel_requested()
                    if cancel or part is None:
                        break
                    loss = self._backward(collate([self.data.samples[i] for i in order[index + part]]), parts, part)
                    sums += torch.stack([loss / parts, loss])
            except torch.OutOfMemoryError as error:
                out_of_memory = error
            try:
                stops = self.dist.agree(cancel, out_of_memory is not None)  # every process stops, or none
                if any(stops):
                    self._stop(here, stops[1], out_of_memory)
                sums = self.dist.sum_gradients(self.params, sums)
                self._optimizer_step(sums[0])
            except distributed.ProcessLost as lost:
                self._lost(here, lost)
            except torch.OutOfMemoryError as error:  # AdamW's state, made at the first step
                self._stop(here, 1, error)
            loss_sum, count, index = loss_sum + sums[1], count + parts, index + parts
            self.metrics.report()
        self.metrics.add_epoch(epoch, loss_sum, count, self.last_lr, time.time() - began)

    def _stop(self, at: Position, out_of_memory: int = 0, error: Optional[BaseException] = None):
        """Save a checkpoint where the interrupted optimizer step began (its partial gradients are dropped; process
        0 writes it while the others wait), then raise: cancelled, or ``out_of_memory`` processes ran out."""
        self.optim.zero_grad()
        directory = self.save_checkpoint(at.epoch, at)
        self.dist.main_done()
        if not out_of_memory:
            raise TrainingCancelled(Resumable(at.epoch, self.global_step, directory))
        c, world = self.cfg, self.dist.world
        raise TrainingStopped(
            f"out of {self.device.type} memory{f' in {out_of_memory} of {world} processes' if world > 1 else ''} "
            f"(batch_size {c.batch_size}, longest sample "
            f"{max(self.data.lengths) / 25:.0f} s, rank {c.lora_rank}, gradient_checkpointing "
            f"{'on' if self.net.gradient_checkpointing else 'off'}). Turn gradient_checkpointing on, lower "
            "batch_size, lower max_duration in Prepare, or lower lora_rank; a resumable checkpoint was saved in "
            f"{directory}.") from error

    def _lost(self, at: Position, lost: distributed.ProcessLost):
        """Another process is gone: process 0 saves where the step began if its own state is complete."""
        self.optim.zero_grad()
        saved = self.dist.main and self.dist.settled() and self.save_checkpoint(at.epoch, at)
        raise lost.stopped(at.epoch, self.global_step, saved, latest_checkpoint(self.cfg.output_dir)) from lost

    # -- checkpoints and the result ----------------------------------------------------------------------------
    def save_checkpoint(self, epoch: int, at: Optional[Position] = None) -> str:
        """A resumable checkpoint folder (adapter/, a ComfyUI file, training_state.pt, checkpoint.json), swapped
        in whole; returns it. ``at`` None: at the end of ``epoch`` — final/ after the last epoch, else
        checkpoints/epoch_N, whose LoRA is also published in loras_dir; else mid-epoch (Cancel, out of memory);
        written by process 0, with the losses not yet read back (unchecked: a stop saves whatever they are)."""
        cfg, name, step, published = self.cfg, self.lora_name, self.global_step, None
        if at is not None:
            folder, file = f"checkpoints/cancelled_epoch_{epoch}_step_{step}", f"{name}_step_{step}"
        elif epoch >= cfg.train_epochs:
            folder, file = "final", name
        else:
            folder, file = f"checkpoints/epoch_{epoch}", f"{name}_epoch_{epoch}"
            if cfg.loras_dir:  # where ComfyUI's LoRA loaders list it, to compare epochs without copying files
                published = export.epoch_lora_path(cfg.loras_dir, name, epoch, self.run_id)
                self.epoch_loras += [published] if published not in self.epoch_loras else []
        directory = os.path.join(cfg.output_dir, *folder.split("/"))
        self.metrics.flush(check=False)
        if not self.dist.main:
            return directory
        at = at or Position(epoch, rng=rng_snapshot(self.device, self.noise_gen))
        settings = {k: getattr(cfg, k) for k in ("lora_dropout", "learning_rate", "train_epochs", "batch_size",
                                                 "gradient_accumulation", "seed", "cfg_dropout")}
        settings.update(timestep_sampling=self.sampling, dataset_size=len(self.data), trigger_tag=self.trigger_tag,
                        world_size=self.dist.world)
        state = RunState(self.run_id, epoch, step, at.next_batch, at.order, *self.optim.state_dicts(), at.rng,
                         self.data_gen.get_state(), self.metrics.history, self.metrics.epoch_log,
                         (float(at.epoch_loss[0]), at.epoch_loss[1]),
                         self.identity, self.signature, settings, self.data.manifest.sample_keys(),
                         self.steps_per_epoch, self.metrics.notes, self.epoch_loras, f"{file}.safetensors")
        metadata = export.lora_metadata(self.run_id, cfg, self.model_cfg.variant, self.targets, self.sampling, epoch,
                                        step, len(self.data), self.trigger_tag, self.dist.world)
        with atomic_directory(directory) as tmp:
            export.write_lora_files(tmp, self.lora_layers, self.targets, cfg.lora_rank, cfg.lora_alpha,
                                    cfg.lora_dropout, state.lora_file, metadata, cfg.comfy_dtype)
            state.save(tmp)
            for hook in self.checkpoint_hooks:
                hook(self, tmp)
        if published is not None:
            export.publish(os.path.join(directory, state.lora_file), published)
        return directory

    def _finish(self) -> TrainResult:
        cfg = self.cfg
        final_dir = self.save_checkpoint(cfg.train_epochs)
        comfy_path = export.publish(os.path.join(final_dir, f"{self.lora_name}.safetensors"),
                                    export.final_lora_path(cfg.loras_dir, cfg.output_dir, self.lora_name, self.run_id))
        final_loss = self.metrics.epoch_log[-1]["loss"] if self.metrics.epoch_log else float("nan")
        adapter = os.path.join(final_dir, "adapter")
        summary = (f"done: {cfg.train_epochs} epochs, {self.global_step} steps in "
                   f"{format_seconds(time.time() - self.metrics.started)}; final loss {final_loss:.5f}\n"
                   + export.files_text(adapter, comfy_path, self.epoch_loras, cfg.loras_dir)
                   + "".join(f"\n{line}" for line in (hook(self) for hook in self.finish_hooks) if line))
        self.metrics.lines.append(summary)
        log.info(summary)
        return TrainResult(cfg.output_dir, adapter, comfy_path, cfg.train_epochs, self.global_step, final_loss,
                           self.metrics.text(), self.run_id, summary, self.trigger_tag, self.metrics.history,
                           list(self.epoch_loras))

    def header(self) -> str:
        """The run's first log line: data, schedule, LoRA, device, and why checkpointing/compile are on or off."""
        c = self.cfg
        return (f"training on {plural(len(self.data), 'sample')}: {plural(c.train_epochs, 'epoch')} of "
                f"{plural(self.steps_per_epoch, 'step')}, {self.optim.total_steps} steps in all, rank {c.lora_rank}, "
                f"alpha {c.lora_alpha:g}, lr {c.learning_rate:g}, {self.sampling} timesteps, "
                f"{self.device.type}/{str(self.dtype)[6:]}, {sum(p.numel() for p in self.params):,} trainable "
                "parameters" + (f", {c.batch_size * self.accum} samples per step from {self.dist.world} processes"
                                if self.dist.world > 1 else "")
                + (f", resumed from {self.resume_dir} at step {self.global_step}" if self.resume_dir else "")
                + f"\nmodel: {self.source.describe_dit()}" + "".join(f"\n{n}" for n in self.step_notes)
                + (f"\n{self.note}" if self.note else ""))

    def _divergence_advice(self) -> str:
        last = latest_checkpoint(self.cfg.output_dir, include_final=False) or "none was saved yet"
        return (f"Lower learning_rate (now {self.cfg.learning_rate}) or check the data. The last good checkpoint is "
                f"kept: {last}.")

    def cleanup(self) -> None:
        """Give back what training changed or held: the CPU's denormal setting, cached device memory."""
        if self.device.type == "cpu":
            torch.set_flush_denormal(False)
        release_memory(self.device)


def train_lora(cfg: TrainConfig, progress: Optional[Callable[[ProgressEvent], None]] = None,
               cancel_requested: Optional[Callable[[], bool]] = None, folders: Optional[Folders] = None) -> TrainResult:
    """Train (or resume, or reuse) a LoRA; see TrainConfig. Returns where the PEFT adapter and ComfyUI file are.

    ComfyUI runs every node under ``torch.inference_mode()``; training needs autograd and ordinary tensors, so
    both are switched back on for the whole run (including loading the data and the model)."""
    with torch.inference_mode(False), torch.enable_grad():
        trainer = Trainer(cfg, progress, cancel_requested, folders)
        previews.attach(trainer)
        try:
            return trainer.train()
        finally:
            trainer.cleanup()
