"""Preprocessing throughput: audio-seconds prepared per wall-second (VAE encode + text + condition encoder).

    python bench/prepare_speed.py [--record]

CUDA: full-size random-weight models (official VAE config, Qwen3-Embedding-0.6B-sized text encoder, full condition
encoder) in bf16, on 60 s and 240 s clips, through the same per-sample code Prepare runs (target: >= 100x real
time on an H100). CPU: the tiny generated checkpoint, end to end through prepare_dataset (files, cache keys,
.pt writes included).
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, record  # noqa: E402

from acestep_lora import prepare as prep  # noqa: E402
from acestep_lora.prepare import PrepareItem, PrepareSettings, prepare_dataset  # noqa: E402

OFFICIAL_VAE = {"encoder_hidden_size": 128, "downsampling_ratios": [2, 4, 4, 6, 10],
                "channel_multiples": [1, 2, 4, 8, 16], "decoder_channels": 128, "decoder_input_channels": 64,
                "audio_channels": 2, "sampling_rate": 48000}
LYRICS = "[Verse]\n" + "\n".join(["walking down the empty road tonight, the city sleeps"] * 12)


def clip(seconds: float) -> torch.Tensor:
    t = torch.arange(int(seconds * 48000)) / 48000
    return (0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.02 * torch.randn(t.shape)).expand(2, -1).clone()


QWEN3_EMBEDDING_06B = dict(vocab_size=151669, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                           num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e6)


def random_models(tmp: str, device="cuda", dtype=torch.bfloat16, vae_cfg=None, text_cfg=None, dit_cfg=None):
    """A _Models instance with random weights (default: full size); nothing is read from disk but a tokenizer."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    from acestep_lora.config import AceStepConfig
    from acestep_lora.model import AceStepModel
    from acestep_lora.testing import write_text_encoder
    from acestep_lora.text import TextEncoder
    from acestep_lora.vae import AudioVAE, Oobleck

    vae_cfg, text_cfg, dit_cfg = vae_cfg or OFFICIAL_VAE, text_cfg or QWEN3_EMBEDDING_06B, dit_cfg or AceStepConfig()
    device = torch.device(device)
    write_text_encoder(os.path.join(tmp, "tok"))
    models = object.__new__(prep._Models)
    models.settings = PrepareSettings(checkpoint_dir=tmp)
    models.device, models.dtype = device, dtype
    with torch.device(device):
        models.vae = AudioVAE(Oobleck(vae_cfg).to(dtype), vae_cfg)
        qwen = Qwen3Model(Qwen3Config(**text_cfg)).to(dtype)
        models.text = TextEncoder(AutoTokenizer.from_pretrained(os.path.join(tmp, "tok")), qwen)
        models.dit = AceStepModel(dit_cfg, components=("encoder",)).to(dtype).eval()
        models.silence = torch.randn(1, 15000, 64, dtype=dtype)
    for module in (models.vae.model, qwen, models.dit):
        for p in module.parameters():
            p.requires_grad_(False).normal_(0, 0.02)
    return models


def bench_models(seconds_list, repeats, **model_kw):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = random_models(tmp, **model_kw)
        cuda = models.device.type == "cuda"
        for seconds in seconds_list:
            item = PrepareItem(name=f"{seconds:.0f}s", caption="energetic rock, distorted guitars, punchy drums",
                               waveform=clip(seconds), sample_rate=48000, lyrics=LYRICS, bpm=128, keyscale="E minor",
                               language="en")
            source = prep._resolve_source(item, models.settings)
            source.content = "bench"
            (piece,) = prep._cut(source, models.settings, {})  # one training sample: the whole clip
            models.encode(piece, item.waveform, 48000)  # warm-up (cuDNN autotuning, allocator)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(repeats):
                data = models.encode(piece, item.waveform, 48000)
            if cuda:
                torch.cuda.synchronize()
            elapsed = (time.perf_counter() - t0) / repeats
            assert data["target_latents"].shape[0] == int(seconds * 25)
            rows.append((seconds, elapsed, seconds / elapsed,
                         torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")))
    return rows


def bench_cpu(seconds_list):
    from acestep_lora.testing import make_tiny_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(os.path.join(tmp, "ckpt"))
        settings = PrepareSettings(checkpoint_dir=ckpt, device="cpu")
        prepare_dataset([PrepareItem(name="warm", caption="x", waveform=clip(2), sample_rate=48000)],
                        os.path.join(tmp, "warm"), settings)
        for seconds in seconds_list:
            item = PrepareItem(name=f"{seconds:.0f}s", caption="energetic rock", waveform=clip(seconds),
                               sample_rate=48000, lyrics=LYRICS, bpm=128, keyscale="E minor", language="en")
            t0 = time.perf_counter()
            prepare_dataset([item], os.path.join(tmp, f"t{seconds}"), settings)
            elapsed = time.perf_counter() - t0
            rows.append((seconds, elapsed, seconds / elapsed, float("nan")))
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    rows = bench_models([60.0, 240.0], args.repeats) if cuda else bench_cpu([60.0, 240.0])
    what = "full-size random weights, bf16" if cuda else "tiny checkpoint on CPU, whole prepare_dataset call"
    lines = [f"Prepare throughput ({what}); device {device_name()}", "",
             "| clip | seconds per clip | x real time | peak GiB |", "|---|---|---|---|"]
    lines += [f"| {s:.0f} s | {e:.2f} | {x:.0f}x | {'n/a' if p != p else f'{p:.2f}'} |" for s, e, x, p in rows]
    text = "\n".join(lines)
    print(text)
    if args.record:
        record(os.path.join(os.path.dirname(__file__), "RESULTS.md"), f"Prepare throughput, {what}",
               "python bench/prepare_speed.py --record", text)


if __name__ == "__main__":
    main()
