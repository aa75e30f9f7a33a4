"""torch.compile for the LoRA-wrapped decoder: one graph per length bucket, no graph breaks.

``CompiledDecoder(decoder)`` is called like the decoder (same keyword arguments, returns ``(velocity, None)``).
Each call pads the batch up to a length bucket (frames to a multiple of ``frame_bucket``, condition tokens to a
multiple of ``token_bucket``), runs the compiled forward with per-sample lengths — the padding is invisible to
every real frame and token (acestep_lora.attention: flash varlen segments on CUDA, masks elsewhere), so the result
is the eager one — and crops the output back. A step therefore compiles once per bucket it meets, not once per
length; the recompile limit is raised to the number of buckets the longest sample allows.

What stays outside the compiled region: drawing the noise and the timesteps (RNG state stays the trainer's and
resumes exactly), the loss, backward, clipping and the optimizer (fused AdamW: already a few kernels).

``cuda_graphs=True`` compiles with ``mode="reduce-overhead"``: inductor records a CUDA graph per bucket shape and
replays it (one launch for the forward, one for the backward); static shapes per bucket are what make that
possible. CUDA only.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .attention import choose_backend, lengths_from_mask

FRAME_BUCKET = 250  # latent frames (10 s): at most 24 graphs up to the official 240 s limit
TOKEN_BUCKET = 64


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    return x if x.shape[1] == length else F.pad(x, (0, 0, 0, length - x.shape[1]))


class CompiledDecoder:
    """The decoder, compiled per (batch size, frame bucket, token bucket); see the module docstring."""

    def __init__(self, decoder: torch.nn.Module, *, frame_bucket: int = FRAME_BUCKET,
                 token_bucket: int = TOKEN_BUCKET, max_frames: int = 6000, max_tokens: int = 1024,
                 backend: str = "inductor", cuda_graphs: bool = False, dtype: Optional[torch.dtype] = None):
        self.decoder = decoder
        self.frame_bucket, self.token_bucket = frame_bucket, token_bucket
        device = next(decoder.parameters()).device
        if decoder.attention_backend == "auto":  # resolved once, outside the graph
            decoder.attention_backend = choose_backend(device, dtype or next(decoder.parameters()).dtype)
        decoder.fuse_projections()  # the fused weights must exist before tracing
        self.buckets = math.ceil(max_frames / frame_bucket) * math.ceil(max_tokens / token_bucket)
        options = {"mode": "reduce-overhead"} if cuda_graphs else {}
        self.forward = torch.compile(self._forward, backend=backend, fullgraph=True, dynamic=False, **options)

    def __getattr__(self, name):  # gradient_checkpointing, train(), parameters(), ... are the decoder's
        return getattr(self.decoder, name)

    def __setattr__(self, name, value):
        if name == "gradient_checkpointing":
            setattr(self.decoder, name, value)
        else:
            super().__setattr__(name, value)

    def _forward(self, hidden_states, timestep, timestep_r, encoder_hidden_states, context_latents, frame_lengths,
                 encoder_lengths):
        return self.decoder(hidden_states=hidden_states, timestep=timestep, timestep_r=timestep_r,
                            encoder_hidden_states=encoder_hidden_states, context_latents=context_latents,
                            mask_padding=True, frame_lengths=frame_lengths, encoder_lengths=encoder_lengths)[0]

    def bucket(self, frames: int, tokens: int) -> tuple[int, int]:
        return (math.ceil(frames / self.frame_bucket) * self.frame_bucket,
                math.ceil(tokens / self.token_bucket) * self.token_bucket)

    def __call__(self, hidden_states, timestep, timestep_r, encoder_hidden_states, context_latents,
                 attention_mask=None, encoder_attention_mask=None, mask_padding=False, frame_lengths=None,
                 encoder_lengths=None, **unused):
        batch, frames, _ = hidden_states.shape
        tokens = encoder_hidden_states.shape[1]
        device = hidden_states.device
        if not mask_padding:  # the official semantics: a batch's own padding is attended like real frames
            frame_lengths = encoder_lengths = None
        if frame_lengths is None:
            frame_lengths = (lengths_from_mask(attention_mask) if mask_padding and attention_mask is not None
                             else torch.full((batch,), frames, dtype=torch.int32, device=device))
        if encoder_lengths is None:
            encoder_lengths = (lengths_from_mask(encoder_attention_mask)
                               if mask_padding and encoder_attention_mask is not None
                               else torch.full((batch,), tokens, dtype=torch.int32, device=device))
        padded_frames, padded_tokens = self.bucket(frames, tokens)
        with torch._dynamo.config.patch(recompile_limit=max(8, self.buckets),
                                        accumulated_recompile_limit=max(256, 4 * self.buckets)):
            out = self.forward(_pad_to(hidden_states, padded_frames), timestep, timestep_r,
                               _pad_to(encoder_hidden_states, padded_tokens), _pad_to(context_latents, padded_frames),
                               torch.as_tensor(frame_lengths, device=device),
                               torch.as_tensor(encoder_lengths, device=device))
        return out[:, :frames], None
