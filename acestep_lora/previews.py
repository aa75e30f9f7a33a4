"""Audio previews while a LoRA trains (issue 12): a few short clips rendered with the LoRA as it is after some
epochs, and once with it off, so the musician hears what training does instead of guessing from a loss curve.

- What: ``preview_count`` clips (default 2) of ``preview_seconds`` (default 20 s), clip i at seed ``preview_seed`` +
  i. Prompts: the user's ``preview_captions`` / ``preview_lyrics`` when given (one per line or a JSON array /
  blocks separated by ``---``, as Prepare reads lists; the trigger tag is added as Prepare added it in training,
  unless the caption already holds it), else the captions, lyrics and metas of the held-out samples, then of the
  training samples (one per song; those captions already carry the tag). Clip i uses prompt i, cycling.
- When: after every ``preview_every_n_epochs`` epochs (-1: at each checkpoint, i.e. every
  ``save_every_n_epochs``; 0: never) and after the last epoch; and once before the first step with the LoRA off
  (scale 0): the base model's answer to the same prompts and seeds. A resumed run keeps that reference when its
  files are there for the same prompts.
- How: the official sampler (sampler.py) on the trainer's own LoRA-wrapped decoder, in eval mode for the call
  (sample_latents restores train mode); noise from the sampler's own seeded generator and the global RNG states
  saved and restored around everything here, so training with previews trains the same LoRA bit for bit. The
  text encoder and condition encoder run once, before the first step, and are released; the VAE's decoder alone
  is loaded for each decode (tiled) and released after it; all from the run's model source (source.py: the
  official folder or ComfyUI's files, XL included). Out of memory while rendering skips that set and says so.
- Several processes (torchrun, distributed.py): process 0 alone renders and writes; see the hooks below.
- Files: ``<run>/previews/prompts.json`` (the prompts as rendered), ``previews/base/preview_<i>.flac`` and
  ``previews/epoch_<N>/preview_<i>.flac``: 48 kHz stereo 24-bit FLAC; train_log.jsonl lines ``{"epoch", "step",
  "previews": [files relative to the run folder], "base"}``; ProgressEvent.previews entries (metrics.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from typing import Optional

import torch

from . import lora
from .audio import save_flac
from .device import release_memory
from .fileio import atomic_write_json
from .lists import BLOCK_SEPARATOR, _json_array
from .sampler import SAMPLE_RATE, Prompt, SamplerSettings, decode_audio, encode_prompts, sample_latents

log = logging.getLogger("acestep_lora.previews")

FOLDER, PROMPTS_FILE = "previews", "prompts.json"


def preview_epochs_every(cfg) -> int:
    """``preview_every_n_epochs`` resolved: -1 -> with each checkpoint (``save_every_n_epochs``)."""
    return cfg.save_every_n_epochs if cfg.preview_every_n_epochs < 0 else cfg.preview_every_n_epochs


def enabled(cfg) -> bool:
    return cfg.preview_every_n_epochs != 0


def attach(trainer) -> None:
    """Previews for a Trainer's run, when its config asks for them and the run is to train (not reused). A model
    source without a VAE or text encoder (a diffusion-model file alone) trains without previews, and says so at
    the start and in the summary."""
    if not enabled(trainer.cfg) or trainer.finished_dir is not None:
        return
    try:
        trainer.source.require("vae", "text_encoder")
    except (ValueError, FileNotFoundError) as e:
        note = (f"previews: off for this run: {e} Training needs only the diffusion model; previews also need its "
                "VAE and text encoder (on the command line: ComfyUI's models folder as --checkpoint-dir, or the "
                "official download).")
        trainer.start_hooks.append(lambda t: (t.metrics.lines.append(note), log.warning(note)))
        trainer.finish_hooks.append(lambda t: note)
        return
    Previews(trainer.cfg, trainer).attach(trainer)


def parse_texts(text: str, lyrics: bool = False) -> list[str]:
    """The user's captions (one per line, or a JSON array) or lyrics (a JSON array, or blocks separated by a line
    holding only ---); empty -> []."""
    text = (text or "").strip()
    if not text:
        return []
    array = _json_array(text)
    if array is not None:
        return [t.strip() for t in array if t.strip()]
    parts = BLOCK_SEPARATOR.split(text) if lyrics else text.splitlines()
    return [p.strip() for p in parts if p.strip()]


def has_tag(caption: str, tag: str) -> bool:
    return bool(re.search(rf"(^|[\s,]){re.escape(tag)}($|[\s,])", caption, re.IGNORECASE))


def choose_prompts(cfg, samples: list, metadata) -> tuple[list[Prompt], list[str]]:
    """-> (one Prompt per clip, notes for the log). ``samples``: SampleInfo, held-out ones first; ``metadata``: the
    manifest's DatasetMetadata (custom_tag, tag_position as Prepare applied them)."""
    from .prompts import apply_custom_tag

    notes = []
    captions, lyrics = parse_texts(cfg.preview_captions), parse_texts(cfg.preview_lyrics, lyrics=True)
    count = cfg.preview_count
    if len(captions) > count or len(lyrics) > count:
        notes.append(f"previews: the first {count} captions/lyrics are used (preview_count {count})")
    songs, seen = [], set()
    for info in samples:  # one per song: the segments of a long song share caption and lyrics
        if (info.name, info.caption) not in seen:
            seen.add((info.name, info.caption))
            songs.append(info)
    prompts = []
    for i in range(count):
        if captions:
            caption, tag = captions[i % len(captions)], metadata.custom_tag
            if tag and not has_tag(caption, tag):
                caption = apply_custom_tag(caption, tag, metadata.tag_position)
            text = lyrics[i % len(lyrics)] if lyrics else ""
            prompts.append(Prompt(caption, text, cfg.preview_seconds))
        else:
            info = songs[i % len(songs)]
            text = lyrics[i % len(lyrics)] if lyrics else info.lyrics
            prompts.append(Prompt(info.caption, text, cfg.preview_seconds, info.bpm, info.keyscale,
                                  info.timesignature, info.language))
    if captions and metadata.custom_tag and metadata.tag_position == "replace":
        notes.append(f"previews: tag_position 'replace' trained on the tag alone, so the preview captions are "
                     f"'{metadata.custom_tag}'")
    return [p.normalized() for p in prompts], notes


def prompt_record(prompt: Prompt) -> dict:
    return dataclasses.asdict(prompt)


def saved_previews(output_dir: str) -> list[dict]:
    """The preview sets on disk, base first, then by epoch: ``{"epoch", "base", "files": [absolute paths]}``."""
    root = os.path.join(output_dir, FOLDER)
    sets = []
    for name in (os.listdir(root) if os.path.isdir(root) else []):
        match = re.fullmatch(r"base|epoch_(\d+)", name)
        files = sorted((f for f in os.listdir(os.path.join(root, name)) if re.fullmatch(r"preview_\d+\.flac", f)),
                       key=lambda f: int(f[8:-5])) if match else []
        if files:
            sets.append({"epoch": int(match.group(1) or 0), "base": name == "base",
                         "files": [os.path.join(root, name, f) for f in files]})
    return sorted(sets, key=lambda s: (not s["base"], s["epoch"]))


class _Cancelled(Exception):
    pass


class Previews:
    """The previews of one run: ``attach(trainer)`` plugs them into a Trainer's hooks."""

    def __init__(self, cfg, trainer):
        self.cfg, self.every = cfg, preview_epochs_every(cfg)
        held = trainer.validation.held.manifest.samples_info if trainer.validation.held is not None else []
        self.prompts, self.notes = choose_prompts(cfg, [*held, *trainer.data.manifest.samples_info],
                                                  trainer.data.manifest.metadata)
        self.settings = SamplerSettings.for_variant(trainer.model_cfg.variant)
        self.root = os.path.join(cfg.output_dir, FOLDER)
        self.conditioning = None

    def attach(self, trainer) -> None:
        trainer.start_hooks.append(self.start)
        trainer.epoch_hooks.append(self.after_epoch)
        trainer.finish_hooks.append(self.finish)

    # -- hooks ---------------------------------------------------------------------------------------------------
    # Under torchrun (distributed.py) process 0 alone encodes, renders and writes (the others wait at the next step);
    # every process records what it shares, so the log and the checkpoints are the same everywhere, and an error in
    # process 0 stops every process with it.
    def start(self, trainer) -> None:
        """Before the first step: encode the prompts (then free the encoders), announce the sets a resumed run has,
        render the LoRA-off reference unless it is there for these prompts."""
        for note in self.notes:
            trainer.metrics.lines.append(note)
            log.info(note)
        kept = trainer.dist.on_main(self._prepare, trainer)
        if kept is None:
            self.render(trainer, "base", 0, 0)
        elif kept:  # rendered by an earlier attempt in this folder: listed now
            trainer.metrics.record(kept, f"previews of the LoRA off (base model): kept from before in "
                                         f"{os.path.join(self.root, 'base')}", previews=[self._entry(kept)])

    def after_epoch(self, trainer, epoch: int) -> None:
        if epoch == self.cfg.train_epochs or (self.every > 0 and epoch % self.every == 0):
            self.render(trainer, f"epoch_{epoch}", epoch, trainer.global_step)

    def finish(self, trainer) -> str:
        sets = saved_previews(self.cfg.output_dir)
        epochs = [str(s["epoch"]) for s in sets if not s["base"]]
        shown = epochs if len(epochs) <= 8 else [*epochs[:3], "...", *epochs[-3:]]
        return (f"previews: {self.root} ({len(self.prompts)} clips of {self.cfg.preview_seconds:g} s; LoRA off in "
                f"base/, epochs {', '.join(shown) or 'none'})")

    def _prepare(self, trainer) -> Optional[dict]:
        """Process 0's part of ``start``: -> None to render the LoRA-off set, {} when the log lists it, else the
        log entry of the LoRA-off files kept from before."""
        with self._quiet_rng(trainer):
            try:
                self.conditioning = encode_prompts(trainer.source, self.prompts, device=trainer.device,
                                                   dtype=trainer.dtype)
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"previews: {e} Previews need the model's text encoder and VAE; set "
                              "preview_every_n_epochs to 0 to train without them.") from None
        record = {"seed": self.cfg.preview_seed, "sampler": self.settings.describe(), "sample_rate": SAMPLE_RATE,
                  "prompts": [prompt_record(p) for p in self.prompts]}
        path = os.path.join(self.root, PROMPTS_FILE)
        same = _read_json(path) == record
        if not same:
            atomic_write_json(path, record)
        done = [n for n in trainer.metrics.notes if "previews" in n
                and all(os.path.isfile(os.path.join(self.cfg.output_dir, f)) for f in n["previews"])]
        if done:
            trainer.metrics.announce(previews=[self._entry(n) for n in done])
        base = [os.path.join(self.root, "base", f"preview_{i + 1}.flac") for i in range(len(self.prompts))]
        if not (same and all(os.path.isfile(f) for f in base)):
            return None
        if any(n.get("base") for n in done):
            return {}
        return {"epoch": 0, "step": 0, "previews": [os.path.relpath(f, self.cfg.output_dir) for f in base],
                "base": True}

    # -- rendering -----------------------------------------------------------------------------------------------
    def render(self, trainer, name: str, epoch: int, step: int) -> Optional[list[str]]:
        """Render the clips into previews/<name>/ (``epoch`` 0: the LoRA off; process 0), list them in
        train_log.jsonl and announce them; returns the files (relative to the run folder), None when skipped."""
        entry, line = trainer.dist.on_main(self._render, trainer, name, epoch, step)
        trainer.metrics.record(entry, line, previews=[self._entry(entry)] if "previews" in entry else [])
        return entry.get("previews")

    def _render(self, trainer, name: str, epoch: int, step: int) -> tuple[dict, str]:
        """Process 0's part of ``render``: the files written; -> (the log entry, its line)."""
        base, folder = epoch == 0, os.path.join(self.root, name)
        try:
            with self._quiet_rng(trainer):
                audio = self._clips(trainer, base)
        except _Cancelled:
            return {"note": f"previews {name} stopped by Cancel"}, f"previews {name} stopped by Cancel"
        except torch.OutOfMemoryError:
            release_memory(trainer.device)
            text = (f"previews {name} skipped: out of {trainer.device.type} memory while rendering (training goes on; "
                    "lower preview_seconds or preview_count)")
            return {"note": text}, text
        files = []
        for i, clip in enumerate(audio):
            path = os.path.join(folder, f"preview_{i + 1}.flac")
            save_flac(path, clip, SAMPLE_RATE)
            files.append(os.path.relpath(path, self.cfg.output_dir))
        what = "the LoRA off (base model)" if base else f"epoch {epoch}"
        return ({"epoch": epoch, "step": step, "previews": files, "base": base},
                f"previews of {what}: {folder} ({len(files)} x {self.cfg.preview_seconds:g} s)")

    def _clips(self, trainer, base: bool) -> list[torch.Tensor]:
        """[2, N] float32 CPU waveforms, one per prompt."""
        def progress(step, total):
            if trainer.cancel_requested is not None and trainer.cancel_requested():
                raise _Cancelled()

        null = trainer.objective.null_condition if self.settings.uses_cfg else None
        with lora.disabled(trainer.lora_layers) if base else contextlib.nullcontext():
            latents = [sample_latents(trainer.net, c, self.settings, self.cfg.preview_seed + i, None, null, progress)
                       for i, c in enumerate(self.conditioning)]
        # the decoder alone, only while it decodes
        vae = trainer.source.load_vae(device=trainer.device, dtype=trainer.dtype, encoder=False)
        try:
            return [decode_audio(vae, x)[0] for x in latents]
        finally:
            del vae
            release_memory(trainer.device)

    def _entry(self, line: dict) -> dict:
        """A train_log.jsonl previews line as ProgressEvent.previews carries it."""
        return {"epoch": line["epoch"], "step": line["step"], "base": bool(line.get("base")),
                "files": list(line["previews"]), "captions": [p.caption for p in self.prompts]}

    @staticmethod
    @contextlib.contextmanager
    def _quiet_rng(trainer):
        """Whatever loading and sampling do, the training RNGs (global CPU, CUDA) come out as they went in."""
        devices = [trainer.device] if trainer.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
