"""ACE-Step 1.5 text-to-music sampling: caption, lyrics, duration and seed -> audio, optionally with a LoRA.

The steps, split so a training loop can render previews without reloading anything per preview:
  1. ``encode_prompts`` / ``encode_prompt``: prompts -> ``Conditioning`` (text encoder + condition encoder, both
     released afterwards). Built exactly as prepare.py builds the training conditioning, which is how official
     inference builds it;
  2. ``sample_latents``: a pure sampling loop over an already-loaded decoder (plain, LoRA-merged, or wrapped in
     ``lora.inject`` layers) -> latents [B, T, 64];
  3. ``decode_audio``: VAE decode -> 48 kHz stereo;
  4. ``generate``: all of it, loading each model only while it is needed; ``add_sample_command``: the CLI.

What the official code does, read in ace-step/ACE-Step-1.5 (facts only; no code was copied):
- turbo (``acestep/models/turbo/modeling_acestep_v15_turbo.py`` @14bd1db, ``generate_audio``, ``prepare_noise``,
  ``get_x0_from_noise``): 8 fixed steps on the discrete table of shift 1, 2 or 3 (other shifts are rounded to the
  nearest there; we refuse them instead), Euler ``x <- x - v (t_i - t_{i+1})`` with the timestep built in the model
  dtype, and the last step predicts ``x0 = x - v t`` directly; no CFG; the noise is one ``randn`` of [B, T, 64]
  from ``torch.Generator(device).manual_seed(seed)`` in the model dtype (a list of seeds: one draw per row);
- base / sft (``acestep/models/base/modeling_acestep_v15_base.py`` and ``.../sft/...`` @14bd1db,
  ``generate_audio``): ``t = linspace(1, 0, steps + 1)`` in the model dtype, shifted by ``s t / (1 + (s - 1) t)``
  when s != 1, Euler down to t = 0; CFG when guidance > 1 by running [condition, ``null_condition_emb``] as one
  batch and combining with APG (``acestep/models/common/apg_guidance.py`` ``apg_forward`` / ``MomentumBuffer`` /
  ``project``: momentum -0.75, norm threshold 2.5 over the time axis (dims=[1]), eta 0, projection in float64)
  inside ``cfg_interval`` [0, 1] (the conditional prediction alone outside it);
- conditioning (``acestep/handler.py`` @f30aee4, ``_prepare_batch``, ``infer_refer_latent``, ``preprocess_batch``,
  ``service_generate``; the model's ``prepare_condition``): caption and lyric prompts as acestep_lora.prompts
  builds them, "no reference audio" = the first ``timbre_fix_frame`` (750) frames of the silence latent, one per
  batch row, context latents = [silence latent's first T frames, ones] (text2music: ``is_covers`` 0,
  ``chunk_masks`` 1); T = ``int(round(duration, 1) * 48000) // 1920`` (``create_target_wavs``);
- defaults (``acestep/ui/gradio/events/generation/model_config.py`` ``get_ui_control_config``, and the API's
  ``guidance_scale = 7.0``): turbo 8 steps, shift 3; sft 50 steps, base 32 steps, both guidance 7.0, shift 3,
  APG (``use_adg`` off), ``cfg_interval`` 0..1, ODE (Euler);
- decode (``handler.generate_music`` and ``tiled_decode``): VAE decode in windows of 512 latent frames with 64 of
  discarded overlap, then divide each clip by its peak if the peak exceeds 1 (anti-clipping), no other processing.

Deliberate differences: the official handler pads the latent length to at least 128 frames (5.12 s) and returns
that longer audio; we generate exactly the requested length (the official UI's minimum is 10 s anyway). The SDE
method, ADG, Heun and repaint/cover modes of ``generate_audio`` are not implemented (text-to-music only).
tests/test_sampler.py checks the turbo path against ``golden_generate.safetensors`` (computed by the official
``generate_audio``) to 1e-5 relative error in fp32.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from typing import Optional, Union
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .checkpoint import DEFAULT_CONFIG_PATH
from .config import AceStepConfig
from .device import compute_dtype, release_memory, resolve_device
from .metadata import (normalize_bpm, normalize_keyscale, normalize_language, normalize_lyrics,
                       normalize_timesignature, prompt_language)
from .prepare import context_latents_for
from .prompts import caption_prompt, lyrics_prompt

SAMPLE_RATE = 48000
HOP = 1920  # audio samples per latent frame (25 latent frames per second)
MAX_DURATION = 600.0  # seconds; the official limit (the silence latent covers 600 s)

# The turbo models' fixed 8-step schedules (official generate_audio), one per distilled shift; each equals
# shift·s / (1 + (shift - 1)·s) at s = 1, 7/8, ..., 1/8 (tests/test_sampler.py checks this).
TURBO_TIMESTEPS = {
    1.0: (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125),
    2.0: (1.0, 0.9333333333333333, 0.8571428571428571, 0.7692307692307693, 0.6666666666666666, 0.5454545454545454,
          0.4, 0.2222222222222222),
    3.0: (1.0, 0.9545454545454546, 0.9, 0.8333333333333334, 0.75, 0.6428571428571429, 0.5, 0.3),
}
VARIANT_DEFAULTS = {  # steps, shift, guidance scale
    "turbo": (8, 3.0, 1.0),
    "base": (32, 3.0, 7.0),
    "sft": (50, 3.0, 7.0),
}
APG_MOMENTUM = -0.75
APG_NORM_THRESHOLD = 2.5
DECODE_WINDOW, DECODE_OVERLAP = 512, 64  # latent frames; each window keeps its middle 512 - 2·64


# ---------------------------------------------------------------------------------------------------------------
# What to generate


@dataclass(frozen=True)
class Prompt:
    """One piece of music to generate. ``normalized()`` accepts what people type (as the training samples do)."""

    caption: str
    lyrics: str = ""  # empty -> "[Instrumental]", as in training
    duration: float = 30.0  # seconds
    bpm: object = None
    keyscale: str = ""
    timesignature: str = ""
    language: str = "unknown"

    def normalized(self) -> Prompt:
        caption = (self.caption or "").strip()
        if not caption:
            raise ValueError("caption is empty; describe the music (genre, instruments, mood), e.g. "
                             "'upbeat synth pop, female vocal'.")
        try:
            duration = float(self.duration)
        except (TypeError, ValueError):
            raise ValueError(f"duration '{self.duration}' is not a number of seconds, e.g. 30.") from None
        if not 0 < duration <= MAX_DURATION or frames_for_duration(duration) < 1:
            raise ValueError(f"duration {self.duration} s is outside 0.1-{MAX_DURATION:g} s; choose e.g. 30.")
        return Prompt(caption, normalize_lyrics(self.lyrics), duration, normalize_bpm(self.bpm),
                      normalize_keyscale(self.keyscale), normalize_timesignature(self.timesignature),
                      normalize_language(self.language))

    @property
    def frames(self) -> int:
        return frames_for_duration(self.duration)

    def caption_text(self) -> str:
        return caption_prompt(self.caption, self.bpm, self.timesignature, self.keyscale, self.duration)

    def lyrics_text(self) -> str:
        return lyrics_prompt(self.lyrics, prompt_language(self.language))


def frames_for_duration(seconds: float) -> int:
    """Latent frames for a duration, as the official handler computes them (0.1 s precision, 1920 samples each)."""
    return int(max(0.1, round(float(seconds), 1)) * SAMPLE_RATE) // HOP


@dataclass
class Conditioning:
    """What the decoder is conditioned on: the condition encoder's output (before the decoder's own
    ``condition_embedder``), its mask, and the silence latent the text2music context is built from."""

    encoder_hidden_states: torch.Tensor  # [B, L, H]
    encoder_attention_mask: torch.Tensor  # [B, L] bool (the decoder ignores it, as the official one does)
    silence_latent: torch.Tensor  # [1, T_sil, 64]
    prompt: Optional[Prompt] = None

    @property
    def batch_size(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def to(self, device=None, dtype=None) -> Conditioning:
        return replace(self, encoder_hidden_states=self.encoder_hidden_states.to(device=device, dtype=dtype),
                       encoder_attention_mask=self.encoder_attention_mask.to(device=device),
                       silence_latent=self.silence_latent.to(device=device, dtype=dtype))

    def context_latents(self, frames: int) -> torch.Tensor:
        """[B, T, 128]: silence latent + all-ones chunk mask (the text2music context), one per row."""
        context = context_latents_for(self.silence_latent, frames)
        return context.unsqueeze(0).expand(self.batch_size, -1, -1)


# ---------------------------------------------------------------------------------------------------------------
# 1. Prompts -> conditioning


@torch.no_grad()
def condition(condition_encoder: torch.nn.Module, text: torch.Tensor, text_mask: torch.Tensor, lyric: torch.Tensor,
              lyric_mask: torch.Tensor, silence: torch.Tensor, timbre_fix_frame: int) -> tuple:
    """The condition encoder on embedded prompts [B, L, text_dim] with "no reference audio" (the silence latent's
    first ``timbre_fix_frame`` frames, one clip per row) -> (states [B, L', H], mask [B, L'] bool)."""
    weight = condition_encoder.text_projector.weight
    dtype, device = weight.dtype, weight.device
    batch = text.shape[0]
    timbre = silence[:, :timbre_fix_frame].to(device, dtype).expand(batch, -1, -1)
    return condition_encoder(
        text_hidden_states=text.to(device, dtype), text_attention_mask=text_mask.to(device, dtype),
        lyric_hidden_states=lyric.to(device, dtype), lyric_attention_mask=lyric_mask.to(device, dtype),
        refer_audio_acoustic_hidden_states_packed=timbre,
        refer_audio_order_mask=torch.arange(batch, device=device))


def encode_prompt(text_encoder, condition_encoder: torch.nn.Module, silence: torch.Tensor, prompt: Prompt,
                  timbre_fix_frame: int) -> Conditioning:
    """One normalized prompt -> Conditioning, with already-loaded encoders."""
    text, text_mask = text_encoder.encode_caption(prompt.caption_text())
    lyric, lyric_mask = text_encoder.embed_lyrics(prompt.lyrics_text())
    states, mask = condition(condition_encoder, text, text_mask, lyric, lyric_mask, silence, timbre_fix_frame)
    return Conditioning(states, mask, silence, prompt)


def model_source(source, config_path: str = DEFAULT_CONFIG_PATH):
    """A ``source.ModelSource``: ``source`` itself, or the official folder ``source`` (a checkpoint_dir) with
    ``config_path``."""
    from .source import ModelSource

    return source if isinstance(source, ModelSource) else ModelSource.official(source, config_path)


def encode_prompts(source, prompts: list, config_path: str = DEFAULT_CONFIG_PATH, device="cpu",
                   dtype: torch.dtype = torch.float32) -> list:
    """Load the text encoder and the condition encoder, encode every prompt, release both. ``source``: a
    ``source.ModelSource`` (official folder or ComfyUI files), or an official checkpoint_dir with ``config_path``.

    A training loop calls this once before training and keeps the (small) Conditionings for its previews.
    """
    source = model_source(source, config_path)
    source.require("text_encoder")
    prompts = [p.normalized() for p in prompts]
    device = torch.device(device)
    silence = source.load_silence_latent(device=device, dtype=dtype)  # ComfyUI files: derived from the VAE once
    text_encoder = source.load_text_encoder(device=device, dtype=dtype)
    model = source.load_dit(("encoder",), device=device, dtype=dtype)
    try:
        return [encode_prompt(text_encoder, model.encoder, silence, p, model.config.timbre_fix_frame)
                for p in prompts]
    finally:
        del text_encoder, model
        release_memory(device)


# ---------------------------------------------------------------------------------------------------------------
# 2. The sampling loop


def variant_family(variant: str) -> str:
    """AceStepConfig.variant -> the sampler family: 'turbo', 'sft' or 'base'."""
    variant = (variant or "").lower()
    if variant.startswith("turbo"):
        return "turbo"
    return "sft" if "sft" in variant else "base"


@dataclass(frozen=True)
class SamplerSettings:
    """Schedule and guidance; ``for_variant`` fills in the official defaults for a model family."""

    variant: str = "turbo"  # turbo | base | sft
    steps: int = 8
    shift: float = 3.0
    guidance_scale: float = 1.0  # > 1: CFG with APG against the null condition (base/sft only)
    cfg_interval: tuple = (0.0, 1.0)  # guidance applies while cfg_interval[0] <= t <= cfg_interval[1]

    @classmethod
    def for_variant(cls, variant: str, steps: Optional[int] = None, shift: Optional[float] = None,
                    guidance_scale: Optional[float] = None, cfg_interval: Optional[tuple] = None) -> SamplerSettings:
        family = variant_family(variant)
        d_steps, d_shift, d_guidance = VARIANT_DEFAULTS[family]
        settings = cls(family, d_steps if steps is None else int(steps), d_shift if shift is None else float(shift),
                       d_guidance if guidance_scale is None else float(guidance_scale),
                       tuple(cfg_interval) if cfg_interval is not None else (0.0, 1.0))
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.variant not in VARIANT_DEFAULTS:
            raise ValueError(f"variant '{self.variant}' is not one of {', '.join(VARIANT_DEFAULTS)}.")
        if self.variant == "turbo":
            if self.steps != 8:
                raise ValueError(f"steps {self.steps}: turbo models are distilled for a fixed 8-step schedule; "
                                 "leave steps at 8 (base/sft models take other step counts).")
            if float(self.shift) not in TURBO_TIMESTEPS:
                raise ValueError(f"shift {self.shift}: turbo models have schedules for shift 1, 2 or 3 only.")
            if self.guidance_scale != 1.0:
                raise ValueError(f"guidance {self.guidance_scale}: turbo models are distilled without CFG; "
                                 "guidance applies to base/sft models only (leave it at 1.0).")
            return
        if self.steps < 1:
            raise ValueError(f"steps {self.steps} must be at least 1 (official default "
                             f"{VARIANT_DEFAULTS[self.variant][0]}).")
        if not self.shift > 0:
            raise ValueError(f"shift {self.shift} must be > 0 (official default 3.0).")
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance {self.guidance_scale} must be >= 1.0 (1.0 = no guidance; official default "
                             "7.0).")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval {self.cfg_interval} must satisfy 0 <= start <= end <= 1.")

    @property
    def uses_cfg(self) -> bool:
        return self.variant != "turbo" and self.guidance_scale > 1.0

    def timesteps(self, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The t values the decoder is evaluated at, in the model dtype, plus (base/sft) the final 0."""
        if self.variant == "turbo":
            return torch.tensor(TURBO_TIMESTEPS[float(self.shift)], device=device, dtype=dtype)
        t = torch.linspace(1.0, 0.0, self.steps + 1, device=device, dtype=dtype)
        if self.shift != 1.0:
            t = self.shift * t / (1 + (self.shift - 1) * t)
        return t

    def describe(self) -> str:
        text = f"{self.variant}: {self.steps} steps, shift {self.shift:g}"
        if self.variant != "turbo":
            text += (f", guidance {self.guidance_scale:g} (APG, interval {self.cfg_interval[0]:g}-"
                     f"{self.cfg_interval[1]:g})" if self.uses_cfg else ", no guidance")
        return text


class _Momentum:
    """APG's running average of the guidance difference (momentum -0.75, official MomentumBuffer)."""

    def __init__(self, momentum: float = APG_MOMENTUM):
        self.momentum, self.average = momentum, None

    def update(self, diff: torch.Tensor) -> torch.Tensor:
        self.average = diff if self.average is None else diff + self.momentum * self.average
        return self.average


def apg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, momentum: Optional[_Momentum] = None,
        dims: tuple = (1,), norm_threshold: float = APG_NORM_THRESHOLD, eta: float = 0.0) -> torch.Tensor:
    """Adaptive projected guidance: cond + (scale - 1)·(the part of the momentum-averaged, norm-capped difference
    orthogonal to cond), norms and projection taken over ``dims`` (the time axis of [B, T, C])."""
    diff = cond - uncond
    if momentum is not None:
        diff = momentum.update(diff)
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(diff), norm_threshold / norm)
    # The projection runs in float64 (on the CPU for MPS, which has no float64), as the official code does.
    work = torch.device("cpu") if diff.device.type == "mps" else diff.device
    d, c = diff.to(work, torch.float64), cond.to(work, torch.float64)
    unit = F.normalize(c, dim=dims)
    parallel = (d * unit).sum(dim=dims, keepdim=True) * unit
    orthogonal = d - parallel
    update = orthogonal.to(cond.device, cond.dtype) + eta * parallel.to(cond.device, cond.dtype)
    return cond + (scale - 1) * update


def initial_noise(shape: tuple, seed: Union[int, list], device, dtype: torch.dtype) -> torch.Tensor:
    """Official prepare_noise: one seeded draw of [B, T, 64] on the sampling device, or one per row for a list."""
    if isinstance(seed, (list, tuple)):
        rows = [torch.randn((1,) + tuple(shape[1:]), generator=torch.Generator(device=device).manual_seed(int(s)),
                            device=device, dtype=dtype) for s in seed]
        return torch.cat(rows, dim=0)
    return torch.randn(shape, generator=torch.Generator(device=device).manual_seed(int(seed)), device=device,
                       dtype=dtype)


@torch.no_grad()
def sample_latents(decoder: torch.nn.Module, conditioning: Conditioning, settings: SamplerSettings,
                   seed: Union[int, list] = 0, frames: Optional[int] = None,
                   null_condition: Optional[torch.Tensor] = None,
                   progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Run the official text2music sampler on ``decoder`` -> latents [B, T, 64] in the decoder's dtype.

    ``decoder``: the DiT (``model.decoder``), with or without LoRA; it is put in eval mode for the call and
    restored. Its dtype and device decide the computation (bf16 weights: the loop runs under bf16 autocast, so
    fp32 LoRA layers mix in as in training). ``frames`` defaults to the conditioning prompt's duration.
    ``null_condition`` (``model.null_condition_emb`` [1, 1, H]) is needed when ``settings.uses_cfg``.
    ``progress(step, total)`` is called after every step; raising from it stops sampling.
    """
    settings.validate()
    if frames is None:
        if conditioning.prompt is None:
            raise ValueError("frames: give the number of latent frames (25 per second); this Conditioning has no "
                             "prompt to take the duration from.")
        frames = conditioning.prompt.frames
    if frames < 1:
        raise ValueError(f"frames {frames} must be at least 1 (25 frames per second).")
    if settings.uses_cfg and null_condition is None:
        raise ValueError(f"guidance {settings.guidance_scale} needs the null condition (model.null_condition_emb); "
                         "load the DiT with components including 'null_condition_emb', or use guidance 1.0.")
    weight = decoder.proj_in[1].weight
    device, dtype = weight.device, weight.dtype
    cond = conditioning.to(device, dtype)
    batch = cond.batch_size
    if isinstance(seed, (list, tuple)) and len(seed) != batch:
        raise ValueError(f"seed: {len(seed)} seeds for {batch} conditioning rows; give one seed, or one per row.")
    states, context = cond.encoder_hidden_states, cond.context_latents(frames)
    if settings.uses_cfg:
        states = torch.cat([states, null_condition.to(device, dtype).expand_as(states)], dim=0)
        context = torch.cat([context, context], dim=0)

    x = initial_noise((batch, frames, decoder.config.audio_acoustic_hidden_dim), seed, device, dtype)
    t = settings.timesteps(device, dtype)
    turbo = settings.variant == "turbo"
    total = len(t) if turbo else len(t) - 1
    momentum = _Momentum()
    was_training = decoder.training
    decoder.eval()
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            for i in range(total):
                t_now = t[i]
                x_in = torch.cat([x, x], dim=0) if settings.uses_cfg else x
                t_vec = t_now * torch.ones(x_in.shape[0], device=device, dtype=dtype)
                v = decoder(hidden_states=x_in, timestep=t_vec, timestep_r=t_vec, encoder_hidden_states=states,
                            context_latents=context)[0]
                if settings.uses_cfg:
                    v_cond, v_null = v.chunk(2)
                    lo, hi = settings.cfg_interval
                    v = (apg(v_cond, v_null, settings.guidance_scale, momentum)
                         if lo <= float(t_now) <= hi else v_cond)
                if turbo and i == total - 1:  # the last turbo step predicts x0 directly
                    dt = t_now.item()
                elif turbo:
                    dt = t_now.item() - t[i + 1].item()
                else:
                    dt = t_now - t[i + 1]
                x = (x - v * (dt * torch.ones(batch, device=device, dtype=dtype))[:, None, None]).to(dtype)
                if progress is not None:
                    progress(i + 1, total)
    finally:
        decoder.train(was_training)
    return x


# ---------------------------------------------------------------------------------------------------------------
# 3. Latents -> audio


@torch.no_grad()
def decode_audio(vae, latents: torch.Tensor) -> torch.Tensor:
    """latents [B, T, 64] -> float32 audio [B, 2, T·1920] on the CPU: tiled VAE decode, then each clip divided by
    its peak when that exceeds 1 (the official anti-clipping step)."""
    audio = vae.decode_tiled(latents.transpose(1, 2), chunk_frames=DECODE_WINDOW - 2 * DECODE_OVERLAP,
                             overlap_frames=DECODE_OVERLAP).float().cpu()
    peak = audio.abs().amax(dim=(1, 2), keepdim=True)
    return audio / peak.clamp(min=1.0)


# ---------------------------------------------------------------------------------------------------------------
# 4. Everything, loading each model only while needed


@dataclass
class GenerateResult:
    waveform: torch.Tensor  # [2, N] float32, 48 kHz
    sample_rate: int
    latents: torch.Tensor  # [T, 64]
    prompt: Prompt
    settings: SamplerSettings
    seed: int
    config_path: str
    device: str
    dtype: str
    lora: str = ""  # description, "" without a LoRA
    lora_scale: float = 0.0
    notes: list = field(default_factory=list)  # assumptions the user should see
    seconds: dict = field(default_factory=dict)  # wall time per phase


def generate(source, prompt: Prompt, *, config_path: str = DEFAULT_CONFIG_PATH, seed: int = 0,
             steps: Optional[int] = None, shift: Optional[float] = None, guidance_scale: Optional[float] = None,
             lora: Optional[str] = None, lora_scale: float = 1.0, device: str = "auto",
             progress: Optional[Callable[[int, int], None]] = None) -> GenerateResult:
    """Generate one clip. Every input is checked (LoRA shape included) before a model is loaded. ``source``: a
    ``source.ModelSource`` (official folder or ComfyUI files, XL included), or an official checkpoint_dir with
    ``config_path``."""
    from .lora_io import check_lora_fits, merge_lora_, read_lora
    from .model import AceStepModel

    notes = []
    if not (prompt.lyrics or "").strip():
        notes.append("no lyrics given: '[Instrumental]' used, as the training prompts do")
    prompt = prompt.normalized()
    source = model_source(source, config_path)
    source.require("vae", "text_encoder")
    cfg: AceStepConfig = source.config
    settings = SamplerSettings.for_variant(cfg.variant, steps, shift, guidance_scale)
    if not math.isfinite(float(lora_scale)):
        raise ValueError(f"scale {lora_scale} is not a finite number; use e.g. 1.0.")
    weights = None
    if lora:
        weights = read_lora(lora)
        with torch.device("meta"):
            check_lora_fits(weights, AceStepModel(cfg, components=("decoder",)).decoder)
        notes += weights.notes
    dev = resolve_device(device)
    dtype = compute_dtype(dev)
    seconds = {}

    started = time.time()
    conditioning = encode_prompts(source, [prompt], device=dev, dtype=dtype)[0]
    seconds["encode"] = time.time() - started

    started = time.time()
    components = ("decoder", "null_condition_emb") if settings.uses_cfg else ("decoder",)
    model = source.load_dit(components, device=dev, dtype=dtype)
    try:
        if weights is not None:
            merge_lora_(model.decoder, weights, float(lora_scale))
        null = model.null_condition_emb if settings.uses_cfg else None
        latents = sample_latents(model.decoder, conditioning, settings, seed, prompt.frames, null, progress)
    finally:
        del model
        release_memory(dev)
    seconds["sample"] = time.time() - started

    started = time.time()
    vae = source.load_vae(device=dev, dtype=dtype, encoder=False)
    try:
        audio = decode_audio(vae, latents)
    finally:
        del vae
        release_memory(dev)
    seconds["decode"] = time.time() - started
    return GenerateResult(audio[0], SAMPLE_RATE, latents[0].float().cpu(), prompt, settings, int(seed),
                          source.name, dev.type, str(dtype).replace("torch.", ""),
                          weights.describe() if weights is not None else "",
                          float(lora_scale) if weights is not None else 0.0, notes, seconds)


# ---------------------------------------------------------------------------------------------------------------
# The `sample` CLI command (registered by __main__.py)

SAMPLE_EPILOG = """\
examples:
  python -m acestep_lora sample --checkpoint-dir checkpoints --caption "dreamy lofi piano" --duration 30 \\
      --seed 0 -o out.flac
  python -m acestep_lora sample --checkpoint-dir checkpoints --lora runs/my_lora/final --scale 0.8 \\
      --caption "dreamy lofi piano, my_tag" --lyrics-file lyrics.txt --language en -o with_lora.flac
"""


def add_sample_command(subparsers) -> argparse.ArgumentParser:
    """Register ``sample`` on an argparse subparsers object; its handler is ``args.run(args)``."""
    p = subparsers.add_parser(
        "sample", help="generate a clip with the DiT, optionally with a LoRA (hear a LoRA headless)",
        description="Text-to-music with ACE-Step 1.5 exactly as the official generate_audio (turbo: 8 steps; "
                    "base/sft: CFG with APG), optionally with a LoRA merged at a scale. Writes a 48 kHz stereo FLAC.",
        epilog=SAMPLE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint-dir", required=True,
                   help="folder holding acestep-v15-*/, vae/ and Qwen3-Embedding-0.6B/ (the official download), or "
                        "ComfyUI's models folder, or the folder a relative .safetensors --config-path is in")
    p.add_argument("--config-path", default=DEFAULT_CONFIG_PATH,
                   help=f"DiT folder under --checkpoint-dir (default {DEFAULT_CONFIG_PATH}), or a ComfyUI "
                        "diffusion-model or all-in-one .safetensors file (as for train)")
    p.add_argument("--vae", default="auto", help="VAE file for a .safetensors --config-path (default auto, as for "
                                                 "prepare)")
    p.add_argument("--text-encoder", default="auto",
                   help="text encoder file for a .safetensors --config-path (default auto, as for prepare)")
    p.add_argument("--variant", default="auto", choices=("auto", "turbo", "base", "sft"),
                   help="turbo, base or sft, for a file whose name does not say it (default auto)")
    p.add_argument("--lora", default="",
                   help="PEFT adapter folder, ComfyUI .safetensors LoRA file, or a training run's final/ or "
                        "checkpoints/epoch_N/ folder")
    p.add_argument("--scale", type=float, default=1.0,
                   help="LoRA strength: dW = scale * (alpha/r) * B A (default 1.0; 0 = the model alone)")
    p.add_argument("--caption", required=True, help="what the music is: genre, instruments, mood, your LoRA's tag")
    p.add_argument("--lyrics", default="", help="lyrics with [verse]/[chorus] tags; empty = instrumental")
    p.add_argument("--lyrics-file", default="", help="read the lyrics from this UTF-8 text file instead")
    p.add_argument("--language", default="unknown", help="lyrics language code (en, zh, ja, ...; default unknown)")
    p.add_argument("--bpm", default=None, help="tempo written into the prompt (default N/A)")
    p.add_argument("--keyscale", default="", help='key written into the prompt, e.g. "C major", "Am" (default N/A)')
    p.add_argument("--timesignature", default="", help="beats per bar written into the prompt: 2, 3, 4 or 6")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of audio (default 30, max 600)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives the same audio (-1: random)")
    p.add_argument("--steps", type=int, default=None,
                   help="diffusion steps (default: turbo 8, fixed; base 32; sft 50)")
    p.add_argument("--shift", type=float, default=None,
                   help="timestep shift (default 3; turbo: 1, 2 or 3)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale with APG for base/sft (default 7.0; 1.0 = none); turbo uses none")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (default auto)")
    p.add_argument("-o", "--output", required=True, help="FLAC file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.set_defaults(run=run_sample_command)
    return p


def run_sample_command(args) -> int:
    from .audio import save_flac

    output = args.output
    if not output.lower().endswith(".flac"):
        raise ValueError(f"-o '{output}': the output is a FLAC file; give a name ending in .flac.")
    if os.path.exists(output) and not args.overwrite:
        raise FileExistsError(f"-o '{output}' already exists; choose another name or pass --overwrite.")
    lyrics = args.lyrics
    if args.lyrics_file:
        if lyrics:
            raise ValueError("give --lyrics or --lyrics-file, not both.")
        if not os.path.isfile(args.lyrics_file):
            raise FileNotFoundError(f"--lyrics-file '{args.lyrics_file}' does not exist.")
        with open(args.lyrics_file, encoding="utf-8") as f:
            lyrics = f.read()
    seed = random.randint(0, 2 ** 32 - 1) if args.seed < 0 else args.seed
    prompt = Prompt(args.caption, lyrics, args.duration, args.bpm, args.keyscale, args.timesignature,
                    args.language)
    last = [0.0]

    def progress(step, total):
        if time.time() - last[0] > 2 or step == total:
            last[0] = time.time()
            print(f"  step {step}/{total}", flush=True)

    from .source import from_config

    source = from_config(argparse.Namespace(checkpoint_dir=args.checkpoint_dir, config_path=args.config_path,
                                            vae=args.vae, text_encoder=args.text_encoder, variant=args.variant))
    result = generate(source, prompt, seed=seed, steps=args.steps,
                      shift=args.shift, guidance_scale=args.guidance, lora=args.lora or None,
                      lora_scale=args.scale, device=args.device, progress=progress)
    save_flac(output, result.waveform, result.sample_rate)
    print(describe_result(result, output))
    return 0


def describe_result(result: GenerateResult, path: str) -> str:
    p = result.prompt
    lines = [f"Wrote {path}: {result.waveform.shape[-1] / result.sample_rate:.2f} s, {result.sample_rate} Hz stereo "
             "FLAC",
             f"  model: {result.config_path} on {result.device} ({result.dtype}); {result.settings.describe()}; "
             f"seed {result.seed}",
             f"  LoRA: {result.lora} at scale {result.lora_scale:g}" if result.lora else "  LoRA: none",
             f"  caption: {p.caption!r}; lyrics: {p.lyrics[:60]!r}{'...' if len(p.lyrics) > 60 else ''}; "
             f"language {p.language}; bpm {p.bpm or 'N/A'}; key {p.keyscale or 'N/A'}; "
             f"time signature {p.timesignature or 'N/A'}; duration {p.duration:g} s ({p.frames} latent frames)",
             "  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())]
    lines += [f"  note: {n}" for n in result.notes]
    return "\n".join(lines)
