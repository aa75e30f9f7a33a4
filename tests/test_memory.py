"""The training-start memory estimate counts the model exactly and agrees with the fake-tensor memory model."""
import os
import sys

import pytest
import torch

from acestep_lora import lora
from acestep_lora.config import AceStepConfig
from acestep_lora.memory import (choose_gradient_checkpointing, decoder_parameters, estimate_peak_bytes,
                                 lora_parameters)
from acestep_lora.model import AceStepModel
from acestep_lora.testing import tiny_dit_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
GIB = 2 ** 30


@pytest.mark.parametrize("cfg", [AceStepConfig(), tiny_dit_config("turbo")], ids=["full", "tiny"])
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
    assert not use and "off" in reason
    use, reason = choose_gradient_checkpointing(int(need / 0.92) - GIB, cfg, 1, 6000, 769, 64, QKVO)
    assert use and "on" in reason and "out of memory" not in reason
    use, reason = choose_gradient_checkpointing(int(need_gc / 0.92) - GIB, cfg, 1, 6000, 769, 64, QKVO)
    assert use and "out of memory" in reason
