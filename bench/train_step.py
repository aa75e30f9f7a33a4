"""Training-step benchmark: ms/step (median, p10-p90), audio-seconds per second, peak memory, TFLOP/step, MFU.

    python bench/train_step.py [--steps 30] [--record]

On a CUDA GPU: the full-size ACE-Step 1.5 turbo config (random weights, bf16 autocast, LoRA r=64/alpha=128/dropout
0.1 on decoder q/k/v/o, encoder length 769), at the rows of the official-trainer baseline. On a CPU: the tiny
config, which only shows that the step runs and what it costs here; its numbers are not comparable.
"""
import argparse
import math
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ENCODER_LENGTH, FRAMES_PER_SECOND, cpu_config, device_name, full_config, make_trainer,  # noqa
                    peak_tflops, record, train_step, training_tflops)

GPU_ROWS = [(1, 375, "off"), (1, 1500, "off"), (1, 6000, "off"), (4, 1500, "off"), (8, 1500, "off"),
            (2, 6000, "off"), (1, 6000, "on")]
CPU_ROWS = [(1, 375, "off"), (1, 1500, "off"), (4, 1500, "off"), (1, 1500, "on")]
RANK = 64


def bench_row(workdir, cfg, batch, frames, checkpointing, steps, warmup, rank):
    trainer = make_trainer(workdir, cfg, batch, frames, ENCODER_LENGTH, rank, checkpointing=checkpointing)
    device = trainer.device
    for _ in range(warmup):
        train_step(trainer)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            train_step(trainer)
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        import resource

        for _ in range(steps):
            t0 = time.perf_counter()
            train_step(trainer)
            times.append((time.perf_counter() - t0) * 1000)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # process peak RSS, GiB
    median = statistics.median(times)
    q = statistics.quantiles(times, n=10) if len(times) >= 10 else [min(times)] * 9 + [max(times)]
    tflop = training_tflops(cfg, batch, frames, ENCODER_LENGTH, rank, trainer.targets,
                            checkpointing=trainer.net.gradient_checkpointing)
    audio_seconds = batch * frames / FRAMES_PER_SECOND
    mfu = tflop / (median / 1000) / peak_tflops(device)
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"batch": batch, "frames": frames, "checkpointing": checkpointing, "audio_s": audio_seconds,
            "ms_median": median, "ms_p10": q[0], "ms_p90": q[-1], "audio_s_per_s": audio_seconds / (median / 1000),
            "peak_gib": peak, "tflop": tflop, "mfu": mfu}


def table(rows) -> str:
    lines = ["| B x T (frames) | audio s | GC | ms/step median (p10-p90) | audio-s/s | peak GiB | TFLOP/step | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = "n/a" if math.isnan(r["mfu"]) else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['batch']} x {r['frames']} | {r['audio_s']:.0f} | {r['checkpointing']} | "
                     f"{r['ms_median']:.1f} ({r['ms_p10']:.1f}-{r['ms_p90']:.1f}) | {r['audio_s_per_s']:.0f} | "
                     f"{r['peak_gib']:.2f} | {r['tflop']:.3g} | {mfu} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    cfg = full_config() if cuda else cpu_config()
    rows_spec = GPU_ROWS if cuda else CPU_ROWS
    rank = RANK if cuda else 8
    print(f"device: {device_name()}; config: {'full-size ACE-Step 1.5 turbo' if cuda else 'TINY (CPU: not comparable)'}"
          f"; LoRA r={rank} alpha={2 * rank} dropout 0.1 on q,k,v,o; encoder length {ENCODER_LENGTH}")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for batch, frames, gc in rows_spec:
            try:
                rows.append(bench_row(workdir, cfg, batch, frames, gc, args.steps, args.warmup, rank))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
            except torch.OutOfMemoryError:
                print(f"| {batch} x {frames} | OOM |")
                torch.cuda.empty_cache()
    text = table(rows)
    print(text)
    if args.record:
        title = "Training step, " + ("full-size turbo, bf16" if cuda else "tiny config on CPU (not comparable)")
        record(os.path.join(os.path.dirname(__file__), "RESULTS.md"), title,
               f"python bench/train_step.py --steps {args.steps} --record", text)


if __name__ == "__main__":
    main()
