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

The trainer's option ``compile = auto | on | off`` is ``for_training``: auto compiles on CUDA (where a step is bound
by kernel launches, bench/launch_count.py) and not on a CPU or Apple GPU (inductor's CPU compile costs minutes and
saves little; MPS is a prototype backend). In training the condition is padded to one bucket (the dataset's
longest condition: padded condition tokens cost nothing in attention, acestep_lora.attention), so the step compiles
once per frame bucket of the dataset and batch size; evaluation calls (no autograd, eval mode) run eager.
``plan_step`` applies both speed options of a run: compile (for_training) and gradient checkpointing, decided
from the memory estimate at the padded shape the compiled step runs at (acestep_lora.memory).
"""
from __future__ import annotations

import logging
import math
from typing import Optional
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .attention import choose_backend, lengths_from_mask

log = logging.getLogger("acestep_lora.compile")

FRAME_BUCKET = 250  # latent frames (10 s): at most 24 graphs up to the official 240 s limit
TOKEN_BUCKET = 64
COMPILE_MODES = ("auto", "on", "off")
BACKEND = "inductor"  # torch.compile's backend for training (tests use "aot_eager" for structural checks)


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    return x if x.shape[1] == length else F.pad(x, (0, 0, 0, length - x.shape[1]))


class CompiledDecoder:
    """The decoder, compiled per (batch size, frame bucket, token bucket); see the module docstring."""

    def __init__(self, decoder: torch.nn.Module, *, frame_bucket: int = FRAME_BUCKET,
                 token_bucket: int = TOKEN_BUCKET, max_frames: int = 6000, max_tokens: int = 1024,
                 backend: str = "inductor", cuda_graphs: bool = False, dtype: Optional[torch.dtype] = None,
                 batch_sizes: int = 1, training_only: bool = False, fallback: bool = False):
        """``batch_sizes``: how many batch sizes the caller uses (the recompile limit is buckets x that);
        ``training_only``: calls without autograd or in eval mode run the eager decoder (no compile for them);
        ``fallback``: a failing compile is logged and the eager decoder used from then on, instead of raising."""
        self.decoder = decoder
        self.training_only, self.fallback, self.failed = training_only, fallback, None
        self.frame_bucket, self.token_bucket = frame_bucket, token_bucket
        device = next(decoder.parameters()).device
        if decoder.attention_backend == "auto":  # resolved once, outside the graph
            decoder.attention_backend = choose_backend(device, dtype or next(decoder.parameters()).dtype)
        decoder.fuse_projections()  # the fused weights must exist before tracing
        self.buckets = math.ceil(max_frames / frame_bucket) * math.ceil(max_tokens / token_bucket) * batch_sizes
        options = {"mode": "reduce-overhead"} if cuda_graphs else {}
        self.forward = torch.compile(self._forward, backend=backend, fullgraph=True, dynamic=False, **options)

    def __getattr__(self, name):  # gradient_checkpointing, train(), parameters(), ... are the decoder's
        return getattr(self.decoder, name)

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
        if self.failed is not None or (self.training_only and not (torch.is_grad_enabled() and self.decoder.training)):
            return self.decoder(hidden_states=hidden_states, timestep=timestep, timestep_r=timestep_r,
                                encoder_hidden_states=encoder_hidden_states, context_latents=context_latents,
                                attention_mask=attention_mask, encoder_attention_mask=encoder_attention_mask,
                                mask_padding=mask_padding, frame_lengths=frame_lengths,
                                encoder_lengths=encoder_lengths, **unused)
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
        inputs = (_pad_to(hidden_states, padded_frames), timestep, timestep_r,
                  _pad_to(encoder_hidden_states, padded_tokens), _pad_to(context_latents, padded_frames),
                  torch.as_tensor(frame_lengths, device=device), torch.as_tensor(encoder_lengths, device=device))
        try:
            with torch._dynamo.config.patch(recompile_limit=max(8, self.buckets),
                                            accumulated_recompile_limit=max(256, 4 * self.buckets)):
                out = self.forward(*inputs)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # no compiler, an unsupported GPU, a torch bug: train on, uncompiled
            if not self.fallback:
                raise
            cause = getattr(error, "inner_exception", None) or error  # dynamo wraps the backend's error
            self.failed = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
            log.warning("torch.compile failed (%s); training continues uncompiled (set compile = off to skip the "
                        "attempt).", self.failed)
            return self(hidden_states, timestep, timestep_r, encoder_hidden_states, context_latents, attention_mask,
                        encoder_attention_mask, mask_padding, frame_lengths, encoder_lengths, **unused)
        return out[:, :frames], None


def compiler_missing(device: torch.device) -> Optional[str]:
    """Why torch.compile's default backend cannot build kernels for ``device`` here, or None when it can."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return ("Triton is not installed (torch.compile's GPU kernels need it; on Windows: pip install "
                    "triton-windows)")
    return None


def for_training(decoder: torch.nn.Module, mode: str, device: torch.device, dtype: torch.dtype,
                 frame_lengths: Sequence[int], token_lengths: Sequence[int], batch_size: int,
                 cuda_graphs: bool = False):
    """``compile = auto | on | off`` for a training run on samples of ``frame_lengths`` / ``token_lengths``:
    (the decoder as the step calls it — a CompiledDecoder or ``decoder`` itself, the sentence that says which and
    why). auto: on for CUDA with a working compiler, off elsewhere; a failing compile in auto mode falls back to
    eager. on: compiled on any device (an error names the fix when no compiler is there)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile '{mode}' is not one of {', '.join(COMPILE_MODES)}.")
    missing = compiler_missing(device) if mode != "off" else None
    if mode == "on" and missing:
        raise ValueError(f"compile is 'on' but {missing}. Install it, or set compile to auto or off.")
    if mode == "off" or (mode == "auto" and (device.type != "cuda" or missing)):
        why = {"off": "as set", "auto": missing or f"auto: compiled on CUDA only, this is {device.type}"}[mode]
        graphs = "; cuda_graphs ignored (needs the compiled step on CUDA)" if cuda_graphs else ""
        return decoder, f"step not compiled ({why}){graphs}"
    frame_buckets = {math.ceil(n / FRAME_BUCKET) for n in frame_lengths}
    token_bucket = math.ceil(max(token_lengths) / TOKEN_BUCKET) * TOKEN_BUCKET  # one bucket: the longest condition
    sizes = {min(batch_size, len(frame_lengths)), len(frame_lengths) % batch_size or batch_size}
    graphs = cuda_graphs and device.type == "cuda"
    compiled = CompiledDecoder(decoder, frame_bucket=FRAME_BUCKET, token_bucket=token_bucket,
                               max_frames=max(frame_lengths), max_tokens=token_bucket, backend=BACKEND,
                               cuda_graphs=graphs, dtype=dtype, batch_sizes=len(sizes), training_only=True,
                               fallback=mode == "auto")
    count = len(frame_buckets) * len(sizes)
    return compiled, (f"step compiled (torch.compile{', CUDA graphs' if graphs else ''}): {count} step shape"
                      f"{'s' if count > 1 else ''} in this dataset ({FRAME_BUCKET / 25:g} s length buckets), the first "
                      "step of each takes longer (it compiles)"
                      + ("; cuda_graphs ignored (CUDA only)" if cuda_graphs and not graphs else ""))


def plan_step(decoder: torch.nn.Module, cfg, model_cfg, targets, data, device: torch.device,
              dtype: torch.dtype) -> tuple[object, list]:
    """How a training run's step runs, from its options (``cfg``: a TrainConfig): the decoder the step calls
    (compiled or not, for_training) and gradient checkpointing, set on ``decoder``, from the memory estimate of the
    model ``model_cfg`` (2B or XL sizes) at the longest batch's shape, padded to its bucket when compiled
    (acestep_lora.memory.checkpointing_for). Returns (the step's decoder, the two reasons for the run's header)."""
    from . import memory

    tokens = [s["encoder_hidden_states"].shape[0] for s in data.samples]
    step_decoder, compiled = for_training(decoder, cfg.compile, device, dtype, data.lengths, tokens, cfg.batch_size,
                                          cfg.cuda_graphs)
    frames, longest = max(data.lengths), max(tokens)
    if isinstance(step_decoder, CompiledDecoder):  # padded batches cost what their bucket costs
        frames, longest = step_decoder.bucket(frames, longest)
    staged = data.bytes() if data.staged_on_device else 0
    decoder.gradient_checkpointing, checkpointing = memory.checkpointing_for(
        cfg.gradient_checkpointing, device, model_cfg, cfg.batch_size, frames, longest, cfg.lora_rank, targets,
        dtype=dtype, dropout=cfg.lora_dropout, counted_bytes=memory.resident_bytes(decoder) + staged,
        dataset_bytes=staged)
    return step_decoder, [checkpointing, compiled]
