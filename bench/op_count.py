"""GPU-free proxy for launch overhead: ATen operations dispatched per training step.

    python bench/op_count.py [--record]

The official step is launch-bound on an H100 (~8,450 kernel launches per step, ~280 ms of CPU issue time for
~60 ms of GPU work). The number of ATen operations the dispatcher runs per optimizer step (forward, backward,
clipping, AdamW) tracks that cost and can be counted on a CPU, so regressions show up without a GPU. Counted on
a tiny-width (hidden 64), full-depth (24 DiT layers) config, 1 x 1500 frames, encoder length 769, LoRA r=8 on
q/k/v/o, dropout 0.1, base weights in bf16 under bf16 autocast with fp32 LoRA weights — the structure and the
dtype handling of the CUDA step, at a size a CPU runs in a second.
"""
import argparse
import collections
import os
import sys
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ENCODER_LENGTH, make_trainer, record, train_step  # noqa: E402

from acestep_lora.testing import tiny_dit_config  # noqa: E402

# Views and metadata-only ops launch no kernel on a GPU; they are counted separately.
NO_KERNEL = {"view", "_unsafe_view", "reshape", "transpose", "t", "permute", "expand", "unsqueeze", "squeeze",
             "slice", "select", "split", "split_with_sizes", "chunk", "unbind", "as_strided", "alias", "detach",
             "_reshape_alias", "unflatten", "flatten", "narrow", "lift_fresh", "is_same_size", "empty", "empty_like",
             "empty_strided", "zeros_like"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_step(frames: int = 1500, layers: int = 24, rank: int = 8, checkpointing: str = "off",
               dtype=torch.bfloat16, trainer_class=None):
    """Ops of one step. bf16 by default: base weights bf16, LoRA fp32, bf16 autocast — the CUDA code path."""
    cfg = tiny_dit_config("turbo", num_hidden_layers=layers)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = make_trainer(workdir, cfg, 1, frames, ENCODER_LENGTH, rank, checkpointing=checkpointing,
                               device="cpu", dtype=dtype, trainer_class=trainer_class)
        train_step(trainer)  # optimizer state exists after the first step
        with OpCounter() as counter:
            train_step(trainer)
    kernels = {k: v for k, v in counter.counts.items() if k not in NO_KERNEL}
    return sum(counter.counts.values()), sum(kernels.values()), collections.Counter(kernels)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    total, kernels, top = count_step()
    lines = [f"ATen ops per training step (tiny width, 24 layers, 1 x 1500, r=8, bf16 autocast): {total} dispatched, "
             f"{kernels} that launch kernels", "", "| op | count |", "|---|---|"]
    lines += [f"| {name} | {n} |" for name, n in top.most_common(15)]
    text = "\n".join(lines)
    print(text)
    if args.record:
        record(os.path.join(os.path.dirname(__file__), "RESULTS.md"), "ATen ops per training step (launch proxy)",
               "python bench/op_count.py --record", text)


if __name__ == "__main__":
    main()
