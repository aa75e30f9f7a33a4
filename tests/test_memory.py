"""The training-start memory estimate counts the model exactly and agrees with the fake-tensor memory model."""
import os
import sys

import pytest
import torch

from acestep_lora import lora
from acestep_lora.config import XL_FIELDS, AceStepConfig
from acestep_lora.memory import (checkpointing_for, choose_gradient_checkpointing, decoder_parameters,
                                 estimate_peak_bytes, lora_parameters, resident_bytes, usable_cuda_bytes)
from acestep_lora.model import AceStepModel
from acestep_lora.testing import tiny_dit_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
GIB = 2 ** 30


@pytest.mark.parametrize("cfg", [AceStepConfig(), AceStepConfig(**XL_FIELDS), tiny_dit_config("turbo")],
                         ids=["full", "xl", "tiny"])
def test_parameter_counts_equal_the_built_model(cfg):
    with torch.device("meta"):
        model = AceStepModel(cfg, components=("decoder", "null_condition_emb"))
    assert decoder_parameters(cfg) == sum(p.numel() for p in model.parameters())
    for targets in (QKVO, ["q_proj", "down_proj"], ["gate_proj", "up_proj", "v_proj"]):
        layers = lora.inject(model.decoder, targets, 8, 16, 0.0)
        assert lora_parameters(cfg, 8, targets) == sum(p.numel() for p in lora.lora_parameters(layers))
        for name, layer in layers.items():  # undo, for the next target set
            parent, leaf = name.rsplit(".", 1)
            setattr(model.decoder.get_submodule(parent), leaf, layer.base)
    assert lora_parameters(AceStepConfig(), 64, QKVO) == 44_040_192  # spec §4.1: 688,128 per rank


def test_estimate_agrees_with_the_fake_tensor_model_of_the_real_step():
    """One fake-tensor trace of the real Trainer step (bench/memory_model.py) at a mid-size config, padded batch."""
    import memory_model

    cfg = tiny_dit_config("turbo", hidden_size=256, intermediate_size=768, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64, num_hidden_layers=4, sliding_window=32)
    traced = memory_model.our_peak(2, [4000, 2500], tokens=200, rank=16, cfg=cfg)["peak"]
    estimate = estimate_peak_bytes(cfg, 2, 4000, 200, 16, QKVO, False, workspace_bytes=memory_model.CUBLAS_WORKSPACES)
    assert abs(estimate / traced - 1) < 0.03


def test_estimate_grows_with_length_and_checkpointing_saves_most_of_it():
    cfg = AceStepConfig()
    off = [estimate_peak_bytes(cfg, 1, f, 769, 64, QKVO, False) for f in (1500, 6000, 12000)]
    on = [estimate_peak_bytes(cfg, 1, f, 769, 64, QKVO, True) for f in (1500, 6000, 12000)]
    assert off[0] < off[1] < off[2] and on[0] < on[1] < on[2]
    assert all(b < a for a, b in zip(off, on))
    # the issue-11 targets for the full-size turbo model (the bench model gives 9.98 / 4.26 GiB)
    assert off[1] / GIB <= 12.0 and on[1] / GIB <= 4.3


def test_checkpointing_policy_follows_free_memory():
    cfg = AceStepConfig()
    need = estimate_peak_bytes(cfg, 1, 6000, 769, 64, QKVO, False)
    need_gc = estimate_peak_bytes(cfg, 1, 6000, 769, 64, QKVO, True)
    use, reason = choose_gradient_checkpointing(80 * GIB, cfg, 1, 6000, 769, 64, QKVO)
    assert not use and reason.startswith("gradient checkpointing off (auto)")
    use, reason = choose_gradient_checkpointing(int(need / 0.92) - GIB, cfg, 1, 6000, 769, 64, QKVO)
    assert use and reason.startswith("gradient checkpointing on (auto)") and "out of memory" not in reason
    use, reason = choose_gradient_checkpointing(int(need_gc / 0.92) - GIB, cfg, 1, 6000, 769, 64, QKVO)
    assert use and "out of memory" in reason


def fake_card(monkeypatch, free_bytes, reserved=0, allocated=0):
    """torch.cuda's memory queries as a card with ``free_bytes`` free would answer them (on a CPU-only machine)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_bytes, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)


def test_checkpointing_option_on_each_device(monkeypatch):
    cfg, cuda = AceStepConfig(), torch.device("cuda")
    kw = dict(dtype=torch.bfloat16, dropout=0.1, counted_bytes=0)
    for mode in ("on", "off"):
        assert checkpointing_for(mode, cuda, cfg, 1, 6000, 769, 64, QKVO, **kw) == (
            mode == "on", f"gradient checkpointing {mode} (as set)")
    assert checkpointing_for("auto", torch.device("cpu"), cfg, 1, 6000, 769, 64, QKVO, **kw) == (
        False, "gradient checkpointing off (auto: cpu)")
    assert checkpointing_for("auto", torch.device("mps"), cfg, 1, 6000, 769, 64, QKVO, **kw)[0] is True
    need = estimate_peak_bytes(cfg, 1, 6000, 769, 64, QKVO, False)  # 9.9 GiB
    fake_card(monkeypatch, 8 * GIB)  # a 12 GB card with 4 GB taken (desktop, other programs)
    use, reason = checkpointing_for("auto", cuda, cfg, 1, 6000, 769, 64, QKVO, **kw)
    assert use and reason == (f"gradient checkpointing on (auto): without it the step needs about {need / GIB:.1f} "
                              "GiB, with it 4.3 GiB; 8.0 GiB free")
    fake_card(monkeypatch, 30 * GIB)
    assert checkpointing_for("auto", cuda, cfg, 1, 6000, 769, 64, QKVO, **kw) == (
        False, f"gradient checkpointing off (auto): the step needs about {need / GIB:.1f} GiB, 30.0 GiB free")
    # the estimate counts the weights already loaded (counted_bytes) and reuses the allocator's idle blocks
    fake_card(monkeypatch, 6 * GIB, reserved=7 * GIB, allocated=5 * GIB)
    assert usable_cuda_bytes(cuda, 4 * GIB) == 12 * GIB


def test_trainer_decides_checkpointing_from_the_cards_free_memory(tiny_ckpt, tmp_path, monkeypatch):
    """The trainer's own numbers (the longest sample, its condition, the weights and data it holds) against a small
    and a large card: checkpointing on and off, the reason in the run's header (the first line it logs)."""
    from acestep_lora.compile import plan_step
    from acestep_lora.prepare import PrepareSettings, prepare_dataset
    from acestep_lora.train import TrainConfig, Trainer

    from test_prepare import item

    tensors = str(tmp_path / "t")
    prepare_dataset([item("a", 1.0), item("b", 2.0)], tensors, PrepareSettings(tiny_ckpt, device="cpu"))
    trainer = Trainer(TrainConfig(tensor_dir=tensors, checkpoint_dir=tiny_ckpt, output_dir=str(tmp_path / "o"),
                                  lora_rank=8, lora_alpha=16, device="cpu", compile="off"))
    trainer.setup()
    assert trainer.net.gradient_checkpointing is False and "gradient checkpointing off (auto: cpu)" in trainer.header()
    monkeypatch.setattr(trainer, "device", torch.device("cuda"))  # only the decision: nothing runs on it
    tokens = max(s["encoder_hidden_states"].shape[0] for s in trainer.data.samples)
    args = (trainer.model_cfg, 1, 50, tokens, 8, trainer.targets)  # 2 s = 50 latent frames
    kw = dict(dtype=torch.float32, dropout=0.1, dataset_bytes=trainer.data.bytes())
    need, need_gc = estimate_peak_bytes(*args, False, **kw), estimate_peak_bytes(*args, True, **kw)
    held = resident_bytes(trainer.net) + trainer.data.bytes()

    def replan():
        trainer.step_decoder, trainer.step_notes = plan_step(trainer.net, trainer.cfg, trainer.model_cfg,
                                                             trainer.targets, trainer.data, trainer.device,
                                                             trainer.dtype)
    assert need_gc < need
    # usable = free + what it holds: the step fits in 92 % of it only with checkpointing
    fake_card(monkeypatch, int((need + need_gc) / 2 / 0.92) - held, reserved=held, allocated=held)
    replan()
    assert trainer.net.gradient_checkpointing is True
    header = trainer.header()
    assert "gradient checkpointing on (auto): without it the step needs about" in header
    assert "out of memory" not in header
    fake_card(monkeypatch, 24 * GIB, reserved=held, allocated=held)
    replan()
    assert trainer.net.gradient_checkpointing is False
    assert "gradient checkpointing off (auto): the step needs about 0.1 GiB, 24.0 GiB free" in trainer.header()


def test_auto_checkpointing_takes_the_models_sizes(monkeypatch):
    """The same 240 s sample on the same card (16 GiB usable): the 2B step fits without checkpointing (9.9 GiB),
    the XL step does not (22 GiB; 10 GiB with it) — the estimate reads the variant's widths and depth."""
    fake_card(monkeypatch, 16 * GIB)
    kw = dict(dtype=torch.bfloat16, dropout=0.1, counted_bytes=0)
    cuda = torch.device("cuda")
    use_2b, _ = checkpointing_for("auto", cuda, AceStepConfig(), 1, 6000, 769, 64, QKVO, **kw)
    use_xl, reason = checkpointing_for("auto", cuda, AceStepConfig(**XL_FIELDS), 1, 6000, 769, 64, QKVO, **kw)
    assert (use_2b, use_xl) == (False, True) and "with it 10.0 GiB" in reason and "out of memory" not in reason
