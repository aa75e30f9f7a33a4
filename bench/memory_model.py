"""Peak GPU memory of a training step, computed on a CPU: fake tensors, a storage tracker, the CUDA allocator.

    python bench/memory_model.py [--record] [--check-only]

The step runs on fake tensors (``FakeTensorMode``: shapes, dtypes and autograd, no data), so the full-size model
costs no memory and a step takes seconds. ``bench.common.CudaDispatch`` makes the CUDA code paths explicit (autocast
policy, fused dropout and rms_norm, the SDPA kernel). ``AllocationTrace`` records every storage the step allocates
and when it is freed (a weakref on each storage, so autograd's saved tensors live exactly as long as on a GPU), plus
the memory kernels allocate internally (flash/efficient attention backward accumulators, cuBLAS workspaces).
``CachingAllocator`` replays those events through the CUDA caching allocator's rules (512-byte rounding, 2 MiB
segments for requests <= 1 MiB, 20 MiB segments below 10 MiB, 2 MiB-rounded segments above, best-fit reuse,
block splitting and coalescing) and reports ``max_memory_allocated`` — the figure torch.cuda reports — for the
measured step (a warm-up step first, as a benchmark does).

Two steps are modelled:
- **official**: the official trainer's step (spec §4): the whole ``AceStepConditionGenerationModel`` (decoder,
  condition encoder, audio tokenizer and detokenizer, null embedding) in bf16 on the GPU, PEFT LoRA (r=64, α=128,
  dropout 0.1, q/k/v/o of the decoder) also in bf16, the official attention (K/V expanded to all heads, additive
  [L, L] masks on every self- and cross-attention layer, SDPA -> the memory-efficient kernel), Qwen3 RMSNorm
  (explicit fp32 upcast), bf16 autocast, Fabric's fp32 output cast, ``F.mse_loss``, grad clipping, fused AdamW.
  It must reproduce the peaks measured on an H100 (issue 6) within 5 %: that is the model's check.
- **ours**: ``acestep_lora.train.Trainer``'s real step (bench.common.make_trainer / train_step) on the full-size
  turbo config, with the attention backend it selects on CUDA (``flash``) or the previous mask-based one.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import math
import os
import sys
import tempfile
import weakref

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ENCODER_LENGTH, CudaDispatch, full_config, make_trainer, mirror_cuda_readback,  # noqa: E402
                    random_model, record, train_step)

from acestep_lora.config import AceStepConfig  # noqa: E402
from acestep_lora.model import AceStepModel, RMSNorm  # noqa: E402

GIB = 2 ** 30
MIB = 2 ** 20
# cuBLAS workspace per (handle, stream): 32 MiB on sm90 (H100/H200), allocated through the caching allocator.
# The forward runs on the main thread and the backward on autograd's device thread: two handles.
CUBLAS_WORKSPACES = 2 * 32 * MIB

# Official measurements (issue 6: one H100 80GB, torch 2.11, the official step, random weights, encoder length 769).
OFFICIAL_PEAKS = {(1, 375): 5.8, (1, 1500): 7.70, (1, 6000): 15.13, (4, 1500): 16.2, (8, 1500): 27.4,
                  (2, 6000): 25.23}
CHECK_ROWS = [(1, 1500), (1, 6000), (2, 6000)]  # the rows with two-decimal figures (issue 11)


# ---------------------------------------------------------------------------------------------------------------
# Storage tracker


def kernel_workspace(func, args) -> list[int]:
    """Bytes a CUDA kernel allocates for itself during the call (not visible as an output)."""
    name = func.overloadpacket.__name__
    if name in ("_flash_attention_backward", "_scaled_dot_product_flash_attention_backward"):
        q, k = args[1], args[2]
        if name == "_flash_attention_backward":  # [B, L, H, D] or varlen [total, H, D]
            heads, dim, kv_heads = q.shape[-2], q.shape[-1], k.shape[-2]
            q_tokens, k_tokens = q.numel() // (heads * dim), k.numel() // (kv_heads * dim)
            batch = q.shape[0] if q.dim() == 4 else args[6].numel() - 1
        else:  # [B, H, L, D]
            heads, dim, kv_heads = q.shape[1], q.shape[-1], k.shape[1]
            q_tokens, k_tokens, batch = q.shape[0] * q.shape[2], k.shape[0] * k.shape[2], q.shape[0]
        rounded_q = q_tokens + 128 * batch  # flash-attn rounds each sequence up to its 128-row blocks
        sizes = [4 * rounded_q * heads * dim, 4 * rounded_q * heads]  # fp32 dq accumulator, softmax_d
        if kv_heads != heads:  # GQA: dk, dv first computed per query head, then summed
            sizes += [2 * q.element_size() * k_tokens * heads * dim]
        return sizes
    if name in ("_scaled_dot_product_efficient_attention_backward", "_efficient_attention_backward"):
        q = args[1]
        tokens = q.numel() // q.shape[-1]
        return [4 * tokens * q.shape[-1], 4 * tokens]  # fp32 dq accumulator, delta
    return []


class AllocationTrace(TorchDispatchMode):
    """Every storage the dispatched ops create, with its lifetime, as allocation events."""

    def __init__(self):
        super().__init__()
        self.events = []  # ("alloc", id, bytes) | ("free", id) | ("mark", label)
        self._live = {}  # id(python storage object) -> allocation id
        self._next = 0

    def alloc(self, nbytes: int, label: str = "") -> int:
        self._next += 1
        self.events.append(("alloc", self._next, int(nbytes), label))
        return self._next

    def free(self, aid: int) -> None:
        self.events.append(("free", aid))

    def mark(self, label: str) -> None:
        self.events.append(("mark", label))

    def _release(self, key: int, aid: int) -> None:
        self._live.pop(key, None)
        self.free(aid)

    def track(self, tensor: torch.Tensor, label: str = "") -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live or storage.nbytes() == 0:
            return
        aid = self.alloc(storage.nbytes(), label)
        self._live[key] = aid
        weakref.finalize(storage, self._release, key, aid)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        temporaries = [self.alloc(n, name + " workspace") for n in kernel_workspace(func, args)]
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t, name)
        for aid in temporaries:
            self.free(aid)
        return out


# ---------------------------------------------------------------------------------------------------------------
# The CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp, default settings)

MIN_BLOCK = 512
SMALL_SIZE = 1 * MIB  # requests up to this size come from the small pool
SMALL_BUFFER = 2 * MIB
LARGE_BUFFER = 20 * MIB
MIN_LARGE_ALLOC = 10 * MIB
ROUND_LARGE = 2 * MIB


class CachingAllocator:
    """Block bookkeeping of one stream's caching allocator: the ``allocated`` and ``reserved`` statistics."""

    def __init__(self):
        self.pools = {True: [], False: []}  # small pool? -> sorted free blocks [(size, segment, offset)]
        self.starts = {}  # segment -> {offset: [size, allocated]}
        self.ends = {}  # segment -> {end offset: start offset}
        self.blocks = {}  # allocation id -> (small, segment, offset)
        self.allocated = self.reserved = self.peak = self.peak_reserved = 0

    @staticmethod
    def round_size(size: int) -> int:
        return MIN_BLOCK if size < MIN_BLOCK else MIN_BLOCK * math.ceil(size / MIN_BLOCK)

    @staticmethod
    def segment_size(size: int) -> int:
        if size <= SMALL_SIZE:
            return SMALL_BUFFER
        if size < MIN_LARGE_ALLOC:
            return LARGE_BUFFER
        return ROUND_LARGE * math.ceil(size / ROUND_LARGE)

    def _put(self, seg, off, size, allocated):
        self.starts[seg][off] = [size, allocated]
        self.ends[seg][off + size] = off

    def _drop(self, seg, off):
        size, _ = self.starts[seg].pop(off)
        del self.ends[seg][off + size]
        return size

    def malloc(self, aid: int, size: int) -> None:
        size = self.round_size(size)
        small = size <= SMALL_SIZE
        pool = self.pools[small]
        i = bisect.bisect_left(pool, (size, -1, -1))
        if i < len(pool):  # best fit: the smallest cached block that is large enough, lowest address first
            block, seg, off = pool.pop(i)
            self._drop(seg, off)
        else:  # cudaMalloc a new segment
            seg, off, block = len(self.starts), 0, self.segment_size(size)
            self.starts[seg], self.ends[seg] = {}, {}
            self.reserved += block
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        remaining = block - size
        if (small and remaining >= MIN_BLOCK) or (not small and remaining > SMALL_SIZE):
            self._put(seg, off + size, remaining, False)
            bisect.insort(pool, (remaining, seg, off + size))
            block = size
        self._put(seg, off, block, True)
        self.blocks[aid] = (small, seg, off)
        self.allocated += block
        self.peak = max(self.peak, self.allocated)

    def free(self, aid: int) -> None:
        small, seg, off = self.blocks.pop(aid)
        pool = self.pools[small]
        size = self._drop(seg, off)
        self.allocated -= size
        nxt = off + size  # coalesce with free neighbours of the same segment
        if nxt in self.starts[seg] and not self.starts[seg][nxt][1]:
            pool.remove((self.starts[seg][nxt][0], seg, nxt))
            size += self._drop(seg, nxt)
        prev = self.ends[seg].get(off)
        if prev is not None and not self.starts[seg][prev][1]:
            pool.remove((self.starts[seg][prev][0], seg, prev))
            size += self._drop(seg, prev)
            off = prev
        self._put(seg, off, size, False)
        bisect.insort(pool, (size, seg, off))


def replay(events, measure_from: str, breakdown: bool = False) -> dict:
    """Peak allocated / reserved bytes from the ``measure_from`` mark on (peak stats reset there); with
    ``breakdown``, the bytes live at the peak by the op that allocated them."""
    alloc = CachingAllocator()
    live, at_peak, measuring = {}, {}, False
    for event in events:
        if event[0] == "alloc":
            before = alloc.peak
            alloc.malloc(event[1], event[2])
            if breakdown:
                live[event[1]] = (event[3], event[2])
                if measuring and alloc.peak > before:
                    at_peak = dict(live)
        elif event[0] == "free":
            if event[1] in alloc.blocks:
                alloc.free(event[1])
                live.pop(event[1], None)
        elif event[1] == measure_from:
            alloc.peak, alloc.peak_reserved, measuring = alloc.allocated, alloc.reserved, True
    result = {"peak": alloc.peak, "peak_reserved": alloc.peak_reserved, "end": alloc.allocated}
    if breakdown:
        by_op = collections.Counter()
        for label, size in at_peak.values():
            by_op[label] += size
        result["at_peak"] = by_op
    return result


@contextlib.contextmanager
def fake_cuda_step(sdpa_backend: str):
    """Fake tensors + CUDA dispatch + allocation trace; yields the trace (cuBLAS workspaces already allocated)."""
    trace = AllocationTrace()
    with FakeTensorMode(allow_non_fake_inputs=True), trace, CudaDispatch(sdpa_backend):
        trace.alloc(CUBLAS_WORKSPACES)
        yield trace


# ---------------------------------------------------------------------------------------------------------------
# The official step (spec §2.2, §4; structure from the official modelling and training code, written anew here)


def official_rms_norm(self, x):
    """Qwen3RMSNorm: explicit fp32 upcast, pow/mean/rsqrt, cast back, scale."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
    return self.weight * h.to(dtype)


def official_attention(attn, x, rope=None, context=None, mask=None):
    """AceStepAttention + transformers' SDPA integration: K/V expanded to all heads, additive mask, SDPA."""
    b, lq, _ = x.shape
    source = x if context is None else context
    lk = source.shape[1]
    q = attn.q_norm(attn.q_proj(x).view(b, lq, -1, attn.head_dim)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(source).view(b, lk, -1, attn.head_dim)).transpose(1, 2)
    v = attn.v_proj(source).view(b, lk, -1, attn.head_dim).transpose(1, 2)
    if rope is not None:
        cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)  # (1, 1, L, D)

        def rotate(t):
            t1, t2 = t[..., : t.shape[-1] // 2], t[..., t.shape[-1] // 2:]
            return t * cos + torch.cat((-t2, t1), dim=-1) * sin

        q, k = rotate(q), rotate(k)
    groups = attn.num_heads // attn.num_kv_heads

    def repeat_kv(t):
        bb, h, length, d = t.shape
        return t[:, :, None].expand(bb, h, groups, length, d).reshape(bb, h * groups, length, d)

    k, v = repeat_kv(k), repeat_kv(v)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=attn.head_dim ** -0.5)
    out = out.transpose(1, 2).contiguous()
    return attn.o_proj(out.reshape(b, lq, -1).contiguous())


def official_mlp(mlp, x):
    """Qwen3MLP: three separate projections, silu(gate) kept for backward."""
    return mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


def official_4d_mask(length: int, dtype, device, window=None) -> torch.Tensor:
    """The official create_4d_mask (bidirectional, no padding): bool geometry, then an additive [1, 1, L, L]."""
    index = torch.arange(length, device=device)
    diff = index.unsqueeze(1) - index.unsqueeze(0)
    valid = torch.ones((length, length), device=device, dtype=torch.bool)
    if window is not None:
        valid = valid & (torch.abs(diff) <= window)
    valid = valid.unsqueeze(0).unsqueeze(0)
    mask = torch.full(valid.shape, torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.masked_fill_(valid, 0.0)


def official_decoder_forward(dit, hidden_states, timestep, timestep_r, attention_mask, encoder_hidden_states,
                             encoder_attention_mask, context_latents):
    """AceStepDiTModel.forward in training: masks discarded, three additive masks built, the layers, the output.
    Only parameters are taken from acestep_lora.model's modules; every computation is the official one."""
    cfg = dit.config
    temb_t, proj_t = dit.time_embed(timestep)
    temb_r, proj_r = dit.time_embed_r(timestep - timestep_r)
    temb, temb6 = temb_t + temb_r, proj_t + proj_r
    h = torch.cat([context_latents, hidden_states], dim=-1)
    frames = h.shape[1]
    if frames % dit.patch_size:
        h = F.pad(h, (0, 0, 0, dit.patch_size - frames % dit.patch_size))
    h = dit.proj_in(h)
    context = dit.condition_embedder(encoder_hidden_states)
    length, enc_length, dtype, device = h.shape[1], context.shape[1], h.dtype, h.device
    full = official_4d_mask(length, dtype, device)
    cross = official_4d_mask(max(length, enc_length), dtype, device)[:, :, :length, :enc_length]
    sliding = official_4d_mask(length, dtype, device, cfg.sliding_window)
    with torch.autocast("cpu", enabled=False):  # Qwen3RotaryEmbedding computes in fp32, returns x's dtype
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim))
        positions = torch.arange(length, device=device).float()[None, None, :]
        freqs = (inv_freq[None, :, None].float() @ positions).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        rope = emb.cos().to(dtype), emb.sin().to(dtype)
    for layer in dit.layers:
        shift, scale, gate, c_shift, c_scale, c_gate = (layer.scale_shift_table + temb6).chunk(6, dim=1)
        x = (layer.self_attn_norm(h) * (1 + scale) + shift).type_as(h)
        mask = sliding if layer.window is not None else full
        h = (h + official_attention(layer.self_attn, x, rope=rope, mask=mask) * gate).type_as(h)
        x = layer.cross_attn_norm(h).type_as(h)
        h = h + official_attention(layer.cross_attn, x, context=context, mask=cross)
        x = (layer.mlp_norm(h) * (1 + c_scale) + c_shift).type_as(h)
        h = (h + official_mlp(layer.mlp, x) * c_gate).type_as(h)
    shift, scale = (dit.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
    h = (dit.norm_out(h) * (1 + scale) + shift).type_as(h)
    return dit.proj_out(h)[:, :frames], None


class OfficialStep:
    """Model, optimizer and data of the official trainer, built on the current (fake) device."""

    def __init__(self, cfg: AceStepConfig, batch: int, frames: int, tokens: int, rank: int = 64):
        from peft import LoraConfig, get_peft_model

        model = AceStepModel(cfg)
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.forward = official_rms_norm.__get__(module)
        decoder = model.decoder
        decoder.forward = (lambda d: lambda **kw: official_decoder_forward(d, **kw))(decoder)
        peft_decoder = get_peft_model(decoder, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.1,
                                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                          bias="none"))
        model.decoder = peft_decoder
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01, fused=True)
        self.model = model.to(torch.bfloat16)  # the whole model, LoRA included, in the compute dtype
        self.decoder = peft_decoder
        self.table = torch.tensor([1.0, 0.95, 0.9, 0.83, 0.75, 0.64, 0.5, 0.3], dtype=torch.bfloat16)
        bf16 = torch.bfloat16
        self.batch = {"target_latents": torch.randn(batch, frames, 64, dtype=bf16),
                      "attention_mask": torch.ones(batch, frames, dtype=bf16),
                      "encoder_hidden_states": torch.randn(batch, tokens, cfg.hidden_size, dtype=bf16),
                      "encoder_attention_mask": torch.ones(batch, tokens, dtype=torch.bool),
                      "context_latents": torch.randn(batch, frames, 128, dtype=bf16)}

    def step(self):
        b = self.batch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x0 = b["target_latents"]
            attention_mask = b["attention_mask"].to(dtype=torch.bfloat16)
            encoder_mask = b["encoder_attention_mask"].to(dtype=torch.bfloat16)
            x1 = torch.randn_like(x0)
            t = self.table[torch.randint(0, len(self.table), (x0.shape[0],))]
            t_ = t[:, None, None]
            xt = t_ * x1 + (1.0 - t_) * x0
            out = self.decoder(hidden_states=xt, timestep=t, timestep_r=t, attention_mask=attention_mask,
                               encoder_hidden_states=b["encoder_hidden_states"], encoder_attention_mask=encoder_mask,
                               context_latents=b["context_latents"])
            pred = out[0].to(torch.get_default_dtype())  # Fabric's MixedPrecision.convert_output
            loss = F.mse_loss(pred, x1 - x0)
        loss = loss.float()
        loss.backward()
        grads = [p for p in self.decoder.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(grads, 1.0, foreach=True)  # Fabric's clip; foreach is the CUDA default
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def official_peak(batch: int, frames: int, tokens: int = ENCODER_LENGTH, rank: int = 64,
                  cfg: AceStepConfig | None = None) -> dict:
    with fake_cuda_step("auto") as trace:
        step = OfficialStep(cfg or full_config(), batch, frames, tokens, rank)
        step.step()
        trace.mark("measure")
        step.step()
        del step
    return replay(trace.events, "measure")


# ---------------------------------------------------------------------------------------------------------------
# Our step: the real Trainer


def our_peak(batch: int, frames, tokens: int = ENCODER_LENGTH, rank: int = 64, checkpointing: str = "off",
             attention: str = "flash", cfg: AceStepConfig | None = None, breakdown: bool = False) -> dict:
    """``frames``: one length for every sample, or a list (unequal lengths: a padded batch)."""
    with tempfile.TemporaryDirectory() as workdir:
        trainer = make_trainer(workdir, cfg or full_config(), batch, frames, tokens, rank,
                               checkpointing=checkpointing, device="cpu", dtype=torch.bfloat16, build=False)
        sdpa = "auto" if attention == "sdpa" else attention
        with fake_cuda_step(sdpa) as trace:
            trainer.setup(model=random_model(trainer))
            mirror_cuda_readback(trainer)
            trainer.net.attention_backend = attention
            train_step(trainer)
            trace.mark("measure")
            train_step(trainer)
            del trainer
    return replay(trace.events, "measure", breakdown)


# ---------------------------------------------------------------------------------------------------------------


def check_rows() -> list[tuple]:
    rows = []
    for (batch, frames), measured in OFFICIAL_PEAKS.items():
        model = official_peak(batch, frames)["peak"] / GIB
        rows.append((batch, frames, measured, model, 100 * (model / measured - 1)))
    return rows


OUR_ROWS = [  # (label, batch, frames, checkpointing)
    ("1 x 1500", 1, 1500, "off"), ("1 x 6000", 1, 6000, "off"), ("2 x 6000", 2, 6000, "off"),
    ("1 x 12000", 1, 12000, "off"), ("2 x 6000 padded (6000 + 4000 frames)", 2, [6000, 4000], "off"),
    ("1 x 1500", 1, 1500, "on"), ("1 x 6000", 1, 6000, "on"), ("2 x 6000", 2, 6000, "on"),
    ("1 x 12000", 1, 12000, "on")]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--check-only", action="store_true", help="only the official-structure check")
    parser.add_argument("--attention", default="flash,sdpa", help="our attention backends to model")
    args = parser.parse_args()
    lines = ["Official-structure step vs the official H100 measurements (issue 6), peak GiB "
             "(torch.cuda.max_memory_allocated):", "", "| B x T | measured | model | error |", "|---|---|---|---|"]
    for batch, frames, measured, model, err in check_rows():
        lines.append(f"| {batch} x {frames} | {measured:.2f} | {model:.2f} | {err:+.1f} % |")
        print(lines[-1], flush=True)
    if not args.check_only:
        from acestep_lora.memory import estimate_peak_bytes

        backends = args.attention.split(",")
        lines += ["", "Our step (acestep_lora.train.Trainer, full-size turbo, LoRA r=64 q/k/v/o, bf16), peak GiB; "
                  "last column: acestep_lora.memory.estimate_peak_bytes (training-start estimate, flash):", "",
                  "| B x T | GC | " + " | ".join(f"attention {b}" for b in backends) + " | estimate |",
                  "|---|---|" + "---|" * (len(backends) + 1)]
        for label, batch, frames, gc_mode in OUR_ROWS:
            peaks = [our_peak(batch, frames, checkpointing=gc_mode, attention=b)["peak"] / GIB for b in backends]
            longest = max(frames) if isinstance(frames, list) else frames
            estimate = estimate_peak_bytes(full_config(), batch, longest, ENCODER_LENGTH, 64,
                                           ["q_proj", "k_proj", "v_proj", "o_proj"], gc_mode == "on") / GIB
            lines.append(f"| {label} | {gc_mode} | " + " | ".join(f"{p:.2f}" for p in peaks) + f" | {estimate:.2f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.record:
        record(os.path.join(os.path.dirname(__file__), "RESULTS.md"), "Peak memory model (fake tensors, CUDA "
               "allocator)", "python bench/memory_model.py --record", text)


if __name__ == "__main__":
    main()
