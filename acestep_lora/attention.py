"""Attention for the ACE-Step DiT and its encoders: a fused kernel on every CUDA GPU, the exact official function.

The DiT attends three ways — sliding-window self-attention on even layers (|i - j| <= 128, bidirectional), full
self-attention on odd layers, cross-attention to the condition — with 16 query and 8 key/value heads (GQA), each
with or without key padding (a padded batch). ``AttentionPlan`` is built once per forward for one query/key geometry
(lengths, cumulative sequence lengths or masks, made once, not per layer) and called by every layer.

Backends, chosen per device by ``choose_backend`` (torch 2.9.1):
- **flash** — CUDA, fp16/bf16, every GPU torch's FlashAttention-2 runs on (sm80+: A100, RTX 30/40/50, L40S,
  H100/H200/B200). Called directly (``aten::_flash_attention_forward``, differentiable), not through
  ``F.scaled_dot_product_attention``, because only the direct call exposes what this model needs: the sliding
  window as kernel arguments (``window_size_left/right``: blocks outside the band are skipped, 257 keys per query
  instead of L, in eager and compiled code alike), grouped K/V heads natively (K/V kept at 8 heads, nothing
  expanded), and per-sequence lengths (varlen ``cu_seqlens``). No [L, L] mask exists, padded or not. Padding: each
  sample is split into two sequences, its valid prefix and its padded tail; the cumulative lengths are built on
  the device from the lengths (no host sync, no gather/scatter). Valid queries attend exactly their valid keys
  (within the window), padded queries attend only padding (finite values that nothing reads: padded keys are never
  visible to valid queries and the loss masks padded frames).
- **efficient** — CUDA GPUs without flash (V100, T4, RTX 20) or with flash disabled: the memory-efficient kernel,
  called directly. It rejects unequal head counts and has no bidirectional window, so K/V are expanded to all heads
  and each window gets one additive bias, built once per forward ([1, 1, L, L]; [B, 1, L, L] only when padded),
  allocated with the row stride the kernel requires (a multiple of 8 elements), so SDPA's per-call padding copy
  never happens. This is the official code's choice, without its per-layer mask work.
- **sdpa** — CPU, MPS, and the reference: ``F.scaled_dot_product_attention`` with ``enable_gqa`` and the additive
  bias. Exactly the official function (tests/test_parity.py).

Rejected: ``F.scaled_dot_product_attention`` on CUDA with a mask and GQA (neither flash nor memory-efficient takes
it, so it runs MATH and keeps fp32 [B, 16, L, L] probabilities for backward, on every GPU but Hopper/Blackwell with
a cuDNN newer than the wheel's); ``flex_attention`` with a sliding-window + key-padding BlockMask (block-sparse and
fused only under torch.compile; eager runs its unfused reference); cuDNN attention (tried before MATH only with a
newer runtime cuDNN on sm90+); splitting sliding layers into blocks (still a mask inside each block and expanded K/V).

Masks are prefix masks: 1 for the first n frames/tokens of a sample, 0 for the padding after them (what
``data.collate`` and the condition encoder produce); a plan takes the lengths n.
"""
from __future__ import annotations

import functools
from typing import Optional
from collections.abc import Sequence

import torch
import torch.nn.functional as F

BACKENDS = ("flash", "efficient", "sdpa")
EFFICIENT_BIAS_ALIGNMENT = 8  # elements: the memory-efficient kernel's row-stride requirement for its bias


@functools.cache
def _cuda_kernel_runs(kernel: str, device_index: int, dtype: torch.dtype) -> bool:
    """Probe once per GPU and dtype whether torch's ``kernel`` runs here (with GQA and a window for flash)."""
    device = torch.device("cuda", device_index)
    try:
        q = torch.zeros(1, 16, 2, 64, device=device, dtype=dtype)
        if kernel == "flash":
            kv = q[:, :, :1]
            torch.ops.aten._flash_attention_forward(q, kv, kv, None, None, 16, 16, 0.0, False, False,
                                                    window_size_left=4, window_size_right=4)
        else:
            t = q.transpose(1, 2)
            torch.ops.aten._scaled_dot_product_efficient_attention(t, t, t, None, False)
        return True
    except RuntimeError:
        return False


def choose_backend(device: torch.device, dtype: torch.dtype) -> str:
    """flash where it runs, efficient on other CUDA GPUs, sdpa elsewhere. The SDPA backend switches
    (``torch.backends.cuda.enable_flash_sdp`` etc., ``torch.nn.attention.sdpa_kernel``) are respected."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "sdpa"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if torch.backends.cuda.flash_sdp_enabled() and _cuda_kernel_runs("flash", index, dtype):
        return "flash"
    if torch.backends.cuda.mem_efficient_sdp_enabled() and _cuda_kernel_runs("efficient", index, dtype):
        return "efficient"
    return "sdpa"


def lengths_from_mask(mask: torch.Tensor, group: int = 1) -> torch.Tensor:
    """int32 lengths [B] of a prefix mask [B, L] (1 = valid), counted in groups of ``group`` positions (patches)."""
    count = mask.to(torch.int32).sum(-1, dtype=torch.int32)
    return (count + group - 1) // group if group > 1 else count


def attention_bias(query_len: int, key_len: int, window: Optional[int], key_valid: Optional[torch.Tensor],
                   dtype: torch.dtype, device, align: int = 1) -> Optional[torch.Tensor]:
    """Additive mask [B|1, 1, Lq, Lk]: 0 where attended, dtype-min where not (None when nothing is masked).

    ``window`` keeps |i - j| <= window (bidirectional band); ``key_valid`` [B, Lk] (True = valid) masks padded keys.
    The dtype-min fill (not -inf) matches the official masks: a query whose keys are all masked averages uniformly
    over every key instead of producing NaN. ``align``: row stride rounded up to a multiple of it (a view).
    """
    if window is None and key_valid is None:
        return None
    valid = torch.ones(1, 1, query_len, key_len, dtype=torch.bool, device=device)
    if window is not None:
        pos_q = torch.arange(query_len, device=device)
        pos_k = torch.arange(key_len, device=device)
        valid = valid & ((pos_q[:, None] - pos_k[None, :]).abs() <= window)
    if key_valid is not None:
        valid = valid & key_valid.to(device=device, dtype=torch.bool)[:, None, None, :]
    stride = -(-key_len // align) * align
    bias = torch.zeros(*valid.shape[:-1], stride, dtype=dtype, device=device)[..., :key_len]
    return bias.masked_fill_(~valid, torch.finfo(dtype).min)


def flash_kernel(q, k, v, cu_q, cu_k, max_q: int, max_k: int, window: Optional[int]) -> torch.Tensor:
    """torch's FlashAttention-2 forward (dense [B, L, H, D] or varlen [total, H, D]); its backward comes with it."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False,
                                                   window_size_left=window, window_size_right=window)[0]


def efficient_kernel(q, k, v, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """torch's memory-efficient attention on [B, H, L, D] views with equal head counts; differentiable."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, needs_grad)[0]


def _segments(lengths: Optional[torch.Tensor], full: int, batch: int, device) -> torch.Tensor:
    """Per sample (valid prefix, padded tail) lengths, interleaved: [2B] int32."""
    if lengths is None:
        lengths = torch.full((batch,), full, dtype=torch.int32, device=device)
    lengths = lengths.to(device=device, dtype=torch.int32)
    return torch.stack([lengths, full - lengths], dim=1).flatten()


def _cumulative(segment_lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(segment_lengths.cumsum(0, dtype=torch.int32), (1, 0))


class AttentionPlan:
    """How one forward attends for one (query, key) geometry; call it as ``plan(q, k, v, window)``.

    q [B, Lq, Hq, D], k and v [B, Lk, Hkv, D] -> [B, Lq, Hq, D]. ``key_lengths`` [B]: valid keys per sample (a
    prefix); ``query_lengths``: valid queries (self-attention: the same lengths; cross-attention: None, every
    query attends). ``key_valid`` [B, Lk] (bool, any pattern) instead of lengths: masks for the encoders' token
    masks (flash takes lengths only, so such a plan runs the memory-efficient kernel). ``windows``: the window
    values the layers will pass (None = full attention).
    """

    def __init__(self, backend: str, batch: int, query_len: int, key_len: int, *, dtype: torch.dtype, device,
                 key_lengths: Optional[torch.Tensor] = None, query_lengths: Optional[torch.Tensor] = None,
                 key_valid: Optional[torch.Tensor] = None, windows: Sequence[Optional[int]] = (None,)):
        if backend not in BACKENDS:
            raise ValueError(f"attention backend '{backend}' is not one of {', '.join(BACKENDS)}")
        if key_valid is not None and backend == "flash":
            backend = "efficient"
        self.backend = backend
        self.padded = key_lengths is not None or key_valid is not None
        if backend == "flash":
            if self.padded:  # two sequences per sample: valid prefix, padded tail (see the module docstring)
                self.cu_q = _cumulative(_segments(query_lengths, query_len, batch, device))
                self.cu_k = _cumulative(_segments(key_lengths, key_len, batch, device))
            return
        align = EFFICIENT_BIAS_ALIGNMENT if backend == "efficient" else 1
        if key_lengths is not None:
            key_valid = torch.arange(key_len, device=device)[None, :] < key_lengths.to(device)[:, None]
        self.biases = {w: attention_bias(query_len, key_len, w, key_valid, dtype, device, align)
                       for w in dict.fromkeys(windows)}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[int] = None):
        if self.backend == "flash":
            return self._flash(q, k, v, window)
        bias = self.biases[window]
        if self.backend == "efficient":
            return self._efficient(q, k, v, bias)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=bias, enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)

    def _flash(self, q, k, v, window):
        b, lq, hq, d = q.shape
        lk, hkv = k.shape[1], k.shape[2]
        if not self.padded:
            return flash_kernel(q, k, v, None, None, lq, lk, window)
        out = flash_kernel(q.reshape(b * lq, hq, d), k.reshape(b * lk, hkv, d), v.reshape(b * lk, hkv, d),
                           self.cu_q, self.cu_k, lq, lk, window)
        return out.view(b, lq, hq, d)

    @staticmethod
    def _efficient(q, k, v, bias):
        b, lq, hq, d = q.shape
        lk, hkv = k.shape[1], k.shape[2]
        if hkv != hq:  # the kernel takes equal head counts only: kv head j serves query heads j*g .. j*g+g-1
            groups = hq // hkv
            k = k[:, :, :, None].expand(b, lk, hkv, groups, d).reshape(b, lk, hq, d)
            v = v[:, :, :, None].expand(b, lk, hkv, groups, d).reshape(b, lk, hq, d)
        if bias is not None:
            bias = bias.expand(b, hq, lq, lk)
        return efficient_kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias).transpose(1, 2)
