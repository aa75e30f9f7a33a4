"""The held-out validation loss (issue 12): which samples stay out of training, an honest loss on them, and
``best/`` — the LoRA of the epoch where that loss was lowest.

The training loss of a LoRA falls for as long as it trains, also while it memorises its few songs; a loss on songs
it never trains on shows when more epochs stop helping.

- Which samples: ``validation_split`` of them (default 10 %), at least 1 when the dataset has 5 or more, never more
  than 20. Songs are ranked by a hash of the run seed and their identity (the sample's cache key; the segments of
  one song, long_audio = segments, share one identity, so a song is never on both sides) and held out in that
  order. Deterministic, so re-queuing the same workflow reuses the finished run. A resumed run keeps its split
  (``validation.json`` in every checkpoint): a held-out sample stays held out, a trained one is never held out,
  and only samples added since can join the held-out ones. Held-out samples are not trained on; the run signature
  records the split.
- The loss: the training objective (objective.loss) on each held-out sample at fixed timesteps — turbo: its 8
  shift-3 timesteps, as training draws them; base/sft: the 8 midpoint quantiles of the training distribution of t
  (max of two logit-normal draws) — with fixed noise drawn from the sample's key, the decoder in eval mode (no LoRA
  dropout) and no condition dropout; the mean over the timesteps, then over the samples. It depends on the LoRA
  weights alone: two evaluations agree bit for bit, before and after a resume too, and the training RNGs are never
  touched. Eight timesteps of one sample run as one batch (fewer rows per forward for samples longer than
  ROW_FRAMES / 8 frames), under no_grad.
- When: every ``validation_every_n_epochs`` epochs and after the last one, plus once before the first step with the
  LoRA off (epoch 0: the base model's loss on the same songs). In train_log.jsonl as lines ``{"epoch", "step",
  "validation_loss", "validation_samples"}``; in ProgressEvent.validation as ``[step, loss, epoch]``.
- ``<run>/best/``: ``adapter/`` and ``<name>_best.safetensors`` of the epoch with the lowest loss (epoch 0 never
  counts), rewritten whenever a lower one comes, and ``best.json`` (epoch, step, loss); at the end its ComfyUI file
  is also published as ``<loras_dir>/<name>/best.safetensors``.
- Several processes (torchrun, distributed.py): process 0 alone measures the loss and writes best/ (the others wait
  at the next step); every process records the value it shares, so the log, the best epoch and the checkpoints are
  the same everywhere, and an error in process 0 stops every process with it.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
from typing import Optional

import torch

from . import export, lora
from .data import Batch, TensorDataset
from .fileio import atomic_directory, atomic_write_json
from .objective import TURBO_SHIFT3_TIMESTEPS, Draw, loss as flow_loss
from .lora_io import unique_path
from .metrics import plural
from .run_state import INFO_FILE, RunState, read_info, resolve_resume

log = logging.getLogger("acestep_lora.validation")

MIN_SAMPLES = 5  # fewer samples: nothing is held out
MAX_HELD_OUT = 20
QUADRATURE_POINTS = 8
ROW_FRAMES = 12000  # latent frames per forward: all 8 timesteps of a 60 s sample at once, fewer rows when longer
STATE_FILE = "validation.json"  # in each checkpoint folder: the split it was trained with
BEST_DIR, BEST_INFO = "best", "best.json"


def held_out_count(samples: int, fraction: float) -> int:
    """How many of ``samples`` to hold out for ``fraction`` (0 = off)."""
    if fraction <= 0 or samples < MIN_SAMPLES:
        return 0
    return min(MAX_HELD_OUT, max(1, int(fraction * samples + 0.5)))


def song_of(info) -> str:
    """The identity a sample is held out by (a manifest SampleInfo): the segments of one song share it."""
    if info.segments > 1:
        return f"{info.name}|{info.segments}|{info.duration_total}"
    return info.cache_key


def choose(infos: list, fraction: float, seed: int, previous: Optional[dict] = None) -> list[str]:
    """The cache keys to hold out. ``previous`` (a resumed run): {"held_out": keys, "trained": keys or None}; its
    held-out songs stay held out, its trained samples stay in training (None: unknown, so nothing new is held out)."""
    songs: dict[str, list[str]] = {}
    for info in infos:
        songs.setdefault(song_of(info), []).append(info.cache_key)
    target = held_out_count(len(infos), fraction)
    held, candidates = [], list(songs)
    if previous is not None:
        before = set(previous.get("held_out") or [])
        trained = previous.get("trained")
        held = [song for song, keys in songs.items() if before & set(keys)] if target else []
        seen = before | set(trained or [])
        candidates = [] if trained is None else [song for song, keys in songs.items() if not seen & set(keys)]
    count = sum(len(songs[s]) for s in held)
    rank = {s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest() for s in candidates}
    for song in sorted(candidates, key=rank.get):
        size = len(songs[song])
        if count >= target:
            break
        if count + size <= target or (count == 0 and size <= min(MAX_HELD_OUT, len(infos) // 2)):
            held.append(song)
            count += size
    return [key for song in held for key in songs[song]]


def subset(data: TensorDataset, keep: list[int]) -> TensorDataset:
    """The samples ``keep`` (indices) of a loaded dataset, sharing its tensors; its manifest lists only them."""
    part = copy.copy(data)
    part.samples = [data.samples[i] for i in keep]
    part.lengths = [data.lengths[i] for i in keep]
    part.manifest = dataclasses.replace(data.manifest, samples_info=[data.manifest.samples_info[i] for i in keep])
    return part


def quadrature(sampling: str, mu: float, sigma: float) -> tuple[float, ...]:
    """The fixed timesteps of the validation loss, equally weighted (see the module docstring)."""
    if sampling == "turbo_discrete":
        return TURBO_SHIFT3_TIMESTEPS
    normal = statistics.NormalDist()
    # t = max of two logit-normal draws: P(t <= x) = F(x)^2, so the q-quantile is F^-1(sqrt(q))
    return tuple(1 / (1 + math.exp(-(mu + sigma * normal.inv_cdf(math.sqrt((i + 0.5) / QUADRATURE_POINTS)))))
                 for i in range(QUADRATURE_POINTS))


def noise_seed(key: str) -> int:
    """The fixed noise of a held-out sample comes from its key alone (not the run's seed): runs with other
    settings on the same split measure on the same noise."""
    return int(hashlib.sha256(f"validation:{key}".encode()).hexdigest()[:15], 16)


def read_state(checkpoint: Optional[str]) -> Optional[dict]:
    """The split a checkpoint was trained with: {"held_out", "trained"}; for a checkpoint saved without validation,
    its trained samples from the training state (``trained`` None when unknown). None: a fresh run."""
    if checkpoint is None:
        return None
    try:
        with open(os.path.join(checkpoint, STATE_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"held_out": [], "trained": RunState.load(checkpoint).dataset_keys}


def best_info(output_dir: str) -> Optional[dict]:
    """best/best.json of a run ({"epoch", "step", "validation_loss", "samples", "adapter", "lora_file"}), or None."""
    try:
        with open(os.path.join(output_dir, BEST_DIR, BEST_INFO), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Validation:
    """The split of one run and, when samples are held out, its validation loss and ``best/`` (hooks for a
    Trainer, see ``attach``). ``split(cfg, data, resume_dir)`` makes one and returns the training samples too."""

    def __init__(self, cfg, held: Optional[TensorDataset], trained_keys: list, note: str):
        self.cfg, self.held, self.trained_keys, self.note = cfg, held, trained_keys, note
        self.keys = [s.cache_key for s in held.manifest.samples_info] if held is not None else []
        self.best: Optional[tuple] = None  # (loss, epoch)
        self.staged = None

    @classmethod
    def split(cls, cfg, data: TensorDataset) -> tuple[TensorDataset, Validation]:
        """-> (the samples to train on, the Validation). ``cfg``: TrainConfig; a resume (``cfg.resume_from``) keeps
        the split of the checkpoint it continues."""
        fraction, every = cfg.validation_split, cfg.validation_every_n_epochs
        infos = data.manifest.samples_info
        if fraction == 0:
            return data, cls(cfg, None, [], "")
        previous = read_state(resolve_resume(cfg.resume_from, cfg.output_dir))
        held = set(choose(infos, fraction, cfg.seed, previous))
        keep = [i for i, s in enumerate(infos) if s.cache_key not in held]
        out = [i for i, s in enumerate(infos) if s.cache_key in held]
        if held and len(keep) < cfg.batch_size:
            raise ValueError(f"batch_size {cfg.batch_size} is larger than the {len(keep)} samples left for training "
                             f"after validation_split {fraction} held out {len(out)}; lower batch_size or "
                             "validation_split.")
        train = subset(data, keep) if held else data
        trained = [infos[i].cache_key for i in keep]
        if held:
            names = [_label(infos[i]) for i in out]
            when = "every epoch" if every == 1 else f"every {every} epochs"
            note = (f"validation: {len(out)} of {len(infos)} samples held out ({', '.join(names[:6])}"
                    f"{', ...' if len(names) > 6 else ''}); its loss {when} and after the last, the lowest one's "
                    "LoRA kept in best/")
        elif previous is not None and previous.get("trained") is None:
            note = ("validation: off for this resumed run: its checkpoint does not say which samples were trained "
                    "on, so none can be held out honestly")
        elif previous is not None and held_out_count(len(infos), fraction):
            note = "validation: off: every sample was trained on before this resume; only new samples can be held out"
        else:
            note = f"validation: off: fewer than {MIN_SAMPLES} samples ({len(infos)}); all of them train"
        return train, cls(cfg, subset(data, out) if held else None, trained, note)

    def signature(self) -> dict:
        """What the run signature adds: the split, when samples are held out (nothing otherwise)."""
        if not self.keys:
            return {}
        digest = hashlib.sha256(json.dumps(sorted(self.keys)).encode()).hexdigest()[:16]
        return {"validation": {"split": self.cfg.validation_split, "held_out": digest}}

    def attach(self, trainer) -> None:
        """Plug into the Trainer's hooks: the split said at the start; the loss before the first step, after
        epochs, and best/; the split saved in every checkpoint."""
        if self.note:
            trainer.start_hooks.append(lambda t: (t.metrics.lines.append(self.note), log.info(self.note)))
            trainer.finish_hooks.append(self.finish)
        if self.cfg.validation_split > 0:
            trainer.checkpoint_hooks.append(self.save_state)
        if self.keys:
            trainer.start_hooks.append(self.start)
            trainer.epoch_hooks.append(self.after_epoch)

    # -- the loss ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, trainer) -> float:
        """The validation loss of the trainer's decoder as it is now."""
        device, dtype, net = trainer.device, trainer.dtype, trainer.net
        if self.staged is None:
            self.staged = copy.copy(self.held).to(device, dtype).samples
        t_values = quadrature(trainer.sampling, trainer.model_cfg.timestep_mu, trainer.model_cfg.timestep_sigma)
        t_all = torch.tensor(t_values, device=device, dtype=dtype)
        was_training = net.training
        net.eval()
        try:
            total = torch.zeros((), device=device)
            for key, sample in zip(self.keys, self.staged):
                x0 = sample["target_latents"]  # (T, 64)
                frames, rows = x0.shape[0], len(t_values)
                generator = torch.Generator(device=device).manual_seed(noise_seed(key))
                noise = torch.randn((rows, frames, x0.shape[1]), generator=generator, device=device, dtype=x0.dtype)
                step = max(1, min(rows, ROW_FRAMES // frames))
                for a in range(0, rows, step):
                    n = min(step, rows - a)
                    batch = Batch(x0.expand(n, -1, -1), sample["context_latents"].expand(n, -1, -1),
                                  sample["encoder_hidden_states"].expand(n, -1, -1), None, None, n * frames)
                    total = total + flow_loss(net, batch, Draw(noise[a:a + n], t_all[a:a + n]), None, dtype) * (
                        n / rows)
            return (total / len(self.keys)).item()
        finally:
            net.train(was_training)

    # -- hooks ---------------------------------------------------------------------------------------------------
    def start(self, trainer) -> None:
        """Before the first step: the restored losses (a resume) to the chart, best/ checked against them, and the
        LoRA-off loss (epoch 0) unless this run has it."""
        done = [n for n in trainer.metrics.notes if "validation_loss" in n]
        if done:
            trainer.metrics.announce(validation=[[n["step"], n["validation_loss"], n["epoch"]] for n in done])
        trained = [(n["validation_loss"], n["epoch"]) for n in done if n["epoch"] >= 1]
        self.best = min(trained) if trained else None
        text = trainer.dist.on_main(self._check_best, trainer)
        if text:
            trainer.metrics.record({"note": text}, text)
        if not any(n["epoch"] == 0 for n in done):
            value = trainer.dist.on_main(self._evaluate_off, trainer)
            self._record(trainer, value, 0, 0, "before training (LoRA off)")

    def after_epoch(self, trainer, epoch: int) -> None:
        if epoch % self.cfg.validation_every_n_epochs and epoch != self.cfg.train_epochs:
            return
        value = trainer.dist.on_main(self._measure, trainer, epoch)
        better = self.best is None or value < self.best[0]
        self._record(trainer, value, epoch, trainer.global_step, "(lowest so far: best/)" if better else "",
                     quiet=not better and epoch != self.cfg.train_epochs)
        if better:
            self.best = (value, epoch)

    # Under torchrun (distributed.py) process 0 alone measures and writes best/; every process records its value,
    # so the log and checkpoints agree everywhere, and an error there is raised in every process.
    def _evaluate_off(self, trainer) -> float:
        with lora.disabled(trainer.lora_layers):
            return self.evaluate(trainer)

    def _measure(self, trainer, epoch: int) -> float:
        """The loss after ``epoch``; best/ rewritten when it is the lowest so far."""
        value = self.evaluate(trainer)
        if self.best is None or value < self.best[0]:
            self._save_best(trainer, epoch, value)
        return value

    def _record(self, trainer, value: float, epoch: int, step: int, remark: str, quiet: bool = False) -> None:
        trainer.metrics.record(
            {"epoch": epoch, "step": step, "validation_loss": value, "validation_samples": len(self.keys)},
            f"validation loss {value:.5f} on {plural(len(self.keys), 'held-out sample')} at epoch {epoch} {remark}"
            .rstrip(), quiet, validation=[[step, value, epoch]])

    def save_state(self, trainer, directory: str) -> None:
        """Into a checkpoint folder being built: the split this run trains with."""
        atomic_write_json(os.path.join(directory, STATE_FILE), {
            "format": 1, "validation_split": self.cfg.validation_split, "held_out": self.keys,
            "trained": self.trained_keys})

    def finish(self, trainer) -> str:
        """The summary's lines (the split, best/); best/'s ComfyUI file published beside the periodic ones."""
        info = best_info(self.cfg.output_dir) if self.keys else None
        if info is None:
            return self.note
        text = (f"{self.note}\nbest epoch {info['epoch']} (validation loss {info['validation_loss']:.5f} on "
                f"{plural(len(self.keys), 'held-out sample')}): {os.path.join(self.cfg.output_dir, BEST_DIR)}")
        if self.cfg.loras_dir:
            target = unique_path(os.path.join(self.cfg.loras_dir, trainer.lora_name), "best", same_run=trainer.run_id)
            export.publish(os.path.join(self.cfg.output_dir, BEST_DIR, info["lora_file"]), target)
            text += f"; ComfyUI LoRA {os.path.relpath(target, self.cfg.loras_dir)}"
        return text

    # -- best/ ---------------------------------------------------------------------------------------------------
    def _save_best(self, trainer, epoch: int, value: float) -> None:
        cfg, file = self.cfg, f"{trainer.lora_name}_best.safetensors"
        metadata = export.lora_metadata(trainer.run_id, cfg, trainer.model_cfg.variant, trainer.targets,
                                        trainer.sampling, epoch, trainer.global_step, len(trainer.data),
                                        trainer.trigger_tag, trainer.dist.world)
        metadata["acestep_lora.validation_loss"] = repr(value)
        with atomic_directory(os.path.join(cfg.output_dir, BEST_DIR)) as tmp:
            export.write_lora_files(tmp, trainer.lora_layers, trainer.targets, cfg.lora_rank, cfg.lora_alpha,
                                    cfg.lora_dropout, file, metadata, cfg.comfy_dtype)
            self._write_info(tmp, epoch, trainer.global_step, value, file, trainer.run_id)

    def _write_info(self, directory: str, epoch: int, step: int, value: float, file: str, run_id: str) -> None:
        atomic_write_json(os.path.join(directory, BEST_INFO), {
            "epoch": epoch, "step": step, "validation_loss": value, "samples": len(self.keys), "adapter": "adapter",
            "lora_file": file, "run_id": run_id})

    def _check_best(self, trainer) -> Optional[str]:
        """best/ must hold the lowest epoch of the log this run continues. A resume from an earlier checkpoint can
        find it written later by the continuation it abandons: then it is rebuilt from the best epoch's checkpoint
        when there is one, else removed (the next lowest loss writes it again); returns what it did, for the log."""
        info, folder = best_info(self.cfg.output_dir), os.path.join(self.cfg.output_dir, BEST_DIR)
        if info is None or (self.best is not None and info["epoch"] == self.best[1]
                            and info["step"] <= trainer.global_step):
            return None
        epoch = self.best[1] if self.best is not None else None
        source = os.path.join(self.cfg.output_dir, "checkpoints", f"epoch_{epoch}")
        if epoch is not None and os.path.isfile(os.path.join(source, INFO_FILE)):
            saved, file = read_info(source), f"{trainer.lora_name}_best.safetensors"
            with atomic_directory(folder) as tmp:
                shutil.copytree(os.path.join(source, "adapter"), os.path.join(tmp, "adapter"))
                shutil.copyfile(os.path.join(source, saved["lora_file"]), os.path.join(tmp, file))
                self._write_info(tmp, epoch, saved["global_step"], self.best[0], file, trainer.run_id)
            text = f"best/ held epoch {info['epoch']}, later than this resume: rebuilt from {source}"
        else:
            shutil.rmtree(folder, ignore_errors=True)
            text = (f"best/ held epoch {info['epoch']}, later than this resume, and was removed; the next lowest "
                    "validation loss writes it again")
        return text


def _label(info) -> str:
    name = os.path.basename(info.name) or info.name
    return f"{name} (part {info.segment + 1}/{info.segments})" if info.segments > 1 else name
