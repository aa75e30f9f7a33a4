"""Peak GPU memory of a LoRA training step, predicted at training start; the gradient-checkpointing policy.

``estimate_peak_bytes`` counts what the step keeps on the GPU, term by term, from the architecture as
acestep_lora.model implements it on CUDA (flash attention, fused dropout and rms_norm, bf16 autocast, LoRA
weights and AdamW state in fp32): resident weights and optimizer state, the tensors each layer saves for backward
(per query token, per condition token), and the working set of the first layer's backward, where the step peaks.
It is checked against bench/memory_model.py (a fake-tensor trace of the real step replayed through the CUDA caching
allocator, itself within 1 % of the official trainer's H100 measurements) by tests/test_memory.py.

``choose_gradient_checkpointing`` is ``gradient_checkpointing = auto``: checkpointing only when the step would not
fit in the card's free memory without it; ``checkpointing_for`` applies the option on any device, reading the
card's free memory (``usable_cuda_bytes``) on CUDA.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .config import AceStepConfig

MIB = 2 ** 20
CUBLAS_WORKSPACES = 2 * 32 * MIB  # one per thread issuing GEMMs (forward, autograd's backward); 32 MiB from sm90 on
HEADROOM = 0.92  # fraction of the free memory a step may plan to use (fragmentation, the CUDA context's growth)


def decoder_parameters(cfg: AceStepConfig) -> int:
    """Parameters of the DiT decoder plus the null condition embedding (what the trainer loads)."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    aq, akv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    hc = cfg.encoder_hidden_size or h
    bias = aq + 2 * akv + h if cfg.attention_bias else 0
    attention = h * aq + 2 * h * akv + aq * h + 2 * d + bias
    layer = 2 * attention + 3 * h + 3 * h * i + 6 * h
    top = (cfg.in_channels * cfg.patch_size * h + h) + 2 * (256 * h + h + h * h + h + 6 * h * h + 6 * h) \
        + (hc * h + h) + h + (h * cfg.audio_acoustic_hidden_dim * cfg.patch_size + cfg.audio_acoustic_hidden_dim) \
        + 2 * h + hc
    return cfg.num_hidden_layers * layer + top


def _projections(cfg: AceStepConfig) -> dict:
    """(in, out) of the Linears a LoRA can target, per DiT layer, by leaf name; cross k/v read condition tokens."""
    h, d = cfg.hidden_size, cfg.head_dim
    aq, akv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    return {"q_proj": (h, aq), "k_proj": (h, akv), "v_proj": (h, akv), "o_proj": (aq, h),
            "gate_proj": (h, cfg.intermediate_size), "up_proj": (h, cfg.intermediate_size),
            "down_proj": (cfg.intermediate_size, h)}


def lora_parameters(cfg: AceStepConfig, rank: int, targets: Iterable[str]) -> int:
    shapes, targets = _projections(cfg), set(targets)
    per_layer = 0
    for name, (fan_in, fan_out) in shapes.items():
        if name in targets:
            copies = 2 if name in ("q_proj", "k_proj", "v_proj", "o_proj") else 1  # self- and cross-attention
            per_layer += copies * rank * (fan_in + fan_out)
    return cfg.num_hidden_layers * per_layer


def _saved_per_token(cfg: AceStepConfig, rank: int, targets: set, dropout: float, e: int) -> tuple[int, int]:
    """Bytes one DiT layer keeps for backward per query (patch) token and per condition token."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    aq, akv = hq * d, hkv * d
    dropped = dropout > 0

    def lora(name: str, fan_in: int, input_kept_elsewhere: bool) -> int:
        """A targeted Linear keeps its input (once per shared input), its dropout mask (bool) and B's input."""
        if name not in targets:
            return 0
        return (0 if input_kept_elsewhere else fan_in * e) + (fan_in if dropped else 0) + rank * e

    def group_outputs(names: tuple, sizes: tuple, kept: tuple) -> int:
        """Fused-GEMM outputs that later ops keep: untargeted ones are views that keep the whole fused output."""
        untargeted_kept = any(k and n not in targets for n, k in zip(names, kept))
        fused = sum(sizes) * e if untargeted_kept else 0
        return fused + sum(s * e for n, s, k in zip(names, sizes, kept) if k and n in targets)

    def shared_input_lora(names: tuple, fan_in: int) -> int:
        first = True
        total = 0
        for n in names:
            if n in targets:
                total += lora(n, fan_in, not first)
                first = False
        return total

    rms = 4  # fp32 rstd per normalised row
    token = 0
    # self-attention: norm input, q/k/v (+ LoRA), per-head norms, RoPE outputs, flash (q, k, v, out, lse), o_proj
    token += h * e + rms
    token += shared_input_lora(("q_proj", "k_proj", "v_proj"), h)
    token += group_outputs(("q_proj", "k_proj", "v_proj"), (aq, akv, akv), (True, True, True))
    token += (hq + hkv) * rms + (aq + akv) * e + aq * e + hq * 4
    token += lora("o_proj", aq, True)
    # cross-attention: norm input, q (+ LoRA), q norm, flash (q, out, lse), o_proj
    token += h * e + rms
    token += lora("q_proj", h, False) + aq * e + hq * rms + 2 * aq * e + hq * 4
    token += lora("o_proj", aq, True)
    # MLP: norm input, gate/up (+ LoRA) kept by SwiGLU, down_proj's LoRA
    token += h * e + rms
    token += shared_input_lora(("gate_proj", "up_proj"), h)
    token += group_outputs(("gate_proj", "up_proj"), (i, i), (True, True))
    token += lora("down_proj", i, False)
    # per condition token: k/v (+ LoRA; the condition itself is kept once for all layers), k norm, flash k and v
    cond = sum(lora(n, h, True) for n in ("k_proj", "v_proj"))
    cond += group_outputs(("k_proj", "v_proj"), (akv, akv), (True, True)) + 2 * akv * e + hkv * rms
    return token, cond


def estimate_peak_bytes(cfg: AceStepConfig, batch: int, frames: int, tokens: int, rank: int,
                        targets: Iterable[str], checkpointing: bool, *, dtype: torch.dtype = torch.bfloat16,
                        dropout: float = 0.1, dataset_bytes: int = 0,
                        workspace_bytes: int = CUBLAS_WORKSPACES) -> int:
    """Peak bytes allocated by one optimizer step of acestep_lora.train.Trainer on a CUDA GPU.

    ``frames`` / ``tokens``: the longest latent-frame / condition length in a batch of ``batch`` samples (padded
    batches cost what their padded shape costs); ``dataset_bytes``: training data staged on the GPU.
    """
    targets = set(targets)
    e = torch.finfo(dtype).bits // 8
    h, i = cfg.hidden_size, cfg.intermediate_size
    layers = cfg.num_hidden_layers
    patches = batch * math.ceil(frames / cfg.patch_size)
    cond_tokens = batch * tokens
    lora = lora_parameters(cfg, rank, targets)

    # fp32 LoRA weights and two AdamW moments, the step's cast copy; gradients exist only from the end of backward
    resident = decoder_parameters(cfg) * e + lora * (12 + e) + workspace_bytes + dataset_bytes
    token, cond = _saved_per_token(cfg, rank, targets, dropout, e)
    per_layer = token * patches + cond * cond_tokens
    # the condition (as input, at the encoder's width, and embedded), the final norm, the loss terms in fp32
    outside = cond_tokens * (cfg.condition_width + h) * e + patches * h * (e + 4) + batch * frames * 64 * 4 * 4
    working = patches * (3 * i + 2 * h) * e  # backward of the MLP that starts the backward pass
    if checkpointing:  # every layer keeps its input; one layer's activations exist at a time
        activations = layers * patches * h * e + per_layer
    else:
        activations = layers * per_layer
    # the peak: the start of backward (every activation kept), or the optimizer step (LoRA gradients)
    return int(resident + max(activations + outside + working, lora * 4 * 2))


def choose_gradient_checkpointing(free_bytes: int, cfg: AceStepConfig, batch: int, frames: int, tokens: int,
                                  rank: int, targets: Iterable[str], *, dtype: torch.dtype = torch.bfloat16,
                                  dropout: float = 0.1, dataset_bytes: int = 0,
                                  headroom: float = HEADROOM) -> tuple[bool, str]:
    """``gradient_checkpointing = auto``: (use it?, the reason in words). Off when the step fits in
    ``headroom`` x ``free_bytes`` without it (faster), on otherwise; the reason says when even that is too much."""
    kw = dict(dtype=dtype, dropout=dropout, dataset_bytes=dataset_bytes)
    budget = headroom * free_bytes
    without = estimate_peak_bytes(cfg, batch, frames, tokens, rank, targets, False, **kw)
    gib = 2 ** 30
    if without <= budget:
        return False, (f"gradient checkpointing off (auto): the step needs about {without / gib:.1f} GiB, "
                       f"{free_bytes / gib:.1f} GiB free")
    with_gc = estimate_peak_bytes(cfg, batch, frames, tokens, rank, targets, True, **kw)
    reason = (f"gradient checkpointing on (auto): without it the step needs about {without / gib:.1f} GiB, with it "
              f"{with_gc / gib:.1f} GiB; {free_bytes / gib:.1f} GiB free")
    if with_gc > budget:
        reason += " (likely out of memory even so: lower batch_size, max_duration or lora_rank)"
    return True, reason


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers (what the estimate's resident weights already count)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def usable_cuda_bytes(device: torch.device, counted_bytes: int) -> int:
    """Memory a training step can plan with on a CUDA ``device``: what the driver reports free, the blocks this
    process's caching allocator holds unused (it reuses them), and ``counted_bytes`` already allocated that the
    estimate counts itself (the model and LoRA weights, data staged on the GPU). Other allocations of the process
    (e.g. models another node left loaded) are not usable."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device) + counted_bytes


def checkpointing_for(mode: str, device: torch.device, cfg: AceStepConfig, batch: int, frames: int, tokens: int,
                      rank: int, targets: Iterable[str], *, dtype: torch.dtype, dropout: float, counted_bytes: int,
                      dataset_bytes: int = 0) -> tuple[bool, str]:
    """The ``gradient_checkpointing`` option applied: (use it?, the reason in words). on/off as set; auto: on CUDA
    from the estimate and the card's usable memory (choose_gradient_checkpointing), on for Apple GPUs (memory
    shared with the system, no reliable free figure), off on a CPU. ``frames`` / ``tokens``: the longest batch's
    padded shape; ``counted_bytes``: weights (and staged data) already on the device."""
    if mode != "auto":
        return mode == "on", f"gradient checkpointing {mode} (as set)"
    if device.type == "mps":
        return True, "gradient checkpointing on (auto: Apple GPUs share their memory with the system)"
    if device.type != "cuda":
        return False, f"gradient checkpointing off (auto: {device.type})"
    usable = usable_cuda_bytes(device, counted_bytes)
    return choose_gradient_checkpointing(usable, cfg, batch, frames, tokens, rank, targets, dtype=dtype,
                                         dropout=dropout, dataset_bytes=dataset_bytes)
