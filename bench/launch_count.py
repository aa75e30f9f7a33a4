"""CUDA kernel launches per training step, counted on a CPU: eager (dispatch model) and compiled (inductor code).

    python bench/launch_count.py [--record] [--official] [--compiled]

The official step is launch-bound on an H100 (~8,450 launches per step, ~280 ms of CPU issue time for ~60 ms of GPU
work), so launches per step are the GPU-free proxy for its speed. Counted on a tiny-width (hidden 64), full-depth
(24 DiT layers) turbo config, 1 x 1500 frames, encoder length 769, LoRA r=8 on q/k/v/o, dropout 0.1, bf16 autocast:
the structure of the CUDA step at a size a CPU handles in seconds.

- **eager**: the real step runs on fake tensors under ``bench.common.CudaDispatch`` (CUDA autocast policy, fused
  dropout and rms_norm, the attention kernel CUDA runs: ``flash`` for ours). Every dispatched ATen op is mapped to
  the kernels it launches on CUDA (``kernels_launched``: views and allocations launch none, multi-tensor-apply ops
  one per chunk of tensors, FlashAttention's backward three (+2 with GQA), ...). ``.item()``-style reads are
  counted as host syncs.
- **compiled**: the decoder compiled by ``acestep_lora.compile.CompiledDecoder`` with inductor on the CPU (C++
  kernels where CUDA gets Triton ones: the same fusion decisions, one kernel per fused group), the flash kernels as
  opaque extern calls (a library op with their signature), dropout as on CUDA. Launches = every kernel and extern
  call in the generated forward code, the generated kernels of the backward code plus the extern calls it
  dispatches, and the eager ops outside the compiled region (noise, timesteps, loss, clipping, AdamW), counted as
  above. Compiling 24 layers on a CPU takes long, and the layers compile to the same kernels, so 1 and 2 layers
  are compiled and the count is extrapolated linearly (launches = a + b x layers).
  With CUDA-graph replay (``CompiledDecoder(cuda_graphs=True)``) the compiled forward and backward are one graph
  launch each.
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys
import tempfile

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ENCODER_LENGTH, CudaDispatch, make_trainer, mirror_cuda_readback, random_model,  # noqa: E402
                    record, train_step)

from acestep_lora.testing import tiny_dit_config  # noqa: E402

# No kernel: views, metadata, allocation without initialisation.
NO_KERNEL = {"view", "_unsafe_view", "reshape", "transpose", "t", "permute", "expand", "unsqueeze", "squeeze",
             "slice", "select", "split", "split_with_sizes", "chunk", "unbind", "as_strided", "alias", "detach",
             "_reshape_alias", "unflatten", "flatten", "narrow", "lift_fresh", "is_same_size", "empty", "empty_like",
             "empty_strided", "new_empty", "new_empty_strided", "_to_copy_noop", "set_", "sym_size", "sym_stride",
             "empty_permuted", "resize_", "view_as_real", "view_as_complex", "_conj", "_neg_view", "movedim",
             "swapaxes", "unfold", "diagonal", "_unsafe_index_put"}
HOST_SYNC = {"_local_scalar_dense", "item", "equal", "is_nonzero", "nonzero"}
MTA_MAX_TENSORS = (110, 64, 48, 36, 30)  # multi_tensor_apply: tensors per launch by list depth (MultiTensorApply.cuh)
MTA_MAX_BLOCKS, MTA_CHUNK = 320, 65536


def _multi_tensor_launches(args) -> int:
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    if not lists:
        return 1
    depth = min(len(lists), len(MTA_MAX_TENSORS))
    chunks = sum(math.ceil(t.numel() / MTA_CHUNK) for t in lists[0])
    return max(math.ceil(len(lists[0]) / MTA_MAX_TENSORS[depth - 1]), math.ceil(chunks / MTA_MAX_BLOCKS))


def kernels_launched(func, args) -> int:
    """CUDA kernels one call of ``func`` launches (torch 2.9.1 CUDA implementations)."""
    name = func.overloadpacket.__name__
    if func.namespace == "prim" or name in NO_KERNEL or name in HOST_SYNC or name.startswith("_record_function"):
        return 0  # prim: tensor metadata queries; record_function: profiler markers
    if name.startswith("_foreach_") or name.startswith("_fused_adam"):
        return _multi_tensor_launches(args) + (1 if name == "_foreach_norm" else 0)  # + the norm's cleanup
    if name in ("_flash_attention_backward", "_scaled_dot_product_flash_attention_backward"):
        q, k = args[1], args[2]
        heads_q, heads_k = (q.shape[-2], k.shape[-2]) if name.startswith("_flash") else (q.shape[1], k.shape[1])
        return 3 + (2 if heads_q != heads_k else 0)  # dot(do, o), the backward, dq conversion; GQA: 2 head sums
    if name in ("_efficient_attention_backward", "_scaled_dot_product_efficient_attention_backward"):
        return 2
    if func.namespace == "acestep_bench":  # the counting stand-ins for FlashAttention (see count_compiled_layers)
        return 1 if name == "flash_fwd" else 3 + (2 if args[1].shape[-2] != args[2].shape[-2] else 0)
    if name == "_fused_rms_norm_backward":
        return 1 + int(bool(args[5][1]))  # input grad; weight grad is a second reduction
    if name == "convolution_backward":
        return sum(bool(m) for m in args[-1])
    return 1


class LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.kernels = collections.Counter()
        self.in_compiled_backward = 0  # launched by a compiled graph's backward (its extern calls)
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_SYNC:
            self.syncs += 1
        n = kernels_launched(func, args)
        if n:
            self.kernels[name] += n
            node = torch._C._current_autograd_node()
            if node is not None and "CompiledFunction" in node.name():
                self.in_compiled_backward += n
        return func(*args, **(kwargs or {}))


def tiny_config(layers: int = 24):
    return tiny_dit_config("turbo", num_hidden_layers=layers)


def count_eager(frames: int = 1500, layers: int = 24, rank: int = 8, batch: int = 1, attention: str = "flash",
                checkpointing: str = "off"):
    """Launches of one steady-state step of our Trainer (the second step: optimizer state exists)."""
    with tempfile.TemporaryDirectory() as workdir:
        trainer = make_trainer(workdir, tiny_config(layers), batch, frames, ENCODER_LENGTH, rank,
                               checkpointing=checkpointing, device="cpu", dtype=torch.bfloat16, build=False)
        sdpa = "auto" if attention == "sdpa" else attention
        with FakeTensorMode(allow_non_fake_inputs=True), CudaDispatch(sdpa):
            trainer.setup(model=random_model(trainer))
            mirror_cuda_readback(trainer)
            trainer.net.attention_backend = attention
            train_step(trainer)
            counter = LaunchCounter()
            CudaDispatch.launches = counter.kernels
            try:
                with counter:
                    train_step(trainer)
            finally:
                CudaDispatch.launches = None
    return counter


_FLASH_OPS_DEFINED = False


def _define_flash_ops():
    """acestep_bench::flash_fwd / flash_bwd: FlashAttention's signature, no computation (counting only)."""
    global _FLASH_OPS_DEFINED
    if _FLASH_OPS_DEFINED:
        return
    _FLASH_OPS_DEFINED = True

    @torch.library.custom_op("acestep_bench::flash_fwd", mutates_args=())
    def flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                  window: int) -> torch.Tensor:
        return torch.zeros_like(q)

    @flash_fwd.register_fake
    def _(q, k, v, cu_q, cu_k, window):
        return torch.empty_like(q)

    @torch.library.custom_op("acestep_bench::flash_bwd", mutates_args=())
    def flash_bwd(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                  cu_k: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    @flash_bwd.register_fake
    def _(grad, q, k, v, cu_q, cu_k, window):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:5])
        ctx.window = inputs[5]

    def backward(ctx, grad):
        q, k, v, cu_q, cu_k = ctx.saved_tensors
        return (*flash_bwd(grad, q, k, v, cu_q, cu_k, ctx.window), None, None, None)

    torch.library.register_autograd("acestep_bench::flash_fwd", backward, setup_context=setup)


KERNEL_CALL = re.compile(r"(cpp_fused_\w+|triton_\w+|extern_kernels\.\w+|torch\.ops\.\w+\.\w+\.\w+|aten\.\w+\.\w+)\(")


def generated_calls(source: str) -> collections.Counter:
    """Kernel and extern calls in an inductor wrapper module's ``call`` function, by kind."""
    body = source[source.index("def call("):]
    calls = collections.Counter()
    for name in KERNEL_CALL.findall(body):
        if name.startswith(("cpp_fused_", "triton_")):
            calls["generated kernel"] += 1
        elif name not in ("extern_kernels.alloc_from_pool",):
            calls[name] += 1
    return calls


def count_compiled_layers(layers: int, frames: int = 1500, rank: int = 8, batch: int = 1):
    """(forward calls, backward generated kernels, dispatched launches outside them) of one compiled step."""
    import torch._inductor.codecache as codecache
    from torch.utils._python_dispatch import _disable_current_modes

    from acestep_lora import attention, model
    from acestep_lora.compile import CompiledDecoder

    _define_flash_ops()
    saved = attention.flash_kernel, model.NATIVE_DROPOUT_DEVICES
    attention.flash_kernel = lambda q, k, v, cu_q, cu_k, max_q, max_k, window: torch.ops.acestep_bench.flash_fwd(
        q, k, v, cu_q, cu_k, -1 if window is None else window)
    model.NATIVE_DROPOUT_DEVICES = saved[1] + ("cpu",)
    torch._dynamo.reset()
    try:
        with tempfile.TemporaryDirectory() as workdir:
            trainer = make_trainer(workdir, tiny_config(layers), batch, frames, ENCODER_LENGTH, rank, device="cpu",
                                   dtype=torch.bfloat16)
            trainer.net.attention_backend = "flash"
            trainer.step_decoder = compiled = CompiledDecoder(trainer.net, dtype=torch.bfloat16)
            before = len(codecache.PyCodeCache.modules)
            train_step(trainer)  # compiles the forward and the backward
            sources = [open(m.__file__).read() for m in codecache.PyCodeCache.modules[before:]]
            compiled_forward = compiled.forward

            def forward_without_counting(*args):
                with _disable_current_modes():  # the compiled forward is counted from its generated code
                    return compiled_forward(*args)

            compiled.forward = forward_without_counting
            counter = LaunchCounter()
            with counter:
                train_step(trainer)
    finally:
        attention.flash_kernel, model.NATIVE_DROPOUT_DEVICES = saved
        torch._dynamo.reset()
    forward_module = next(s for s in sources if "flash_fwd" in s)
    backward_module = next(s for s in sources if "flash_bwd" in s)
    return generated_calls(forward_module), generated_calls(backward_module)["generated kernel"], counter


def count_compiled(frames: int = 1500, layers: int = 24, rank: int = 8) -> dict:
    """Launches of the compiled step at ``layers`` layers, extrapolated from 1- and 2-layer compiles."""
    totals = {}
    for n in (1, 2):
        forward, backward_kernels, counter = count_compiled_layers(n, frames, rank)
        dispatched = sum(counter.kernels.values())
        totals[n] = {"forward": sum(forward.values()), "backward": backward_kernels + counter.in_compiled_backward,
                     "eager": dispatched - counter.in_compiled_backward, "syncs": counter.syncs}
    per_layer = {k: totals[2][k] - totals[1][k] for k in ("forward", "backward", "eager")}
    result = {k: totals[1][k] + (layers - 1) * per_layer[k] for k in per_layer}
    result["total"] = sum(result.values())
    result["syncs"] = totals[1]["syncs"]
    result["per layer"] = sum(per_layer.values())
    return result


def count_official(frames: int = 1500, layers: int = 24, rank: int = 8, batch: int = 1):
    """Launches of the official step (bench/memory_model.OfficialStep) on the same config, plus its .item()."""
    from memory_model import OfficialStep

    with FakeTensorMode(allow_non_fake_inputs=True), CudaDispatch("auto"):
        step = OfficialStep(tiny_config(layers), batch, frames, ENCODER_LENGTH, rank)
        step.step()
        counter = LaunchCounter()
        CudaDispatch.launches = counter.kernels
        try:
            with counter:
                step.step()
        finally:
            CudaDispatch.launches = None
    counter.syncs += 1  # self.training_losses.append(loss.item())
    return counter


def profile_cuda(mode: str, frames: int = 1500, layers: int = 24, rank: int = 8, steps: int = 3) -> float:
    """Kernels per step on a real GPU (torch.profiler's device-side events), ``eager`` or ``compiled``: the check of
    the dispatch model above."""
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as workdir:
        trainer = make_trainer(workdir, tiny_config(layers), 1, frames, ENCODER_LENGTH, rank, device="cuda",
                               compile="on" if mode == "compiled" else "off")
        for _ in range(3):
            train_step(trainer)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                train_step(trainer)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    torch._dynamo.reset()
    return len(kernels) / steps


def _ablations():
    """(change, how to undo it in the final code): each change's launches, measured by undoing it alone."""
    import torch.nn.functional as F

    from acestep_lora import model

    def per_layer_modulation(self, temb6):
        out = []
        for layer in self.layers:  # the previous per-layer work: table + projection, then 1 + scale twice
            mod = layer.scale_shift_table + temb6
            mod[:, 1] += 1
            mod[:, 4] += 1
            out.append(mod)
        return out

    def rope_with_negation(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def unfused_norm(self, x):
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    def plain_down(x, a, p):  # dropout's output kept for backward instead of x and the mask
        return F.linear(F.dropout(x, p, True), a)

    def plain_swiglu(gate, up):
        return F.silu(gate) * up

    return [
        ("attention plans: flash with window, GQA and lengths (undone: SDPA with masks, MATH on sliding layers)",
         None, "sdpa"),
        ("LoRA weights cast and scaled once per step (undone: autocast casts each use and each gradient)",
         (model, "cast_adapters", lambda modules, dtype: None), "flash"),
        ("frozen Linears sharing an input in one GEMM: q/k/v, cross k/v, gate/up (undone: one GEMM each)",
         (model.SharedInput, "fuse", lambda self: None), "flash"),
        ("rms_norm with its weight in one call (undone: rms_norm, then a separate weight multiply)",
         (model.RMSNorm, "forward", unfused_norm), "flash"),
        ("AdaLN modulation of all layers at once (undone: per layer, table add and two 1 + scale)",
         (model.DiT, "modulation", per_layer_modulation), "flash"),
        ("RoPE with the rotate-half sign in the sine table (undone: a negation kernel per q and k)",
         (model, "apply_rotary", rope_with_negation), "flash"),
        ("memory: LoRA down-projection keeps x and a bool mask, not the dropped x (undone)",
         (model._DroppedDown, "apply", plain_down), "flash"),
        ("memory: SwiGLU keeps gate and up only (undone: silu(gate) kept too)",
         (model._SwiGLU, "apply", plain_swiglu), "flash"),
    ]


def ablation_rows(frames: int = 1500, layers: int = 24) -> list:
    final = sum(count_eager(frames, layers).kernels.values())
    rows = [("final", final, 0)]
    for label, patch, attention in _ablations():
        if patch is not None:
            owner, name, replacement = patch
            own = owner.__dict__.get(name)  # None: inherited (autograd.Function.apply), removed again after
            setattr(owner, name, staticmethod(replacement) if name == "apply" else replacement)
        try:
            undone = sum(count_eager(frames, layers, attention=attention).kernels.values())
        finally:
            if patch is not None:
                if own is None:
                    delattr(owner, name)
                else:
                    setattr(owner, name, own)
        rows.append((label, undone, final - undone))
    return rows


def summary(counter: LaunchCounter, top: int = 12) -> str:
    lines = ["| kernel (ATen op) | launches |", "|---|---|"]
    lines += [f"| {name} | {n} |" for name, n in counter.kernels.most_common(top)]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--official", action="store_true", help="also count the official step")
    parser.add_argument("--compiled", action="store_true", help="also count the compiled step")
    parser.add_argument("--profile", action="store_true", help="CUDA: count the kernels of real steps instead")
    parser.add_argument("--ablations", action="store_true", help="each change's launches: the final code with it "
                        "undone")
    args = parser.parse_args()
    if args.ablations:
        lines = ["| change | launches with it undone | launches it saves |", "|---|---|---|"]
        for label, undone, saved in ablation_rows():
            lines.append(f"| {label} | {undone:,} | {-saved:+,} |" if label != "final"
                         else f"| final code | {undone:,} | |")
            print(lines[-1], flush=True)
        if args.record:
            record(os.path.join(os.path.dirname(__file__), "RESULTS.md"), "Kernel launches: each change undone",
                   "python bench/launch_count.py --ablations --record", "\n".join(lines))
        return
    if args.profile:
        print(f"CUDA kernels per step, profiled ({torch.cuda.get_device_name()}; tiny width, 24 layers, 1 x 1500, "
              f"r=8): eager {profile_cuda('eager'):.0f} (the dispatch model on a CPU: "
              f"{sum(count_eager().kernels.values())})", flush=True)
        print(f"compiled: {profile_cuda('compiled'):.0f} (the CPU-compiled count: bench/RESULTS.md)", flush=True)
        return
    torch.set_num_threads(1)
    rows = []
    if args.official:
        c = count_official()
        rows.append(("official step (PEFT, K/V expanded, masks, Qwen3 RMSNorm)", sum(c.kernels.values()), c.syncs))
    c = count_eager()
    rows.append(("ours, eager", sum(c.kernels.values()), c.syncs))
    detail = summary(c)
    if args.compiled:
        compiled = count_compiled()
        rows.append((f"ours, compiled (inductor: {compiled['forward']:,} in the forward graph, "
                     f"{compiled['backward']:,} in the backward graph, {compiled['eager']:,} eager outside them; "
                     f"{compiled['per layer']} per layer)", compiled["total"], compiled["syncs"]))
        rows.append(("ours, compiled + CUDA-graph replay (each graph one launch)", compiled["eager"] + 2,
                     compiled["syncs"]))
    lines = ["CUDA kernel launches per training step (tiny width, 24 layers, 1 x 1500, encoder 769, LoRA r=8 "
             "q/k/v/o, dropout 0.1, bf16 autocast):", "", "| step | launches | host syncs |", "|---|---|---|"]
    lines += [f"| {label} | {n:,} | {s} |" for label, n, s in rows]
    text = "\n".join(lines + ["", "Ours, eager, largest groups:", "", detail])
    print(text)
    if args.record:
        record(os.path.join(os.path.dirname(__file__), "RESULTS.md"), "Kernel launches per training step",
               " ".join(["python bench/launch_count.py", *sys.argv[1:]]), text)


if __name__ == "__main__":
    main()
