"""What hearing the LoRA while it trains costs: audio previews and the held-out validation loss as a share of the
training time, at the defaults (issue 12: at most 10 %), and (CUDA) their memory next to the training peak.

    python bench/preview_overhead.py [--seconds 60] [--record]

Measured on the real code paths (Trainer, previews.Previews, validation.Validation), per unit:
  step     one optimizer step, batch 1, a sample of --seconds (Trainer.step)
  val      the validation loss of one held-out sample: its 8 fixed timesteps (Validation.evaluate)
  preview  one preview set, 2 clips x 20 s: the sampler on the trainer's LoRA-wrapped decoder, the VAE loaded from
           disk, tiled decode, FLAC files written (Previews.render)
  start    the prompts encoded (text + condition encoder loaded, run, released) and the LoRA-off set rendered
and from them a default run: 1000 epochs; previews with each checkpoint (every 200 epochs) and after the last, plus
the LoRA-off set (6 sets + start); validation on 10 % of n samples (at most 20) every 10 epochs, after the last and
before the first step (101 evaluations); overhead = (previews + start + validation) / training, for n = 10, 30, 100.

CPU: the tiny checkpoint, whose DiT is about 1000 x cheaper than the real one while its VAE decoder is only ~16 x
narrower, so previews weigh far more here than at full size; also a short train_lora-like run with both on at
scaled cadences (20 epochs, previews every 10, validation every 2), its hook time measured inside the run.
CUDA: full-size random weights (the DiT config's defaults, the VAE config of the official download), bf16; the
prompts' conditioning is random (no text encoder is written to disk, its one-off cost is left out); and the peak
memory of a training step vs the peak while a preview set renders right after it, against the VAE decoder's size.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ENCODER_LENGTH, FRAMES_PER_SECOND, cpu_config, device_name, full_config, random_model,  # noqa
                    record, write_config, write_tensor_dir)
from prepare_speed import OFFICIAL_VAE  # noqa: E402

from acestep_lora import previews as previews_mod  # noqa: E402
from acestep_lora.data import collate  # noqa: E402
from acestep_lora.train import TrainConfig, Trainer  # noqa: E402
from acestep_lora.validation import held_out_count  # noqa: E402

EPOCHS, SAVE_EVERY, VALIDATION_EVERY = 1000, 200, 10  # the defaults of train_epochs, save_every_n_epochs, ...
DATASETS = (10, 30, 100)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=1):
    """Median seconds of ``fn()`` over ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def checkpoint_for(workdir: str, cuda: bool) -> str:
    ckpt = os.path.join(workdir, "ckpt")
    if not cuda:
        from acestep_lora.console import library_bars_off
        from acestep_lora.testing import make_tiny_checkpoint

        with library_bars_off():
            return make_tiny_checkpoint(ckpt)
    from acestep_lora.vae import Oobleck, save_vae

    write_config(ckpt, full_config())
    torch.manual_seed(0)
    save_vae(Oobleck(OFFICIAL_VAE), OFFICIAL_VAE, os.path.join(ckpt, "vae"))  # random weights, official shapes
    return ckpt


def make(workdir: str, ckpt: str, frames: int, cuda: bool, **kw) -> Trainer:
    cfg = full_config() if cuda else cpu_config()
    tensors = os.path.join(workdir, f"tensors_{frames}")
    if not os.path.isdir(tensors):
        write_tensor_dir(tensors, 10, frames, ENCODER_LENGTH, cfg.encoder_hidden_size or cfg.hidden_size)
    options = dict(tensor_dir=tensors, checkpoint_dir=ckpt, output_dir=os.path.join(workdir, f"run_{time.time_ns()}"),
                   lora_rank=64, lora_alpha=128, device="cuda" if cuda else "cpu")
    options.update(kw)
    trainer = Trainer(TrainConfig(**options))
    trainer.setup(model=random_model(trainer) if cuda else None)
    os.makedirs(trainer.cfg.output_dir, exist_ok=True)
    trainer.metrics.start("bench")
    return trainer


def random_conditioning(trainer, count: int):
    from acestep_lora.sampler import Conditioning, Prompt

    g = torch.Generator().manual_seed(0)
    width = trainer.model_cfg.encoder_hidden_size or trainer.model_cfg.hidden_size
    silence = torch.randn(1, 1500, 64, generator=g)
    return [Conditioning(torch.randn(1, 300, width, generator=g), torch.ones(1, 300, dtype=torch.bool), silence,
                         Prompt("bench", duration=trainer.cfg.preview_seconds).normalized()).to(trainer.device,
                                                                                                trainer.dtype)
            for _ in range(count)]


def units(workdir: str, ckpt: str, frames: int, cuda: bool, preview_seconds: float = 20.0) -> dict:
    # validation_split 0.1 of 10 samples: 1 held out; previews at the defaults (2 clips)
    trainer = make(workdir, ckpt, frames, cuda, preview_seconds=preview_seconds)
    device = trainer.device
    batch = collate([trainer.data.samples[0]])
    for _ in range(3):
        trainer.step(batch)
    out = {"step": timed(lambda: trainer.step(batch), device, repeat=10 if cuda else 5)}
    trainer.validation.evaluate(trainer)
    out["val"] = timed(lambda: trainer.validation.evaluate(trainer), device, repeat=3) / len(trainer.validation.keys)
    previews = previews_mod.Previews(trainer.cfg, trainer)
    if cuda:
        previews.conditioning = random_conditioning(trainer, len(previews.prompts))
        trainer.step(batch)
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        trainer.step(batch)
        sync(device)
        out["peak_step_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        torch.cuda.reset_peak_memory_stats()
        out["preview"] = timed(lambda: previews.render(trainer, "epoch_1", 1, 1), device)
        out["peak_preview_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        from acestep_lora.vae import load_vae

        vae = load_vae(ckpt, decoder=True)
        out["vae_decoder_gib"] = sum(p.numel() for p in vae.model.decoder.parameters()) * 2 / 2 ** 30  # bf16
        out["start"] = out["preview"]
    else:
        out["start"] = timed(lambda: previews.start(trainer), device)
        out["preview"] = timed(lambda: previews.render(trainer, "epoch_1", 1, 1), device, repeat=2)
    trainer.cleanup()
    return out


def default_run(u: dict, samples: int) -> dict:
    held = held_out_count(samples, 0.1)
    training = EPOCHS * (samples - held) * u["step"]
    sets = EPOCHS // SAVE_EVERY  # the last epoch is a checkpoint epoch here
    preview = sets * u["preview"] + u["start"]
    evaluations = 1 + EPOCHS // VALIDATION_EVERY
    validation = evaluations * held * u["val"]
    return {"samples": samples, "held": held, "training_h": training / 3600, "preview_pct": 100 * preview / training,
            "validation_pct": 100 * validation / training, "total_pct": 100 * (preview + validation) / training}


def measured_run(workdir: str, ckpt: str, frames: int) -> dict:
    """A short run with both on at scaled cadences; the hooks' own time measured inside it (CPU)."""
    trainer = make(workdir, ckpt, frames, False, train_epochs=20, save_every_n_epochs=10,
                   validation_every_n_epochs=2)
    previews_mod.Previews(trainer.cfg, trainer).attach(trainer)
    spent = [0.0]

    def timing(hook):
        def run(*args):
            t0 = time.perf_counter()
            try:
                return hook(*args)
            finally:
                spent[0] += time.perf_counter() - t0
        return run

    trainer.start_hooks[:] = [timing(h) for h in trainer.start_hooks]
    trainer.epoch_hooks[:] = [timing(h) for h in trainer.epoch_hooks]
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    trainer.cleanup()
    sets = len(previews_mod.saved_previews(trainer.cfg.output_dir))
    return {"total": total, "hooks": spent[0], "pct": 100 * spent[0] / (total - spent[0]), "sets": sets,
            "evaluations": 1 + 20 // 2, "steps": trainer.global_step}


def tables(u: dict, frames: int, runs: list, measured: dict | None, cuda: bool) -> str:
    seconds = frames / FRAMES_PER_SECOND
    lines = [f"Units (sample of {seconds:g} s, batch 1): training step {1000 * u['step']:.1f} ms; validation "
             f"{1000 * u['val']:.1f} ms per held-out sample (8 timesteps); one preview set (2 x 20 s) "
             f"{u['preview']:.2f} s" + ("" if cuda else f"; start (prompt encoding + LoRA-off set) {u['start']:.2f} s")
             + ".", "",
             f"| dataset (n x {seconds:g} s) | held out | training (1000 epochs) | previews | validation "
             "| total |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['samples']} | {r['held']} | {r['training_h']:.2f} h | {r['preview_pct']:.1f} % | "
                     f"{r['validation_pct']:.1f} % | {r['total_pct']:.1f} % |")
    if measured:
        lines += ["", "Measured inside one short run (10 samples, 1 held out, "
                      f"{measured['steps']} steps over 20 epochs; "
                      f"{measured['sets']} preview sets, {measured['evaluations']} validation losses): hooks "
                      f"{measured['hooks']:.1f} s of {measured['total']:.1f} s = {measured['pct']:.1f} % of the "
                      "training time."]
    if cuda:
        extra = u["peak_preview_gib"] - u["peak_step_gib"]
        lines += ["", f"Memory: training step peak {u['peak_step_gib']:.2f} GiB; peak while a preview set renders "
                      f"after it {u['peak_preview_gib']:.2f} GiB ({extra:+.2f} GiB); VAE decoder weights "
                      f"{u['vae_decoder_gib']:.2f} GiB (bf16)."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each training sample (default 60)")
    parser.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    frames = int(args.seconds * FRAMES_PER_SECOND)
    with tempfile.TemporaryDirectory() as workdir:
        ckpt = checkpoint_for(workdir, cuda)
        u = units(workdir, ckpt, frames, cuda)
        measured = None if cuda else measured_run(workdir, ckpt, frames)
    runs = [default_run(u, n) for n in DATASETS]
    text = tables(u, frames, runs, measured, cuda)
    print(f"{device_name()}\n{text}")
    if args.record:
        title = ("Preview + validation overhead, full size on CUDA" if cuda else
                 "Preview + validation overhead, tiny checkpoint on CPU (previews over-weighted, see the script)")
        record(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"), title,
               f"python bench/preview_overhead.py --seconds {args.seconds:g}" + (" --record" if args.record else ""),
               text)


if __name__ == "__main__":
    main()
