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
- **compiled**: the decoder compiled by ``acestep_lora.compile`` with inductor on the CPU, the flash kernels kept
  as opaque extern calls (a library op with the flash signature): launches = the kernel and extern calls in the
  generated forward and backward code, plus the eager ops outside the compiled region (noise, timesteps, loss,
  clipping, AdamW), counted as above.
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import sys
import tempfile

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ENCODER_LENGTH, CudaDispatch, make_trainer, record, train_step  # noqa: E402

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
    if name == "_fused_rms_norm_backward":
        return 1 + int(bool(args[5][1]))  # input grad; weight grad is a second reduction
    if name == "convolution_backward":
        return sum(bool(m) for m in args[-1])
    return 1


class LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.kernels = collections.Counter()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_SYNC:
            self.syncs += 1
        n = kernels_launched(func, args)
        if n:
            self.kernels[name] += n
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
            trainer._build()
            trainer.net.attention_backend = attention
            trainer._flush = lambda check=True: None
            train_step(trainer)
            counter = LaunchCounter()
            CudaDispatch.launches = counter.kernels
            try:
                with counter:
                    train_step(trainer)
            finally:
                CudaDispatch.launches = None
    return counter


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


def summary(counter: LaunchCounter, top: int = 12) -> str:
    lines = ["| kernel (ATen op) | launches |", "|---|---|"]
    lines += [f"| {name} | {n} |" for name, n in counter.kernels.most_common(top)]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--official", action="store_true", help="also count the official step")
    parser.add_argument("--compiled", action="store_true", help="also count the compiled step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    if args.official:
        c = count_official()
        rows.append(("official step (PEFT, K/V expanded, masks, Qwen3 RMSNorm)", sum(c.kernels.values()), c.syncs))
    c = count_eager()
    rows.append(("ours, eager", sum(c.kernels.values()), c.syncs))
    detail = summary(c)
    if args.compiled:
        from compile_count import count_compiled  # noqa: F401  (kept separate: needs a C++ compiler)
    lines = ["CUDA kernel launches per training step (tiny width, 24 layers, 1 x 1500, encoder 769, LoRA r=8 "
             "q/k/v/o, dropout 0.1, bf16 autocast):", "", "| step | launches | host syncs |", "|---|---|---|"]
    lines += [f"| {label} | {n:,} | {s} |" for label, n, s in rows]
    text = "\n".join(lines + ["", "Ours, eager, largest groups:", "", detail])
    print(text)
    if args.record:
        record(os.path.join(os.path.dirname(__file__), "RESULTS.md"), "Kernel launches per training step",
               "python bench/launch_count.py --official --record", text)


if __name__ == "__main__":
    main()
