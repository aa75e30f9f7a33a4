"""Turn audio + metadata into the training tensors (one ``.pt`` per sample + ``manifest.json``), spec §3.

Per sample, as the official preprocessing does, but with the conditioning built exactly as official inference
builds it, so training sees what generation sees:
  audio -> 48 kHz stereo, cropped to ``max_duration`` -> tiled VAE encode -> one posterior sample (seeded)
  caption (+ custom tag) -> SFT_GEN_PROMPT with metas -> Qwen3-Embedding
  lyrics -> "# Languages ... # Lyric ..." prompt -> token embeddings
  condition encoder, with the silence latent as the "no reference audio" timbre input (inference's choice)
  context latents = [silence latent, ones] (the text2music context)

Two decisions differ from the official *training* preprocessing and follow official *inference* instead:
the lyric header and unpadded prompts (newer official preprocessing does the same), and the timbre input. The
metas duration is the length actually encoded (after cropping), not the file's full length.

Each sample's tensors are cached under a content hash of (audio, metadata, tag settings, max_duration, checkpoint
identity, dtype, preprocessing version): re-running encodes nothing, adding a sample encodes only that one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import audio as audio_io
from .checkpoint import (TEXT_ENCODER_DIR, VAE_DIR, dit_dir, dit_identity, folder_identity, load_config,
                         load_dit, load_silence_latent, require_dir)
from .device import compute_dtype, release_memory, resolve_device
from .fileio import atomic_save, atomic_write_json, sha256_file
from .metadata import (normalize_bpm, normalize_keyscale, normalize_language, normalize_lyrics,
                       normalize_timesignature, prompt_language)
from .prompts import apply_custom_tag, caption_prompt, lyrics_prompt

PREPROCESS_VERSION = 1
MANIFEST = "manifest.json"
TENSOR_KEYS = ("target_latents", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
               "context_latents")


@dataclass
class PrepareItem:
    """One training sample: a file path or an in-memory waveform, plus its metadata (any typed form)."""

    name: str  # how errors and progress refer to it (the path, or "audio_input_2")
    caption: str
    path: Optional[str] = None
    waveform: Optional[torch.Tensor] = None  # [C, N]
    sample_rate: Optional[int] = None
    lyrics: str = ""
    bpm: object = None
    keyscale: str = ""
    language: str = "unknown"
    timesignature: str = ""


@dataclass
class PrepareSettings:
    checkpoint_dir: str
    config_path: str = "acestep-v15-turbo"
    device: str = "auto"
    custom_tag: str = ""
    tag_position: str = "append"
    max_duration: float = 240.0
    vae_chunk_seconds: float = 30.0
    vae_overlap_seconds: float = 2.0


@dataclass
class PrepareResult:
    tensor_dir: str
    status: str
    encoded: int
    reused: int
    files: list = field(default_factory=list)
    seconds_of_audio: float = 0.0


@dataclass
class _Resolved:
    item: PrepareItem
    caption: str
    lyrics: str
    bpm: Optional[int]
    keyscale: str
    language: str
    timesignature: str
    key: str = ""
    file: str = ""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "sample"


def _resolve_metadata(item: PrepareItem, settings: PrepareSettings) -> _Resolved:
    try:
        caption = apply_custom_tag((item.caption or "").strip(), settings.custom_tag, settings.tag_position)
        if not caption:
            raise ValueError("the caption is empty; describe the music (genre, instruments, mood) or set a custom_tag.")
        return _Resolved(item, caption, normalize_lyrics(item.lyrics), normalize_bpm(item.bpm),
                         normalize_keyscale(item.keyscale), normalize_language(item.language),
                         normalize_timesignature(item.timesignature))
    except ValueError as e:
        raise ValueError(f"sample '{item.name}': {e}") from None


def _load_waveform(item: PrepareItem) -> tuple[torch.Tensor, int]:
    if item.waveform is not None:
        waveform, rate = item.waveform, int(item.sample_rate or 0)
    elif item.path:
        waveform, rate = audio_io.load_audio_file(item.path)
    else:
        raise ValueError(f"sample '{item.name}' has neither a file path nor audio.")
    audio_io.check_waveform(waveform, rate, f"sample '{item.name}'")
    return waveform, rate


def _content_hash(item: PrepareItem) -> str:
    if item.path:
        return sha256_file(item.path)
    h = hashlib.sha256(str(item.sample_rate).encode())
    h.update(item.waveform.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def checkpoint_fingerprint(checkpoint_dir: str, config_path: str) -> dict:
    """What the cached tensors depend on: the DiT (condition encoder, silence latent), the VAE, the text encoder."""
    cfg = load_config(checkpoint_dir, config_path)
    return {"config_path": os.path.basename(os.path.normpath(config_path)), "variant": cfg.variant,
            "is_turbo": cfg.is_turbo, "condition_width": (cfg.encoder_hidden_size or cfg.hidden_size),
            "dit": dit_identity(checkpoint_dir, config_path),
            "vae": folder_identity(require_dir(os.path.join(checkpoint_dir, VAE_DIR), "VAE")),
            "text_encoder": folder_identity(require_dir(os.path.join(checkpoint_dir, TEXT_ENCODER_DIR),
                                                        "Text encoder"))}


def _check_output_dir(output_dir: str) -> None:
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"output_dir '{output_dir}' is not writable ({e.strerror}); choose a folder you can write "
                         "to (a relative path goes under ComfyUI's output folder).") from None


def context_latents_for(silence: torch.Tensor, frames: int) -> torch.Tensor:
    """[T, 128]: the silence latent (repeated when the clip is longer) and an all-ones chunk mask."""
    reps = -(-frames // silence.shape[1])
    src = silence[0].repeat(reps, 1)[:frames]
    return torch.cat([src, torch.ones(frames, silence.shape[-1], dtype=silence.dtype, device=silence.device)], -1)


def load_manifest(tensor_dir: str) -> dict:
    path = os.path.join(tensor_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tensor_dir '{tensor_dir}' has no {MANIFEST}. Run 'ACE-Step LoRA Prepare Training "
                                "Data' first and connect its tensor_dir output.")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is damaged ({e}); run Prepare again to rewrite it.") from None


def prepare_dataset(items: list[PrepareItem], output_dir: str, settings: PrepareSettings,
                    progress: Optional[Callable[[int, int, str], None]] = None,
                    check_cancel: Optional[Callable[[], None]] = None) -> PrepareResult:
    """Encode ``items`` into ``output_dir``. Validates every input before loading any model."""
    started = time.time()
    if not items:
        raise ValueError("the dataset is empty: give audio_files (or connect audio_input_1..4), e.g. from "
                         "'ACE-Step Collect Training Samples'.")
    if settings.max_duration is not None and settings.max_duration <= 0:
        raise ValueError(f"max_duration must be > 0 seconds (got {settings.max_duration}).")
    dit_dir(settings.checkpoint_dir, settings.config_path)  # unknown config_path / missing folders fail here
    fingerprint = checkpoint_fingerprint(settings.checkpoint_dir, settings.config_path)
    _check_output_dir(output_dir)
    device = resolve_device(settings.device)
    dtype = compute_dtype(device)

    resolved = [_resolve_metadata(item, settings) for item in items]
    for r in resolved:
        if r.item.path and not os.path.isfile(r.item.path):
            raise FileNotFoundError(f"sample '{r.item.name}': audio file not found: '{r.item.path}'. Check the "
                                    "path (relative paths are resolved against ComfyUI's input folder).")
        payload = {"audio": _content_hash(r.item), "caption": r.caption, "lyrics": r.lyrics, "bpm": r.bpm,
                   "keyscale": r.keyscale, "language": r.language, "timesignature": r.timesignature,
                   "max_duration": settings.max_duration, "checkpoint": fingerprint, "dtype": str(dtype),
                   "version": PREPROCESS_VERSION}
        r.key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        stem = os.path.splitext(os.path.basename(r.item.path))[0] if r.item.path else r.item.name
        r.file = f"{_slug(stem)}_{r.key[:12]}.pt"

    metas = {r.file: m for r in resolved if (m := _cached_metadata(os.path.join(output_dir, r.file), r.key))}
    todo = [r for r in resolved if r.file not in metas]
    for r in todo:  # every sample to encode must decode and be usable before anything is written
        waveform, rate = _load_waveform(r.item)
        if waveform.shape[-1] * 48000 // rate < 1920:
            raise ValueError(f"sample '{r.item.name}' is shorter than one latent frame (40 ms); remove it.")

    models = None
    try:
        for index, r in enumerate(resolved):
            if check_cancel is not None:
                check_cancel()
            if r in todo:
                if models is None:
                    models = _Models(settings, device, dtype)
                if progress is not None:
                    progress(index, len(resolved), f"encoding {r.item.name}")
                data = models.encode(r)
                atomic_save(os.path.join(output_dir, r.file), lambda p, d=data: torch.save(d, p))
                metas[r.file] = data["metadata"]
            if progress is not None:
                progress(index + 1, len(resolved), f"{'encoded' if r in todo else 'cached'} {r.item.name}")
    finally:
        if models is not None:
            del models
            release_memory(device)

    total_seconds = sum(metas[r.file]["duration"] for r in resolved)
    samples_info = [{"file": r.file, "name": r.item.name, "duration": metas[r.file]["duration"],
                     "frames": metas[r.file]["frames"], "caption": r.caption, "cache_key": r.key} for r in resolved]
    manifest = {
        "metadata": {"name": os.path.basename(os.path.normpath(output_dir)), "custom_tag": settings.custom_tag,
                     "tag_position": settings.tag_position, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "num_samples": len(resolved),
                     "all_instrumental": all(r.lyrics == "[Instrumental]" for r in resolved), "genre_ratio": 0},
        "samples": [r.file for r in resolved],
        "num_samples": len(resolved),
        "preprocess_version": PREPROCESS_VERSION,
        "checkpoint": fingerprint,
        "dtype": str(dtype).replace("torch.", ""),
        "max_duration": settings.max_duration,
        "samples_info": samples_info,
    }
    atomic_write_json(os.path.join(output_dir, MANIFEST), manifest)
    elapsed = time.time() - started
    status = (f"Prepared {len(resolved)} samples in {output_dir}: {len(todo)} encoded, "
              f"{len(resolved) - len(todo)} reused from cache; {total_seconds / 60:.1f} min of audio, "
              f"{elapsed:.1f} s ({total_seconds / max(elapsed, 1e-6):.0f}x real time) on {device.type}.")
    return PrepareResult(output_dir, status, len(todo), len(resolved) - len(todo), [r.file for r in resolved],
                         total_seconds)


def _cached_metadata(path: str, key: str) -> Optional[dict]:
    """The metadata of a complete tensor file made from exactly this input, else None (missing, stale, damaged:
    it is then encoded again and replaced atomically)."""
    if not os.path.isfile(path):
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    meta = data.get("metadata", {})
    return meta if meta.get("cache_key") == key and all(k in data for k in TENSOR_KEYS) else None


class _Models:
    """VAE, text encoder and condition encoder, loaded once per run on the chosen device."""

    def __init__(self, settings: PrepareSettings, device: torch.device, dtype: torch.dtype):
        from .text import load_text_encoder
        from .vae import load_vae

        self.settings, self.device, self.dtype = settings, device, dtype
        self.vae = load_vae(settings.checkpoint_dir, device=device, dtype=dtype)
        self.text = load_text_encoder(settings.checkpoint_dir, device=device, dtype=dtype)
        self.dit = load_dit(settings.checkpoint_dir, settings.config_path, device=device, dtype=dtype,
                            components=("encoder",))
        self.silence = load_silence_latent(settings.checkpoint_dir, settings.config_path, device=device, dtype=dtype)

    @torch.no_grad()
    def encode(self, r: _Resolved) -> dict:
        waveform, rate = _load_waveform(r.item)
        audio = audio_io.to_stereo_48k(waveform, rate, self.vae.sample_rate, self.settings.max_duration)
        duration = audio.shape[-1] / self.vae.sample_rate
        posterior = self.vae.encode_tiled(audio.unsqueeze(0), self.settings.vae_chunk_seconds,
                                          self.settings.vae_overlap_seconds)
        generator = torch.Generator().manual_seed(int(r.key[:15], 16))
        latents = posterior.sample(generator)[0].transpose(0, 1)  # (T, 64)
        frames = latents.shape[0]

        prompt = caption_prompt(r.caption, r.bpm, r.timesignature, r.keyscale, duration)
        text, text_mask = self.text.encode_caption(prompt)
        lyric, lyric_mask = self.text.embed_lyrics(lyrics_prompt(r.lyrics, prompt_language(r.language)))
        cfg = self.dit.config
        timbre = self.silence[:, : cfg.timbre_fix_frame]  # "no reference audio", as inference passes it
        states, mask = self.dit.encoder(
            text_hidden_states=text.to(self.dtype), text_attention_mask=text_mask.to(self.dtype),
            lyric_hidden_states=lyric.to(self.dtype), lyric_attention_mask=lyric_mask.to(self.dtype),
            refer_audio_acoustic_hidden_states_packed=timbre,
            refer_audio_order_mask=torch.zeros(1, dtype=torch.long, device=self.device))
        return {
            "target_latents": latents.to(self.dtype).cpu(),
            "attention_mask": torch.ones(frames, dtype=self.dtype),
            "encoder_hidden_states": states[0].to(self.dtype).cpu(),
            "encoder_attention_mask": mask[0].cpu(),
            "context_latents": context_latents_for(self.silence, frames).to(self.dtype).cpu(),
            "metadata": {
                "audio_path": r.item.path or "", "filename": os.path.basename(r.item.path or r.item.name),
                "caption": r.caption, "lyrics": r.lyrics, "duration": round(duration, 3), "frames": frames,
                "bpm": r.bpm, "keyscale": r.keyscale, "timesignature": r.timesignature, "language": r.language,
                "is_instrumental": r.lyrics == "[Instrumental]", "cache_key": r.key,
                "config_path": self.settings.config_path, "preprocess_version": PREPROCESS_VERSION,
                "text_prompt": prompt,
            },
        }
