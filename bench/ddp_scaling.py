"""Data-parallel scaling: how much faster N processes train than one (torchrun, acestep_lora/distributed.py).

    python bench/ddp_scaling.py [--processes 1 2 8] [--steps 20] [--record]

Each process trains batch_size 1 (one sample of 1500 or 6000 frames per step), so N processes take N samples per
optimizer step; scaling efficiency = (ms/step of 1 process) / (ms/step of N): 100 % when the gradient sum and the
step-boundary agreement cost nothing (target: >= 90 % at 2 GPUs). Every count is its own torchrun launch of this
script (``--worker``), running the real training loop (Trainer.train) on synthetic tensors with random weights; the
time of a step is measured from one epoch's end to the next (one step per epoch, the GPU synchronised there).

On CUDA GPUs: the full-size ACE-Step 1.5 turbo config, bf16, LoRA r=64 on q/k/v/o, NCCL; counts 1, 2 and all GPUs.
Without several GPUs: the CPU/gloo form (tiny config, 1 thread per process, counts 1 and 2), which shows that the
machinery runs and what it costs there, not what GPUs gain; the output says which form ran.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ENCODER_LENGTH, cpu_config, device_name, full_config, random_model, record, write_config  # noqa
from common import write_tensor_dir  # noqa: E402

from acestep_lora import distributed  # noqa: E402
from acestep_lora.train import TrainConfig, Trainer  # noqa: E402

FRAMES = (1500, 6000)


def measure(workdir: str, frames: int, steps: int, warmup: int, device: str, rank: int = 0) -> float:
    """Median ms per optimizer step of the training loop in this process (one of the run's processes); ``rank``:
    the LoRA's (0: 64 on a GPU, 8 on the CPU, as bench/train_step.py)."""
    cuda = device == "cuda"
    cfg, rank = (full_config(), rank or 64) if cuda else (cpu_config(), rank or 8)
    processes = distributed.join(device, 1800)[1]
    ckpt, tensors = os.path.join(workdir, "ckpt"), os.path.join(workdir, f"tensors_{frames}")
    if processes.main:  # one sample per process and step: one optimizer step per epoch
        write_config(ckpt, cfg)
        write_tensor_dir(tensors, processes.world, frames, ENCODER_LENGTH, cfg.encoder_hidden_size or cfg.hidden_size)
    processes.barrier()
    tc = TrainConfig(tensor_dir=tensors, checkpoint_dir=ckpt, output_dir=os.path.join(workdir, f"run_{frames}"),
                     lora_rank=rank, lora_alpha=2 * rank, lora_dropout=0.1, batch_size=1, train_epochs=warmup + steps,
                     save_every_n_epochs=0, gradient_checkpointing="off", device=device)
    trainer = Trainer(tc)
    torch.manual_seed(0)  # the same random base model in every process
    trainer.setup(model=random_model(trainer))
    ends = []

    def clock(t, epoch):
        if t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
        ends.append(time.perf_counter())

    trainer.epoch_hooks.append(clock)
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    times = [(b - a) * 1000 for a, b in zip(ends[warmup - 1:], ends[warmup:])]
    return statistics.median(times)


def worker(args) -> None:
    """One process of a launch: every row in the folder the launcher gave (the same for all processes)."""
    if args.device == "cpu":
        torch.set_num_threads(1)
    rows = {frames: measure(args.workdir, frames, args.steps, args.warmup, args.device) for frames in args.frames}
    if distributed.is_main():
        with open(args.out, "w") as f:
            json.dump(rows, f)
    distributed.shutdown()


def launch(count: int, args, device: str, workdir: str) -> dict:
    out = os.path.join(workdir, "result.json")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={count}",
               os.path.abspath(__file__), "--worker", "--device", device, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--out", out, "--workdir", workdir, "--frames", *map(str, args.frames)]
    env = dict(os.environ, OMP_NUM_THREADS="1") if device == "cpu" else None
    subprocess.run(command, check=True, env=env)
    with open(out) as f:
        return {int(k): v for k, v in json.load(f).items()}


def table(results: dict, frames: list) -> str:
    lines = ["| processes | per process (B x T) | samples per step | ms/step median | samples/s | scaling efficiency |",
             "|---|---|---|---|---|---|"]
    for t in frames:
        for count, rows in sorted(results.items()):
            ms = rows[t]
            lines.append(f"| {count} | 1 x {t} | {count} | {ms:.1f} | {count / ms * 1000:.2f} | "
                         f"{100 * results[min(results)][t] / ms:.0f} % |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", help="process counts (default: 1, 2 and all GPUs)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPUs, 8 on the CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--frames", type=int, nargs="+", default=list(FRAMES))
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    args.steps = args.steps or (20 if gpus else 8)
    if args.worker:
        return worker(args)
    device = "cuda" if gpus else "cpu"
    counts = sorted(set(args.processes or ([1, 2, gpus] if gpus >= 2 else [1, 2] if not gpus else [1])))
    form = (f"{gpus} CUDA GPUs ({device_name()}), NCCL, full-size turbo config, bf16, LoRA r=64" if gpus >= 2 else
            f"one CUDA GPU ({device_name()}): no scaling to measure, the 1-process row only" if gpus else
            f"CPU/gloo form (no GPUs here: tiny config, LoRA r=8, 1 thread per process, {os.cpu_count()} cores): "
            "the machinery runs; not what GPUs gain")
    print(f"data-parallel scaling, {form}; processes {counts}; {args.steps} timed steps after {args.warmup}",
          flush=True)
    results = {}
    for count in counts:
        with tempfile.TemporaryDirectory() as workdir:
            results[count] = launch(count, args, device, workdir)
            print(f"{count} process(es): " + ", ".join(f"1 x {t}: {ms:.1f} ms/step" for t, ms in
                                                       results[count].items()), flush=True)
    text = table(results, args.frames)
    print(text)
    if args.record:
        title = "Data-parallel scaling, " + ("CUDA/NCCL" if gpus >= 2 else "one GPU" if gpus else
                                             "CPU/gloo form (not GPU scaling)")
        record(os.path.join(os.path.dirname(__file__), "RESULTS.md"), title,
               f"python bench/ddp_scaling.py --steps {args.steps} --record", f"{form}.\n\n{text}")


if __name__ == "__main__":
    main()
