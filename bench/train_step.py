"""Training-step benchmark: ms/step (median, p10-p90), audio-seconds per second against the official trainer and the
issue's targets, peak memory against the official and against acestep_lora.memory's estimate, TFLOP/step, MFU.

    python bench/train_step.py [--steps 30] [--mode eager,compiled,graphs] [--rows 1x1500,1x6000] [--record]

On a CUDA GPU: the full-size ACE-Step 1.5 turbo config (random weights, bf16 autocast, LoRA r=64/alpha=128/dropout
0.1 on decoder q/k/v/o, encoder length 769), at the rows of the official-trainer baseline (issue 6, one H100) plus a
padded batch and a 480 s sample. Modes: ``eager``; ``compiled`` (acestep_lora.compile.CompiledDecoder, one graph
per length bucket, compile time excluded: warm-up steps); ``graphs`` (compiled with CUDA-graph replay). On a CPU:
the tiny config, which only shows that the step runs; its numbers are not comparable and the targets are "not
measured (no GPU)".
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

from acestep_lora.memory import estimate_peak_bytes  # noqa: E402

# (B, frames): official ms/step, audio-s/s, peak GiB on an H100 (issue 6)
OFFICIAL = {(1, 375): (208, 72, 5.8), (1, 1500): (282, 213, 7.7), (1, 6000): (261, 918, 15.1),
            (4, 1500): (291, 826, 16.2), (8, 1500): (350, 1372, 27.4), (2, 6000): (343, 1398, 25.2)}
SPEED_TARGETS = {(1, 1500): 10, (1, 6000): 5, (8, 1500): 3}  # x the official audio-s/s, at no more memory
GC_TARGET_GIB = {(1, 6000): 8.0}  # peak with gradient checkpointing (issue 6)
GPU_ROWS = [(1, 375, "off"), (1, 1500, "off"), (1, 6000, "off"), (4, 1500, "off"), (8, 1500, "off"),
            (2, 6000, "off"), (1, 6000, "on"), (2, (6000, 4000), "off"), (1, 12000, "on")]
CPU_ROWS = [(1, 375, "off"), (1, 1500, "off"), (4, 1500, "off"), (1, 1500, "on")]
RANK = 64
MODES = ("eager", "compiled", "graphs")


def _longest(frames) -> int:
    return max(frames) if isinstance(frames, (list, tuple)) else frames


def bench_row(workdir, cfg, batch, frames, checkpointing, steps, warmup, rank, mode="eager"):
    trainer = make_trainer(workdir, cfg, batch, frames, ENCODER_LENGTH, rank, checkpointing=checkpointing,
                           compile="off" if mode == "eager" else "on", cuda_graphs=mode == "graphs")
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
    gc_on = trainer.net.gradient_checkpointing
    longest = _longest(frames)
    tflop = training_tflops(cfg, batch, longest, ENCODER_LENGTH, rank, trainer.targets, checkpointing=gc_on)
    audio_seconds = sum(frames) / FRAMES_PER_SECOND if isinstance(frames, (list, tuple)) \
        else batch * frames / FRAMES_PER_SECOND
    mfu = tflop / (median / 1000) / peak_tflops(device)
    estimate = estimate_peak_bytes(cfg, batch, longest, ENCODER_LENGTH, rank, trainer.targets, gc_on,
                                   dtype=trainer.dtype, dataset_bytes=trainer.data.bytes()) / 2 ** 30
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"batch": batch, "frames": frames, "checkpointing": checkpointing, "mode": mode, "audio_s": audio_seconds,
            "ms_median": median, "ms_p10": q[0], "ms_p90": q[-1], "audio_s_per_s": audio_seconds / (median / 1000),
            "peak_gib": peak, "estimate_gib": estimate, "tflop": tflop, "mfu": mfu, "cuda": device.type == "cuda"}


def _label(r) -> str:
    frames = r["frames"]
    if isinstance(frames, (list, tuple)):
        return f"{r['batch']} x {max(frames)} (padded: {' + '.join(map(str, frames))})"
    return f"{r['batch']} x {frames}"


def table(rows) -> str:
    lines = ["| B x T (frames) | GC | mode | ms/step median (p10-p90) | audio-s/s | vs official (target) | "
             "peak GiB (official; target) | estimate GiB | TFLOP/step | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = (r["batch"], r["frames"])
        official = OFFICIAL.get(key) if r["checkpointing"] == "off" else None
        target = SPEED_TARGETS.get(key)
        if not r["cuda"]:
            speed = "not measured (no GPU)" + (f"; target >= {target}x" if target else "")
        elif official:
            speed = f"{r['audio_s_per_s'] / official[1]:.1f}x" + (f" (>= {target}x)" if target else "")
        else:
            speed = "–"
        if official:
            memory = f"{r['peak_gib']:.2f} ({official[2]}; <= {official[2]})"
        elif r["checkpointing"] == "on" and key in GC_TARGET_GIB:
            memory = f"{r['peak_gib']:.2f} (–; <= {GC_TARGET_GIB[key]})"
        else:
            memory = f"{r['peak_gib']:.2f}"
        if not r["cuda"]:
            memory = f"{r['peak_gib']:.2f} (process RSS)"
        mfu = "n/a" if math.isnan(r["mfu"]) else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {_label(r)} | {r['checkpointing']} | {r['mode']} | {r['ms_median']:.1f} "
                     f"({r['ms_p10']:.1f}-{r['ms_p90']:.1f}) | {r['audio_s_per_s']:.0f} | {speed} | {memory} | "
                     f"{r['estimate_gib']:.2f} | {r['tflop']:.3g} | {mfu} |")
    return "\n".join(lines)


def parse_rows(text: str, candidates):
    wanted = {tuple(int(v) for v in part.split("x")) for part in text.split(",")}
    return [row for row in candidates if (row[0], _longest(row[1])) in wanted]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--mode", default="eager", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--rows", default="", help="e.g. 1x1500,1x6000 (default: all rows of the device)")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    cfg = full_config() if cuda else cpu_config()
    rows_spec = GPU_ROWS if cuda else CPU_ROWS
    if args.rows:
        rows_spec = parse_rows(args.rows, rows_spec)
    modes = [m for m in args.mode.split(",") if m]
    if not cuda:
        modes = [m for m in modes if m != "graphs"]  # CUDA graphs need CUDA
    rank = RANK if cuda else 8
    print(f"device: {device_name()}; config: {'full-size ACE-Step 1.5 turbo' if cuda else 'TINY (CPU: not comparable)'}"
          f"; LoRA r={rank} alpha={2 * rank} dropout 0.1 on q,k,v,o; encoder length {ENCODER_LENGTH}")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for mode in modes:
            for batch, frames, gc in rows_spec:
                try:
                    rows.append(bench_row(workdir, cfg, batch, frames, gc, args.steps, args.warmup, rank, mode))
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
                except torch.OutOfMemoryError:
                    print(f"| {batch} x {frames} | {gc} | {mode} | OOM |", flush=True)
                    torch.cuda.empty_cache()
    text = table(rows)
    print(text)
    if args.record:
        title = "Training step, " + ("full-size turbo, bf16" if cuda else "tiny config on CPU (not comparable)")
        record(os.path.join(os.path.dirname(__file__), "RESULTS.md"), title,
               f"python bench/train_step.py --steps {args.steps} --mode {args.mode} --record", text)


if __name__ == "__main__":
    main()
