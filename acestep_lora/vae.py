"""The ACE-Step 1.5 audio VAE (Oobleck, 48 kHz stereo, 1920 samples per latent frame, 64 latent channels).

An own implementation that reads ``checkpoint_dir/vae`` in the diffusers ``AutoencoderOobleck`` layout the
official download uses (``config.json`` + ``diffusion_pytorch_model.safetensors``, weight-normed convolutions
stored as ``weight_g``/``weight_v``), checked against the official fixture (tests/test_parity.py). Weight norm is
folded into plain weights at load time, so inference does not recompute it on every call.

One extension: ``encoder_channels`` in config.json sets the encoder's base width (diffusers ties it to
``encoder_hidden_size``, i.e. twice the latent width). Only the tiny generated test checkpoints use it, so the
test VAE can be narrow and fast; official files never carry it and load exactly as diffusers loads them.

Long audio is encoded in fixed windows whose overlapping edges are computed and discarded: a 10-minute song needs
no more memory than one window, and since the overlap exceeds the encoder's receptive field, the result equals a
whole-clip encode up to float rounding.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import VAE_DIR, require_dir, require_file

SAMPLE_RATE = 48000
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


class Snake(nn.Module):
    """x + sin²(αx)/β with log-scale α, β (per channel)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1, channels, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.beta.exp() + 1e-9).reciprocal() * torch.sin(self.alpha.exp() * x).pow(2)


class ResidualUnit(nn.Module):
    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.snake1 = Snake(channels)
        self.conv1 = nn.Conv1d(channels, channels, 7, dilation=dilation, padding=3 * dilation)
        self.snake2 = Snake(channels)
        self.conv2 = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.snake2(self.conv1(self.snake1(x))))


class EncoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.res_unit1, self.res_unit2, self.res_unit3 = (ResidualUnit(c_in, d) for d in (1, 3, 9))
        self.snake1 = Snake(c_in)
        self.conv1 = nn.Conv1d(c_in, c_out, 2 * stride, stride=stride, padding=math.ceil(stride / 2))

    def forward(self, x):
        return self.conv1(self.snake1(self.res_unit3(self.res_unit2(self.res_unit1(x)))))


class DecoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.snake1 = Snake(c_in)
        self.conv_t1 = nn.ConvTranspose1d(c_in, c_out, 2 * stride, stride=stride, padding=math.ceil(stride / 2))
        self.res_unit1, self.res_unit2, self.res_unit3 = (ResidualUnit(c_out, d) for d in (1, 3, 9))

    def forward(self, x):
        return self.res_unit3(self.res_unit2(self.res_unit1(self.conv_t1(self.snake1(x)))))


class Encoder(nn.Module):
    """audio [B, 2, S] -> moments [B, 2*latent, S // hop] (mean and pre-softplus scale)."""

    def __init__(self, base: int, out_channels: int, audio_channels: int, strides: list, multiples: list):
        super().__init__()
        widths = [base * m for m in [1] + list(multiples)]
        self.conv1 = nn.Conv1d(audio_channels, widths[0], 7, padding=3)
        self.block = nn.ModuleList(EncoderBlock(widths[i], widths[i + 1], s) for i, s in enumerate(strides))
        self.snake1 = Snake(widths[-1])
        self.conv2 = nn.Conv1d(widths[-1], out_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv1(x)
        for block in self.block:
            x = block(x)
        return self.conv2(self.snake1(x))


class Decoder(nn.Module):
    """latents [B, latent, T] -> audio [B, 2, T * hop]."""

    def __init__(self, base: int, latent_channels: int, audio_channels: int, strides: list, multiples: list):
        super().__init__()
        widths = [base * m for m in [1] + list(multiples)]
        self.conv1 = nn.Conv1d(latent_channels, widths[-1], 7, padding=3)
        n = len(strides)
        self.block = nn.ModuleList(DecoderBlock(widths[n - i], widths[n - i - 1], s) for i, s in enumerate(strides))
        self.snake1 = Snake(base)
        self.conv2 = nn.Conv1d(base, audio_channels, 7, padding=3, bias=False)

    def forward(self, x):
        x = self.conv1(x)
        for block in self.block:
            x = block(x)
        return self.conv2(self.snake1(x))


class Oobleck(nn.Module):
    def __init__(self, cfg: dict, decoder: bool = True, encoder: bool = True):
        super().__init__()
        strides = list(cfg["downsampling_ratios"])
        multiples = list(cfg["channel_multiples"])
        hidden = int(cfg["encoder_hidden_size"])
        # Prepare only encodes, previews only decode: the half not needed is neither built nor read from disk.
        self.encoder = Encoder(int(cfg.get("encoder_channels", hidden)), hidden, int(cfg["audio_channels"]),
                               strides, multiples) if encoder else None
        self.decoder = Decoder(int(cfg["decoder_channels"]), int(cfg["decoder_input_channels"]),
                               int(cfg["audio_channels"]), strides[::-1], multiples) if decoder else None


@dataclass
class Posterior:
    """Diagonal Gaussian over latents [B, 64, T] (``std = softplus(scale) + 1e-4``, as the official VAE)."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=device)
        return self.mean + self.std * noise.to(self.mean.device)


class AudioVAE:
    """Frame arithmetic, posterior and tiling around the Oobleck module (``.model``)."""

    def __init__(self, model: Oobleck, cfg: dict):
        self.model = model.eval().requires_grad_(False)
        self.config = cfg
        self.hop = math.prod(cfg["downsampling_ratios"])  # 1920 for the official VAE
        self.sample_rate = int(cfg.get("sampling_rate", SAMPLE_RATE))
        self.latent_channels = int(cfg["decoder_input_channels"])
        self.audio_channels = int(cfg["audio_channels"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device=None, dtype=None) -> AudioVAE:
        self.model.to(device=device, dtype=dtype)
        return self

    def frames_for(self, num_samples: int) -> int:
        return num_samples // self.hop

    @torch.no_grad()
    def encode(self, audio: torch.Tensor) -> Posterior:
        """audio [B, 2, S] -> posterior over [B, 64, S // hop], in fp32."""
        if self.model.encoder is None:
            raise RuntimeError("this VAE was loaded without its encoder (load_vae(..., encoder=False))")
        moments = self.model.encoder(audio.to(device=self.device, dtype=self.dtype)).float()
        mean, scale = moments.chunk(2, dim=1)
        return Posterior(mean, F.softplus(scale) + 1e-4)

    @torch.no_grad()
    def encode_tiled(self, audio: torch.Tensor, chunk_seconds: float = 30.0,
                     overlap_seconds: float = 2.0) -> Posterior:
        """Encode [1, 2, S] window by window, each window carrying ``overlap_seconds`` of discarded context."""
        frames = self.frames_for(audio.shape[-1])
        per_second = self.sample_rate / self.hop
        chunk = max(1, int(round(chunk_seconds * per_second)))
        overlap = max(0, int(round(overlap_seconds * per_second)))
        if frames <= chunk + 2 * overlap:
            return self.encode(audio)
        means, stds = [], []
        for keep, lo, hi in _windows(frames, chunk, overlap):
            end_sample = audio.shape[-1] if hi == frames else hi * self.hop
            post = self.encode(audio[..., lo * self.hop:end_sample])
            means.append(post.mean[..., keep].cpu())
            stds.append(post.std[..., keep].cpu())
        return Posterior(torch.cat(means, dim=-1), torch.cat(stds, dim=-1))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 64, T] -> audio [B, 2, T * hop] (float32)."""
        if self.model.decoder is None:
            raise RuntimeError("this VAE was loaded without its decoder (load_vae(..., decoder=False))")
        return self.model.decoder(latents.to(device=self.device, dtype=self.dtype)).float()

    @torch.no_grad()
    def decode_tiled(self, latents: torch.Tensor, chunk_frames: int = 750, overlap_frames: int = 50) -> torch.Tensor:
        frames = latents.shape[-1]
        if frames <= chunk_frames + 2 * overlap_frames:
            return self.decode(latents)
        pieces = []
        for keep, lo, hi in _windows(frames, chunk_frames, overlap_frames):
            audio = self.decode(latents[..., lo:hi])
            pieces.append(audio[..., keep.start * self.hop:keep.stop * self.hop].cpu())
        return torch.cat(pieces, dim=-1)


def _windows(frames: int, chunk: int, overlap: int):
    """Overlap-discard tiling: for each chunk of ``chunk`` frames, the window [lo, hi) it is computed in (with
    ``overlap`` frames of context on each side, clipped to the clip) and the slice of that window to keep."""
    for start in range(0, frames, chunk):
        stop = min(start + chunk, frames)
        lo, hi = max(0, start - overlap), min(frames, stop + overlap)
        yield slice(start - lo, stop - lo), lo, hi


def fold_weight_norm(state: dict) -> dict:
    """``weight_g``/``weight_v`` pairs -> ``weight = g * v / ||v||`` (norm over all dims but 0, as torch's
    weight_norm with its default dim=0 for both Conv1d and ConvTranspose1d)."""
    out = {}
    for key, value in state.items():
        if key.endswith(".weight_v"):
            base = key[: -len(".weight_v")]
            g = state[base + ".weight_g"].float()
            v = value.float()
            norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
            out[base + ".weight"] = g * v / norm
        elif not key.endswith(".weight_g"):
            out[key] = value
    return out


def load_vae(checkpoint_dir: str, device="cpu", dtype: torch.dtype = torch.float32,
             decoder: bool = True, encoder: bool = True) -> AudioVAE:
    """Load ``<checkpoint_dir>/vae`` (official diffusers layout) strictly; ``decoder=False`` reads the encoder only,
    ``encoder=False`` the decoder only."""
    from safetensors import safe_open

    directory = require_dir(os.path.join(checkpoint_dir, VAE_DIR), "VAE")
    with open(require_file(os.path.join(directory, "config.json"), "VAE config"), encoding="utf-8") as f:
        cfg = json.load(f)
    with safe_open(require_file(os.path.join(directory, WEIGHTS_FILE), "VAE weights"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if wanted(k, decoder, encoder)}
    return build_vae(cfg, state, f"{directory}/{WEIGHTS_FILE}", "Re-download the vae folder.", device, dtype,
                     decoder=decoder, encoder=encoder)


def wanted(key: str, decoder: bool = True, encoder: bool = True) -> bool:
    """Whether a VAE state key belongs to the halves asked for."""
    return (decoder or not key.startswith("decoder.")) and (encoder or not key.startswith("encoder."))


def build_vae(cfg: dict, state: dict, where: str, hint: str, device="cpu",
              dtype: torch.dtype = torch.float32, decoder: bool = True, encoder: bool = True) -> AudioVAE:
    """An ``AudioVAE`` from a state dict in the diffusers layout (weight norm as ``weight_g``/``weight_v``),
    checked strictly against ``cfg``; errors name ``where`` (the file) and the keys. ``decoder=False`` /
    ``encoder=False``: that half left out (``state`` must then hold none of its keys)."""
    from .checkpoint import check_state_keys

    state = fold_weight_norm(state)
    with torch.device("meta"):
        model = Oobleck(cfg, decoder=decoder, encoder=encoder)
    check_state_keys(where, {k: tuple(v.shape) for k, v in model.state_dict().items()},
                     {k: tuple(v.shape) for k, v in state.items()}, hint)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return AudioVAE(model.to(device), cfg)


def save_vae(vae_model: Oobleck, cfg: dict, directory: str) -> None:
    """Write a VAE folder in the official layout (weight-normed convolutions as ``weight_g``/``weight_v``)."""
    from safetensors.torch import save_file

    from .fileio import atomic_save, atomic_write_json

    state = {}
    for key, value in vae_model.state_dict().items():
        if key.endswith(".weight") and value.dim() == 3:
            base = key[: -len(".weight")]
            norm = value.flatten(1).norm(dim=1).view(-1, 1, 1)
            state[base + ".weight_g"], state[base + ".weight_v"] = norm.contiguous(), value.contiguous()
        else:
            state[key] = value.contiguous()
    atomic_write_json(os.path.join(directory, "config.json"), dict(cfg, _class_name="AutoencoderOobleck"))
    atomic_save(os.path.join(directory, WEIGHTS_FILE), lambda p: save_file(state, p, metadata={"format": "pt"}))
