"""The training objective (spec §4): flow matching on the DiT decoder, as ACE-Step 1.5 was trained.

    x_t = t · noise + (1 - t) · x0,   the decoder predicts the velocity v = noise - x0,   loss = MSE(v̂, v)

- timesteps per variant: turbo draws t from the 8 discrete shift-3 timesteps its distilled sampler uses (official
  trainer); base/sft draw the max of two logit-normal draws (mu, sigma from config.json) and replace the condition
  by ``null_condition_emb`` for ``cfg_dropout`` of the samples (the newer official trainer), so they are trained
  the way they were pre-trained;
- the random part (``FlowMatching.draw``: noise, t, which samples drop their condition) is separate from the loss
  (``loss``), a function of the batch and the draw alone: it can be compiled without a generator inside, and a
  test can compute a reference from the same draw;
- padded frames are masked out of the loss and padded keys out of attention, so a padded batch computes what each
  of its samples computes alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .data import Batch

TURBO_SHIFT3_TIMESTEPS = (1.0, 0.9545454545454546, 0.9, 0.8333333333333334, 0.75, 0.6428571428571429, 0.5, 0.3)
TIMESTEP_SAMPLING = ("auto", "turbo_discrete", "logit_normal")


def resolve_sampling(mode: str, variant: str) -> str:
    """``auto`` -> what the variant was trained with: turbo_discrete for turbo, logit_normal for base/sft."""
    if mode not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep_sampling '{mode}' is not one of {', '.join(TIMESTEP_SAMPLING)}.")
    if mode == "auto":
        return "turbo_discrete" if variant == "turbo" else "logit_normal"
    return mode


@dataclass
class Draw:
    """The random inputs of one step's loss."""

    noise: torch.Tensor  # (B, T, 64), the latents' dtype
    t: torch.Tensor  # (B,) in (0, 1], the compute dtype
    keep_condition: Optional[torch.Tensor] = None  # (B,) bool: False = train this sample unconditioned


class FlowMatching:
    """The objective of one run: how t is drawn, condition dropout, and the compute dtype (autocast)."""

    def __init__(self, sampling: str, device: torch.device, dtype: torch.dtype, mu: float = -0.4,
                 sigma: float = 1.0, cfg_dropout: float = 0.0, null_condition: Optional[torch.Tensor] = None):
        self.sampling, self.device, self.dtype = sampling, torch.device(device), dtype
        self.mu, self.sigma = mu, sigma
        # Condition dropout belongs to the logit-normal recipe; the distilled turbo model uses no CFG.
        self.cfg_dropout = cfg_dropout if sampling == "logit_normal" else 0.0
        if self.cfg_dropout > 0 and null_condition is None:
            raise ValueError("cfg_dropout needs the model's null_condition_emb")
        self.null_condition = null_condition  # (1, 1, H)
        self.turbo_table = torch.tensor(TURBO_SHIFT3_TIMESTEPS, device=self.device, dtype=dtype)

    def timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.sampling == "turbo_discrete":
            index = torch.randint(0, len(TURBO_SHIFT3_TIMESTEPS), (n,), generator=generator, device=self.device)
            return self.turbo_table[index]
        draws = torch.randn((2, n), generator=generator, device=self.device, dtype=self.dtype)
        return torch.sigmoid(draws * self.sigma + self.mu).amax(dim=0)  # t = max of two logit-normal draws, r = t

    def draw(self, batch: Batch, generator: torch.Generator) -> Draw:
        """Noise, then t, then the condition-dropout coin per sample (this order is part of exact resume)."""
        x0 = batch.target_latents
        noise = torch.randn(x0.shape, generator=generator, device=self.device, dtype=x0.dtype)
        t = self.timesteps(x0.shape[0], generator)
        keep = None
        if self.cfg_dropout > 0:
            keep = torch.rand(x0.shape[0], generator=generator, device=self.device) >= self.cfg_dropout
        return Draw(noise, t, keep)

    def loss(self, decoder: torch.nn.Module, batch: Batch, draw: Draw) -> torch.Tensor:
        return loss(decoder, batch, draw, self.null_condition, self.dtype)


def loss(decoder: torch.nn.Module, batch: Batch, draw: Draw, null_condition: Optional[torch.Tensor] = None,
         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Flow-matching MSE of ``decoder`` on ``batch`` with the random inputs ``draw`` (fp32 scalar; the forward
    runs under ``dtype`` autocast unless fp32). Padded frames (``batch.frame_mask``) do not count."""
    x0 = batch.target_latents  # (B, T, 64)
    t = draw.t[:, None, None]
    xt = t * draw.noise + (1 - t) * x0
    condition = batch.encoder_hidden_states  # (B, L, H)
    if draw.keep_condition is not None:
        condition = torch.where(draw.keep_condition[:, None, None], condition, null_condition.expand_as(condition))
    padded = batch.frame_mask is not None or batch.encoder_mask is not None
    with torch.autocast(x0.device.type, dtype=dtype, enabled=dtype != torch.float32):
        pred = decoder(hidden_states=xt, timestep=draw.t, timestep_r=draw.t, attention_mask=batch.frame_mask,
                       encoder_hidden_states=condition, encoder_attention_mask=batch.encoder_mask,
                       context_latents=batch.context_latents, mask_padding=padded)[0]
    err = (pred.float() - (draw.noise - x0).float()).pow(2)  # (B, T, 64)
    if batch.frame_mask is None:
        return err.mean()
    mask = batch.frame_mask.float()[:, :, None]
    return (err * mask).sum() / (mask.sum() * err.shape[-1])
