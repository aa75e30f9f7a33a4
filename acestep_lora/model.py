"""ACE-Step 1.5 DiT, condition encoder, audio tokenizer and detokenizer in plain PyTorch.

An own implementation of the official ``AceStepConditionGenerationModel`` (spec §2), written from the spec and
checked against outputs the official code computed (tests/test_parity.py). Module and parameter names equal the
official ones, so the official ``model.safetensors`` loads strictly and PEFT adapters trained here load into the
official decoder (and vice versa).

Semantics kept from the official model on purpose:
- attention is bidirectional everywhere; even layers use a |i - j| <= sliding_window band (spec §2.2);
- the DiT ignores ``attention_mask`` / ``encoder_attention_mask`` (the official forward discards them). Training
  may opt in to key-padding with ``mask_padding=True`` (prefix masks, or per-sample lengths) so a padded batch
  computes exactly what each sample computes alone;
- attention runs on a fused kernel on CUDA (flash with native window, GQA and lengths, or memory-efficient), the
  official SDPA form elsewhere (acestep_lora/attention.py);
- the timestep is scaled by 1000 in the timestep tensor's own dtype, as the official code does (bf16 rounding
  included when the trainer passes bf16 timesteps, as the official trainer and inference do).

Built for a fast LoRA training step (bench/launch_count.py, bench/memory_model.py): frozen Linears that read one
input run as one GEMM (q/k/v, cross-attention k/v, gate/up; their weights become views of one tensor), layers
adapted by acestep_lora.lora are computed here with weights cast once per step, RMSNorm is one fused call, the
AdaLN modulation of all layers is made at once, and backward keeps dropout masks and SwiGLU inputs instead of
copies.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import AttentionPlan, choose_backend, lengths_from_mask
from .config import AceStepConfig

# ----------------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """Qwen3RMSNorm: normalise in fp32, scale, round to the input dtype (no +1 offset).

    One ``F.rms_norm`` call with the weight: a single fused kernel on CUDA (``_fused_rms_norm``) instead of the
    official upcast / pow / mean / rsqrt / mul / downcast / mul sequence. fp32: the same function; bf16: the
    weight is applied before the one rounding, so a value can differ from the official double rounding by one
    bf16 step.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != x.dtype:  # the official promotion: fp32 weight x bf16 input -> fp32
            return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)


# ----------------------------------------------------------------------------------------------------------------
# Projections: frozen Linears that read one input share one GEMM; LoRA weights are cast once per step


def lora_parts(module: nn.Module) -> Optional[nn.Module]:
    """``module`` if it is a LoRA-wrapped Linear (acestep_lora.lora.LoRALinear: ``base``, ``lora_A``, ``lora_B``,
    ``scaling``, ``dropout``), else None. Other wrappers (e.g. PEFT's) are called as they are."""
    if isinstance(getattr(module, "base", None), nn.Linear) and isinstance(getattr(module, "lora_A", None),
                                                                         torch.Tensor):
        return module
    return None


def base_linear(module: nn.Module) -> Optional[nn.Linear]:
    if isinstance(module, nn.Linear):
        return module
    return module.base if lora_parts(module) is not None else None


def cast_adapters(modules: list, dtype: Optional[torch.dtype]) -> dict:
    """{LoRA module: (A, scaling·B)} in ``dtype`` (None: as stored), made by one stack (+ cast, + scale) per weight
    shape for the whole model.

    Autocast would cast each fp32 LoRA weight at each use and each gradient back, and ``addmm(alpha=scaling)``
    scales both gradients: six kernels per adapted layer and step; this is a handful for the whole model.
    Gradients reach the fp32 weights through one stack backward (views of one gradient tensor).
    """
    out = {m: [None, None] for m in modules}
    for slot, name in enumerate(("lora_A", "lora_B")):
        groups = {}
        for m in modules:
            key = (tuple(getattr(m, name).shape), m.scaling if slot else None)
            groups.setdefault(key, []).append(m)
        for (_, scaling), members in groups.items():
            stack = torch.stack([getattr(m, name) for m in members])
            if dtype is not None and stack.dtype != dtype:
                stack = stack.to(dtype)
            if scaling is not None and scaling != 1:
                stack = stack * scaling
            for m, weight in zip(members, stack.unbind(0)):  # one backward node gathers all their gradients
                out[m][slot] = weight
    return out


# F.dropout runs ``native_dropout`` (one kernel, a bool mask) on these devices and a bernoulli noise tensor elsewhere.
NATIVE_DROPOUT_DEVICES = ("cuda", "xpu")


def _dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(F.dropout(x, p), what redoes it): the same values and random draws as F.dropout on every device."""
    if x.device.type in NATIVE_DROPOUT_DEVICES:
        return torch.ops.aten.native_dropout(x, p, True)
    noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    return x * noise, noise


def _redo_dropout(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    if keep.dtype == torch.bool:
        return torch.ops.aten.native_dropout_backward(x, keep, 1 / (1 - p))
    return x * keep


class _DroppedDown(torch.autograd.Function):
    """h = dropout(x) @ a^T keeping x and the dropout mask for backward, not the dropped copy of x: x is usually
    kept anyway (the attention output for o_proj; one x for q, k and v), the bool mask is half its size."""

    @staticmethod
    def forward(ctx, x, a, p):
        dropped, keep = _dropout(x, p)
        ctx.p = p
        ctx.save_for_backward(x, keep, a)
        return F.linear(dropped, a)

    @staticmethod
    def backward(ctx, grad):
        x, keep, a = ctx.saved_tensors
        grad_x = grad_a = None
        if ctx.needs_input_grad[1]:
            dropped = _redo_dropout(x, keep, ctx.p)
            grad_a = grad.reshape(-1, grad.shape[-1]).t() @ dropped.reshape(-1, dropped.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = _redo_dropout(grad @ a, keep, ctx.p)
        return grad_x, grad_a, None


def lora_update(y: torch.Tensor, x: torch.Tensor, module: nn.Module, a: torch.Tensor, scaled_b: torch.Tensor):
    """y + (alpha / r) · B A dropout(x): lora.LoRALinear's formula (PEFT's), with the step's cast, pre-scaled B."""
    if module.dropout > 0 and module.training:
        h = _DroppedDown.apply(x, a, module.dropout)
    else:
        h = F.linear(x, a)  # (..., r)
    return torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), scaled_b.t()).view(y.shape)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) · up, keeping gate and up (not also silu(gate)) for backward: one [N, intermediate] tensor less
    per layer, for one silu kernel more in backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def _fuse_weights(linears: list) -> torch.Tensor:
    """One [sum(out), in] tensor holding the weights of ``linears``; each weight becomes a view of it."""
    with torch.no_grad():
        fused = torch.cat([m.weight.detach() for m in linears])
        offset = 0
        for m in linears:
            rows = m.weight.shape[0]
            m.weight.data = fused[offset:offset + rows]
            offset += rows
    return fused


class SharedInput(nn.Module):
    """A module whose Linears ``fused_names`` read the same input. With frozen weights and no biases they run as one
    GEMM over a fused weight, each Linear's weight being a view of it (state dict and LoRA names unchanged);
    trainable weights, biases or other wrappers fall back to one call per Linear."""

    fused_names: tuple = ()
    _fused_weight: Optional[torch.Tensor] = None

    def _apply(self, fn, recurse=True):
        self._fused_weight = None  # conversions give every weight its own storage again
        return super()._apply(fn, recurse)

    def fuse(self) -> Optional[torch.Tensor]:
        """The fused weight of ``fused_names`` (made now if needed), or None when they cannot share a GEMM."""
        linears = [base_linear(getattr(self, n)) for n in self.fused_names]
        trainable = torch.is_grad_enabled() and any(m is not None and m.weight.requires_grad for m in linears)
        if len(linears) < 2 or trainable or any(m is None or m.bias is not None for m in linears):
            return None
        fused = self._fused_weight
        if torch.compiler.is_compiling():  # fused beforehand (DiT.fuse_projections), checked in eager mode
            return fused
        offset, valid = 0, fused is not None and fused.dtype == linears[0].weight.dtype
        for m in linears:  # still views of it? (.to() and load_state_dict(assign=True) make new storages)
            valid = valid and m.weight.untyped_storage()._cdata == fused.untyped_storage()._cdata \
                and m.weight.storage_offset() == fused.storage_offset() + offset * fused.shape[1]
            offset += m.weight.shape[0]
        if not valid:
            fused = self._fused_weight = _fuse_weights(linears)
        return fused

    def project(self, x: torch.Tensor, names: tuple, adapters: Optional[dict]) -> list:
        """Outputs of the Linears (or LoRA-wrapped Linears) ``names`` on their shared input ``x``."""
        modules = [getattr(self, n) for n in names]
        linears = [base_linear(m) for m in modules]
        fused = self.fuse() if names == self.fused_names else None
        if fused is not None:
            ys = F.linear(x, fused).split([m.out_features for m in linears], dim=-1)
        else:
            ys = [F.linear(x, b.weight, b.bias) if b is not None else m(x) for m, b in zip(modules, linears)]
        out = []
        for y, m, b in zip(ys, modules, linears):
            lora = lora_parts(m) if b is not None else None
            if lora is not None:
                a, b_scaled = adapters[m] if adapters and m in adapters else (lora.lora_A, lora.lora_B * lora.scaling)
                y = lora_update(y, x, lora, a, b_scaled)
            out.append(y)
        return out


class MLP(SharedInput):
    """SwiGLU feed-forward (Qwen3MLP), no biases."""

    def __init__(self, cfg: AceStepConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.fused_names = ("gate_proj", "up_proj")

    def forward(self, x: torch.Tensor, adapters: Optional[dict] = None) -> torch.Tensor:
        gate, up = self.project(x, self.fused_names, adapters)
        return self.project(_SwiGLU.apply(gate, up), ("down_proj",), adapters)[0]


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables [L, 1, head_dim] for positions 0..L-1 (Qwen3 default rope, computed in fp32), for [B, L, H, D].

    The sine table comes with the rotate-half sign folded in (first half negated): see apply_rotary.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
    sign = torch.cat([-torch.ones_like(inv_freq), torch.ones_like(inv_freq)])
    return emb.cos().to(dtype), (emb.sin() * sign).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, L, heads, D]: x·cos + cat(-x2, x1)·sin = x·cos + cat(x2, x1)·signed_sin (the
    same values in every dtype: negation is exact), without the separate negation kernel."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([x2, x1], dim=-1) * signed_sin


class Attention(SharedInput):
    """Multi-head attention with per-head RMSNorm on q and k, GQA, RoPE in self-attention only."""

    def __init__(self, cfg: AceStepConfig, is_cross_attention: bool = False):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.is_cross_attention = is_cross_attention
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.fused_names = ("k_proj", "v_proj") if is_cross_attention else ("q_proj", "k_proj", "v_proj")

    def forward(self, x: torch.Tensor, attend: AttentionPlan, rope: Optional[tuple] = None,
                context: Optional[torch.Tensor] = None, window: Optional[int] = None,
                adapters: Optional[dict] = None) -> torch.Tensor:
        b, lq, _ = x.shape
        if context is None:  # q, k, v in one GEMM
            q, k, v = self.project(x, self.fused_names, adapters)
        else:  # k, v of the condition in one GEMM
            (q,) = self.project(x, ("q_proj",), adapters)
            k, v = self.project(context, self.fused_names, adapters)
        lk = k.shape[1]
        q = self.q_norm(q.view(b, lq, -1, self.head_dim))  # (B, Lq, Hq, D)
        k = self.k_norm(k.view(b, lk, -1, self.head_dim))  # (B, Lk, Hkv, D)
        v = v.view(b, lk, -1, self.head_dim)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attend(q, k, v, window)  # (B, Lq, Hq, D)
        return self.project(out.reshape(b, lq, -1), ("o_proj",), adapters)[0]  # (B, Lq, H)


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer used by the lyric/timbre encoders, the pooler and the detokenizer."""

    def __init__(self, cfg: AceStepConfig, layer_idx: int):
        super().__init__()
        self.window = cfg.window_for_layer(layer_idx)
        self.self_attn = Attention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h: torch.Tensor, rope: tuple, attend: AttentionPlan) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), attend, rope=rope, window=self.window)
        return h + self.mlp(self.post_attention_layernorm(h))


class EncoderStack(nn.Module):
    """Embedding Linear + RoPE + bidirectional EncoderLayers + final norm (shared shape of four official modules)."""

    def __init__(self, cfg: AceStepConfig, in_dim: int, num_layers: int):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Linear(in_dim, cfg.hidden_size)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg, i) for i in range(num_layers))
        # The official lyric and timbre encoders iterate layers[:num_hidden_layers]; the pooler/detokenizer all.
        self.max_layers = num_layers

    def run_layers(self, h: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``key_mask`` [B, L]: 1 for valid tokens, in any pattern (the lyric mask)."""
        batch, seq_len = h.shape[:2]
        rope = rotary_cos_sin(seq_len, self.cfg.head_dim, self.cfg.rope_theta, h.device, h.dtype)
        attend = AttentionPlan(choose_backend(h.device, h.dtype), batch, seq_len, seq_len, dtype=h.dtype,
                               device=h.device, windows=[layer.window for layer in self.layers],
                               key_valid=None if key_mask is None else key_mask.to(device=h.device, dtype=torch.bool))
        for layer in self.layers[: self.max_layers]:
            h = layer(h, rope, attend)
        return self.norm(h)


class LyricEncoder(EncoderStack):
    def __init__(self, cfg: AceStepConfig):
        super().__init__(cfg, cfg.text_hidden_dim, cfg.num_lyric_encoder_hidden_layers)
        self.max_layers = min(cfg.num_lyric_encoder_hidden_layers, cfg.num_hidden_layers)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.run_layers(self.embed_tokens(inputs_embeds), key_mask=attention_mask)


class TimbreEncoder(EncoderStack):
    def __init__(self, cfg: AceStepConfig):
        super().__init__(cfg, cfg.timbre_hidden_dim, cfg.num_timbre_encoder_hidden_layers)
        self.max_layers = min(cfg.num_timbre_encoder_hidden_layers, cfg.num_hidden_layers)
        # Present in the official checkpoint but unused: the official prepend of this token is commented out.
        self.special_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))

    def forward(self, refer_packed: torch.Tensor, order_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode N packed reference clips [N, T, 64]; return per-row slots [B, max_refs, H] and their mask."""
        pooled = self.run_layers(self.embed_tokens(refer_packed))[:, 0, :]  # frame 0 of each clip, (N, H)
        return unpack_references(pooled, order_mask)


def unpack_references(packed: torch.Tensor, order_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter N packed vectors to [B, max_count, d] by batch index ``order_mask`` [N], keeping their order."""
    n, d = packed.shape
    batch = int(order_mask.max().item()) + 1
    one_hot = F.one_hot(order_mask, batch)  # (N, B)
    slot = (one_hot.cumsum(0) - 1).gather(1, order_mask[:, None]).squeeze(1)  # position within its row
    max_count = int(one_hot.sum(0).max().item())
    flat_index = order_mask * max_count + slot
    out = packed.new_zeros(batch * max_count, d).index_copy(0, flat_index, packed)
    mask = torch.zeros(batch * max_count, dtype=torch.long, device=packed.device)
    mask[flat_index] = 1
    return out.view(batch, max_count, d), mask.view(batch, max_count)


def pack_sequences(h1: torch.Tensor, h2: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor):
    """Concatenate two masked sequences and move valid tokens to the front (stable), as the official encoder."""
    hidden = torch.cat([h1, h2], dim=1)
    mask = torch.cat([m1, m2], dim=1)
    b, length, d = hidden.shape
    order = mask.argsort(dim=1, descending=True, stable=True)
    hidden = torch.gather(hidden, 1, order.unsqueeze(-1).expand(b, length, d))
    new_mask = torch.arange(length, device=hidden.device)[None, :] < mask.sum(dim=1)[:, None]
    return hidden, new_mask


class ConditionEncoder(nn.Module):
    """Text projection + lyric encoder + timbre encoder, packed into one cross-attention sequence."""

    def __init__(self, cfg: AceStepConfig):
        super().__init__()
        self.text_projector = nn.Linear(cfg.text_hidden_dim, cfg.hidden_size, bias=False)
        self.lyric_encoder = LyricEncoder(cfg)
        self.timbre_encoder = TimbreEncoder(cfg)

    def forward(self, text_hidden_states, text_attention_mask, lyric_hidden_states, lyric_attention_mask,
                refer_audio_acoustic_hidden_states_packed, refer_audio_order_mask):
        text = self.text_projector(text_hidden_states)
        lyric = self.lyric_encoder(lyric_hidden_states, lyric_attention_mask)
        timbre, timbre_mask = self.timbre_encoder(refer_audio_acoustic_hidden_states_packed, refer_audio_order_mask)
        hidden, mask = pack_sequences(lyric, timbre, lyric_attention_mask, timbre_mask)
        return pack_sequences(hidden, text, mask, text_attention_mask)


# ----------------------------------------------------------------------------------------------------------------
# Audio tokenizer / detokenizer (5 Hz codes used by cover / LM hints; not needed for text2music LoRA training)


class ResidualFSQ(nn.Module):
    """Residual finite scalar quantisation with the options the official tokenizer uses (symmetry-preserving
    levels, hard-clamped bound after a tanh soft clamp), parameterised like vector-quantize-pytorch's class."""

    def __init__(self, dim: int, levels: list, num_quantizers: int):
        super().__init__()
        self.levels = list(levels)
        self.num_quantizers = num_quantizers
        self.project_in = nn.Linear(dim, len(levels))
        self.project_out = nn.Linear(len(levels), dim)

    def _constants(self, device):
        levels = torch.tensor(self.levels, device=device, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor([1] + self.levels[:-1], device=device), 0)
        return levels, basis

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels, basis = self._constants(x.device)
        z = self.project_in(x).float()
        clamp = 1 + 1 / (levels - 1)
        residual = torch.tanh(z / clamp) * clamp
        quantized_sum = torch.zeros_like(residual)
        all_indices = []
        for q in range(self.num_quantizers):
            scale = levels ** -q
            scaled = (residual / scale).clamp(-1.0, 1.0)
            bracket = (levels - 1) * (scaled + 1) / 2 + 0.5
            bracket = scaled + (bracket.floor() - scaled).detach()  # straight-through floor
            codes = 2.0 / (levels - 1) * bracket - 1.0
            level_idx = (codes + 1) / (2.0 / (levels - 1))
            all_indices.append((level_idx * basis).sum(-1).round().to(torch.int32))
            quantized = codes * scale
            residual = residual - quantized.detach()
            quantized_sum = quantized_sum + quantized
        return self.project_out(quantized_sum.to(x.dtype)), torch.stack(all_indices, dim=-1)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        levels, basis = self._constants(indices.device)
        level_idx = (indices.long()[..., None] // basis) % levels.long()  # (..., Q, C)
        codes = level_idx.float() * (2.0 / (levels - 1)) - 1.0
        scales = torch.stack([levels ** -q for q in range(self.num_quantizers)])  # (Q, C)
        return self.project_out((codes * scales).sum(-2).to(self.project_out.weight.dtype))


class AttentionPooler(EncoderStack):
    """Pools each window of 5 frames into one vector through a prepended learned token."""

    def __init__(self, cfg: AceStepConfig):
        super().__init__(cfg, cfg.hidden_size, cfg.num_attention_pooler_hidden_layers)
        self.special_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, p, d = x.shape
        x = self.embed_tokens(x)
        x = torch.cat([self.special_token.expand(b, t, 1, -1), x], dim=2).reshape(b * t, p + 1, -1)
        return self.run_layers(x)[:, 0, :].reshape(b, t, -1)


class AudioTokenizer(nn.Module):
    def __init__(self, cfg: AceStepConfig):
        super().__init__()
        self.pool_window_size = cfg.pool_window_size
        self.audio_acoustic_proj = nn.Linear(cfg.audio_acoustic_hidden_dim, cfg.hidden_size)
        self.attention_pooler = AttentionPooler(cfg)
        self.quantizer = ResidualFSQ(cfg.fsq_dim, cfg.fsq_input_levels, cfg.fsq_input_num_quantizers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T/5, 5, 64] -> (quantized [B, T/5, H], indices [B, T/5, Q])."""
        return self.quantizer(self.attention_pooler(self.audio_acoustic_proj(x)))

    def tokenize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, d = latents.shape
        return self.forward(latents.reshape(b, t // self.pool_window_size, self.pool_window_size, d))


class AudioTokenDetokenizer(EncoderStack):
    """Expands each 5 Hz code vector back to 5 latent frames (25 Hz)."""

    def __init__(self, cfg: AceStepConfig):
        super().__init__(cfg, cfg.hidden_size, cfg.num_attention_pooler_hidden_layers)
        self.pool_window_size = cfg.pool_window_size
        self.special_tokens = nn.Parameter(torch.zeros(1, cfg.pool_window_size, cfg.hidden_size))
        self.proj_out = nn.Linear(cfg.hidden_size, cfg.audio_acoustic_hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        p = self.pool_window_size
        x = self.embed_tokens(x).unsqueeze(2).repeat(1, 1, p, 1) + self.special_tokens.expand(b, t, -1, -1)
        x = self.proj_out(self.run_layers(x.reshape(b * t, p, -1)))
        return x.reshape(b, t * p, -1)  # (B, T*5, 64)


# ----------------------------------------------------------------------------------------------------------------
# DiT


class TimestepEmbedding(nn.Module):
    """Sinusoidal (cos first) embedding of 1000·t, MLP, and a 6-way modulation projection."""

    def __init__(self, hidden_size: int, in_channels: int = 256, scale: float = 1000.0):
        super().__init__()
        self.in_channels = in_channels
        self.scale = scale
        self.linear_1 = nn.Linear(in_channels, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)
        self.time_proj = nn.Linear(hidden_size, hidden_size * 6)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.in_channels // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = (t * self.scale)[:, None].float() * freqs[None]  # scaled in t's dtype, like the official code
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        temb = self.linear_2(F.silu(self.linear_1(emb.to(t.dtype))))
        return temb, self.time_proj(F.silu(temb)).unflatten(1, (6, -1))  # (B, H), (B, 6, H)


class Transpose(nn.Module):
    """[B, T, C] <-> [B, C, T]; keeps the official ``proj_in.1`` / ``proj_out.1`` parameter names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class DiTLayer(nn.Module):
    """AdaLN-modulated self-attention, plain-residual cross-attention, AdaLN-modulated MLP."""

    def __init__(self, cfg: AceStepConfig, layer_idx: int):
        super().__init__()
        self.window = cfg.window_for_layer(layer_idx)
        self.self_attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.cross_attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.cross_attn = Attention(cfg, is_cross_attention=True)
        self.mlp_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 6, cfg.hidden_size))

    def forward(self, h, rope, modulation, context, self_attend: AttentionPlan, cross_attend: AttentionPlan,
                adapters: Optional[dict] = None):
        """``modulation`` [B, 6, H]: scale_shift_table + timestep projection, 1 already added to both scales."""
        shift, scale1, gate, c_shift, c_scale1, c_gate = modulation.chunk(6, dim=1)
        x = (self.self_attn_norm(h) * scale1 + shift).type_as(h)  # norm·(1 + scale) + shift
        h = (h + self.self_attn(x, self_attend, rope=rope, window=self.window, adapters=adapters) * gate).type_as(h)
        h = h + self.cross_attn(self.cross_attn_norm(h).type_as(h), cross_attend, context=context, adapters=adapters)
        x = (self.mlp_norm(h) * c_scale1 + c_shift).type_as(h)
        return (h + self.mlp(x, adapters) * c_gate).type_as(h)


class DiT(nn.Module):
    """The diffusion transformer (``model.decoder``): predicts the flow velocity (noise - data)."""

    def __init__(self, cfg: AceStepConfig, condition_dim: Optional[int] = None):
        super().__init__()
        self.config = cfg
        self.patch_size = cfg.patch_size
        h = cfg.hidden_size
        self.layers = nn.ModuleList(DiTLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.proj_in = nn.Sequential(Transpose(), nn.Conv1d(cfg.in_channels, h, cfg.patch_size, cfg.patch_size),
                                     Transpose())
        self.time_embed = TimestepEmbedding(h)
        self.time_embed_r = TimestepEmbedding(h)
        self.condition_embedder = nn.Linear(condition_dim or h, h)
        self.norm_out = RMSNorm(h, eps=cfg.rms_norm_eps)
        self.proj_out = nn.Sequential(Transpose(),
                                      nn.ConvTranspose1d(h, cfg.audio_acoustic_hidden_dim, cfg.patch_size,
                                                         cfg.patch_size),
                                      Transpose())
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 2, h))
        self.gradient_checkpointing = False
        self.attention_backend = "auto"  # or one of attention.BACKENDS, e.g. to compare them

    def fuse_projections(self) -> None:
        """Fuse the frozen Linears that share an input now (forward does it on first use in eager mode; a compiled
        forward needs it done before compiling)."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, SharedInput):
                    module.fuse()

    def modulation(self, temb6: torch.Tensor) -> torch.Tensor:
        """Every layer's AdaLN modulation at once: scale_shift_table + timestep projection, with 1 added to the two
        scales (the official norm·(1+scale)+shift), (layers, B, 6, H)."""
        mod = torch.cat([layer.scale_shift_table for layer in self.layers])[:, None] + temb6
        mod[:, :, 1::3] += 1  # scale_msa, c_scale_msa
        return mod

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, timestep_r: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, encoder_hidden_states: torch.Tensor = None,
                encoder_attention_mask: Optional[torch.Tensor] = None, context_latents: torch.Tensor = None,
                mask_padding: bool = False, frame_lengths: Optional[torch.Tensor] = None,
                encoder_lengths: Optional[torch.Tensor] = None, **unused):
        """hidden_states [B, T, 64] noisy latents, context_latents [B, T, 128], encoder_hidden_states [B, L, Hc].

        Padding (only with ``mask_padding=True``, as the official decoder ignores both masks): ``attention_mask``
        [B, T] and ``encoder_attention_mask`` [B, L] are prefix masks (valid first, as data.collate and the
        condition encoder make them); ``frame_lengths`` / ``encoder_lengths`` [B] (valid frames / tokens per
        sample) may be given instead of the masks.
        Returns ``(velocity [B, T, 64], None)`` like the official decoder (second item: its unused KV cache).
        """
        temb_t, proj_t = self.time_embed(timestep)
        temb_r, proj_r = self.time_embed_r(timestep - timestep_r)
        temb, temb6 = temb_t + temb_r, proj_t + proj_r

        x = torch.cat([context_latents, hidden_states], dim=-1)  # (B, T, 192)
        frames = x.shape[1]
        pad = (-frames) % self.patch_size
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        x = self.proj_in(x).contiguous()  # (B, T/2, H); a transposed residual stream would cost a copy per norm
        context = self.condition_embedder(encoder_hidden_states)

        batch, seq_len, device = x.shape[0], x.shape[1], x.device
        rope = rotary_cos_sin(seq_len, self.config.head_dim, self.config.rope_theta, device, x.dtype)
        if mask_padding:
            if frame_lengths is None and attention_mask is not None:
                frame_lengths = lengths_from_mask(attention_mask, self.patch_size)
            elif frame_lengths is not None:
                frame_lengths = (torch.as_tensor(frame_lengths, device=device) + self.patch_size - 1) // self.patch_size
            if encoder_lengths is None and encoder_attention_mask is not None:
                encoder_lengths = lengths_from_mask(encoder_attention_mask)
            elif encoder_lengths is not None:
                encoder_lengths = torch.as_tensor(encoder_lengths, device=device)
        else:
            frame_lengths = encoder_lengths = None
        # Built once per forward (lengths, cumulative sequence lengths or masks), used by all layers.
        backend = self.attention_backend if self.attention_backend != "auto" else choose_backend(device, x.dtype)
        self_attend = AttentionPlan(backend, batch, seq_len, seq_len, dtype=x.dtype, device=device,
                                    key_lengths=frame_lengths, query_lengths=frame_lengths,
                                    windows=[layer.window for layer in self.layers])
        cross_attend = AttentionPlan(backend, batch, seq_len, context.shape[1], dtype=x.dtype, device=device,
                                     key_lengths=encoder_lengths)

        modulation = self.modulation(temb6)
        lora = [m for m in self.layers.modules() if lora_parts(m) is not None]
        autocast = torch.is_autocast_enabled(device.type)
        adapters = cast_adapters(lora, torch.get_autocast_dtype(device.type) if autocast else None) if lora else None

        for layer, mod in zip(self.layers, modulation):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, rope, mod, context, self_attend, cross_attend, adapters, use_reentrant=False)
            else:
                x = layer(x, rope, mod, context, self_attend, cross_attend, adapters)

        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(x) * (1 + scale) + shift).type_as(x)
        return self.proj_out(x)[:, :frames], None


# ----------------------------------------------------------------------------------------------------------------
# Whole model

COMPONENTS = ("decoder", "encoder", "tokenizer", "detokenizer", "null_condition_emb")


class AceStepModel(nn.Module):
    """Official ``AceStepConditionGenerationModel`` layout. Components not requested are left out (``None``)."""

    def __init__(self, cfg: AceStepConfig, components: tuple = COMPONENTS):
        super().__init__()
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"components: unknown {sorted(unknown)}; choose from {list(COMPONENTS)}")
        self.config = cfg
        enc_cfg = cfg.encoder_config()
        self.decoder = DiT(cfg, condition_dim=enc_cfg.hidden_size) if "decoder" in components else None
        self.encoder = ConditionEncoder(enc_cfg) if "encoder" in components else None
        self.tokenizer = AudioTokenizer(enc_cfg) if "tokenizer" in components else None
        self.detokenizer = AudioTokenDetokenizer(enc_cfg) if "detokenizer" in components else None
        self.null_condition_emb = (nn.Parameter(torch.zeros(1, 1, enc_cfg.hidden_size))
                                   if "null_condition_emb" in components else None)

    @property
    def components(self) -> tuple:
        return tuple(c for c in COMPONENTS if getattr(self, c) is not None)
