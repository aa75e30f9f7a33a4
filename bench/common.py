"""Shared benchmark helpers: random-weight models, synthetic tensor folders, analytic FLOPs, device facts.

Benchmarks measure the real engine code (acestep_lora.train.Trainer's step) on random weights, so they need no
download: full-size config on a CUDA GPU, the tiny config on a CPU (which says so in its output).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from acestep_lora.config import AceStepConfig  # noqa: E402
from acestep_lora.fileio import atomic_write_json  # noqa: E402
from acestep_lora.manifest import Manifest, SampleInfo  # noqa: E402
from acestep_lora.model import AceStepModel  # noqa: E402
from acestep_lora.testing import init_weights_, tiny_dit_config  # noqa: E402
from acestep_lora.train import Trainer  # noqa: E402

H100_BF16_PEAK_TFLOPS = 989.0  # dense bf16, SXM (the figure the official baseline's MFU column uses)
FRAMES_PER_SECOND = 25
ENCODER_LENGTH = 769  # the official preprocessing's padded condition length, for comparable rows


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def peak_tflops(device: torch.device) -> float:
    if device.type == "cuda" and "H100" in torch.cuda.get_device_name(device):
        return H100_BF16_PEAK_TFLOPS
    if device.type == "cuda" and "H200" in torch.cuda.get_device_name(device):
        return H100_BF16_PEAK_TFLOPS
    return float("nan")


def write_config(checkpoint_dir: str, cfg: AceStepConfig, config_path: str = "acestep-v15-turbo") -> None:
    folder = os.path.join(checkpoint_dir, config_path)
    os.makedirs(folder, exist_ok=True)
    atomic_write_json(os.path.join(folder, "config.json"), cfg.to_dict())


def write_tensor_dir(path: str, batch: int, frames: int, tokens: int, width: int,
                     config_path: str = "acestep-v15-turbo") -> str:
    """``batch`` synthetic samples of identical shape (so batches carry no padding), as Prepare writes them."""
    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    info = []
    for i in range(batch):
        data = {"target_latents": torch.randn(frames, 64, generator=g),
                "attention_mask": torch.ones(frames),
                "encoder_hidden_states": torch.randn(tokens, width, generator=g),
                "encoder_attention_mask": torch.ones(tokens, dtype=torch.bool),
                "context_latents": torch.cat([torch.randn(frames, 64, generator=g), torch.ones(frames, 64)], -1),
                "metadata": {"duration": frames / FRAMES_PER_SECOND, "frames": frames}}
        name = f"s{i}.pt"
        torch.save(data, os.path.join(path, name))
        seconds = frames / FRAMES_PER_SECOND
        info.append(SampleInfo(file=name, name=f"synthetic_{i}", cache_key=f"synthetic-{i}-{frames}-{tokens}",
                               duration_used=seconds, duration_total=seconds, frames=frames, caption="synthetic"))
    Manifest(info, checkpoint={"config_path": config_path}, dtype="float32").save(path)
    return path


def random_model(trainer: Trainer) -> AceStepModel:
    """What the real Trainer trains (decoder + null condition), randomly initialised instead of read from disk."""
    with torch.device(trainer.device):
        model = AceStepModel(trainer.model_cfg, components=("decoder", "null_condition_emb")).to(trainer.dtype)
    if trainer.device.type == "cpu":
        init_weights_(model, seed=0)
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
    return model.requires_grad_(False)


def training_tflops(cfg: AceStepConfig, batch: int, frames: int, tokens: int, rank: int, targets: list[str],
                    checkpointing: bool = False) -> float:
    """Analytic FLOPs of one training step (forward + backward), in TFLOP.

    Frozen base matmuls: forward + input-gradient = 2x their forward FLOPs (no weight gradient is needed).
    LoRA matmuls and attention score/value products: forward + both gradients = 3x. Gradient checkpointing
    recomputes the forward once more. Norms, activations and embeddings are ignored (<1 %).
    """
    h, hq, hkv, inter = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, \
        cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    length = -(-frames // cfg.patch_size)  # tokens after patching
    frozen = attn = lora = 0.0
    proj_shapes = {"self_attn.q_proj": (h, hq), "self_attn.k_proj": (h, hkv), "self_attn.v_proj": (h, hkv),
                   "self_attn.o_proj": (hq, h), "cross_attn.q_proj": (h, hq), "cross_attn.k_proj": (h, hkv),
                   "cross_attn.v_proj": (h, hkv), "cross_attn.o_proj": (hq, h), "mlp.gate_proj": (h, inter),
                   "mlp.up_proj": (h, inter), "mlp.down_proj": (inter, h)}
    for i in range(cfg.num_hidden_layers):
        window = cfg.window_for_layer(i)
        keys = length if window is None else min(length, 2 * window + 1)
        for name, (fan_in, fan_out) in proj_shapes.items():
            rows = tokens if name in ("cross_attn.k_proj", "cross_attn.v_proj") else length
            frozen += 2 * rows * fan_in * fan_out
            if name.split(".")[-1] in targets:
                lora += 2 * rows * rank * (fan_in + fan_out)
        attn += 4 * length * keys * hq + 4 * length * tokens * hq
    frozen += 2 * length * cfg.in_channels * cfg.patch_size * h + 2 * tokens * h * h + 2 * length * h * 64 * 2
    forward = frozen + attn + lora
    total = 2 * frozen + 3 * attn + 3 * lora + (forward if checkpointing else 0.0)
    return batch * total / 1e12


def make_trainer(workdir: str, cfg: AceStepConfig, batch: int, frames: int, tokens: int, rank: int, *,
                 checkpointing: str = "off", device: str = "auto", dtype=None,
                 trainer_class=None) -> Trainer:
    from acestep_lora.train import TrainConfig

    ckpt = os.path.join(workdir, "ckpt")
    write_config(ckpt, cfg)
    tensors = write_tensor_dir(os.path.join(workdir, f"t_{batch}_{frames}"), batch, frames, tokens,
                               cfg.encoder_hidden_size or cfg.hidden_size)
    tc = TrainConfig(tensor_dir=tensors, checkpoint_dir=ckpt, output_dir=os.path.join(workdir, f"run_{time.time_ns()}"),
                     lora_rank=rank, lora_alpha=2 * rank, lora_dropout=0.1, batch_size=batch, train_epochs=10 ** 6,
                     save_every_n_epochs=0, gradient_checkpointing=checkpointing, device=device)
    trainer = (trainer_class or Trainer)(tc)
    if dtype is not None:  # e.g. bf16 autocast on a CPU, to mirror the CUDA code path
        trainer.dtype = dtype
    trainer.setup(model=random_model(trainer))
    os.makedirs(tc.output_dir, exist_ok=True)
    return trainer


def train_step(trainer: Trainer) -> None:
    """One optimizer step exactly as the engine runs it (sample noise/t, forward, backward, clip, AdamW)."""
    from acestep_lora.data import collate

    trainer.step(collate(trainer.data.samples))


def full_config() -> AceStepConfig:
    return AceStepConfig()


def cpu_config() -> AceStepConfig:
    return tiny_dit_config("turbo")


def record(results_path: str, title: str, command: str, table: str) -> None:
    """Append a dated section to bench/RESULTS.md."""
    stamp = time.strftime("%Y-%m-%d")
    with open(results_path, "a", encoding="utf-8") as f:
        f.write(f"\n### {title} — {stamp}\n\nDevice: {device_name()}; torch {torch.__version__}\n\n"
                f"Command: `{command}`\n\n{table}\n")


def dump_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
