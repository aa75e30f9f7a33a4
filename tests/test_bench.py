"""The benchmark scripts keep working (their GPU paths are exercised here at tiny sizes on the CPU)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import common  # noqa: E402
import op_count  # noqa: E402
import prepare_speed  # noqa: E402
import train_step  # noqa: E402

from acestep_lora.testing import tiny_dit_config  # noqa: E402


def test_train_step_row_runs(tmp_path):
    row = train_step.bench_row(str(tmp_path), tiny_dit_config(), 2, 50, "on", steps=2, warmup=1, rank=4)
    assert row["audio_s"] == 4 and row["ms_median"] > 0 and row["tflop"] > 0


def test_flop_count_matches_the_official_order_of_magnitude():
    # The official baseline reports 5.13 TFLOP/step at 1 x 1500 (its own count); ours is within 10 %.
    assert abs(common.training_tflops(common.full_config(), 1, 1500, 769, 64,
                                      ["q_proj", "k_proj", "v_proj", "o_proj"]) / 5.13 - 1) < 0.1


def test_op_count_counts_a_step():
    total, kernels, top = op_count.count_step(frames=100, layers=2, rank=4)
    assert total > kernels > 0 and top["mm"] > 0
    assert top["_local_scalar_dense"] == 0  # no host syncs (.item()) inside a training step


def test_prepare_bench_model_path_on_tiny_sizes():
    vae = dict(prepare_speed.OFFICIAL_VAE, encoder_channels=4, decoder_channels=4)
    text = dict(vocab_size=800, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16)
    rows = prepare_speed.bench_models([2.0], 1, device="cpu", dtype=torch.float32, vae_cfg=vae, text_cfg=text,
                                      dit_cfg=tiny_dit_config())
    assert rows[0][0] == 2.0 and rows[0][2] > 0


def test_preview_overhead_units_and_the_default_run(tiny_ckpt, tmp_path):
    """bench/preview_overhead.py on the tiny checkpoint with 1 s clips (its CUDA-only part: the random
    conditioning that replaces the text encoder, rendered here on the CPU)."""
    import preview_overhead

    u = preview_overhead.units(str(tmp_path), tiny_ckpt, 50, cuda=False, preview_seconds=1.0)
    assert all(u[k] > 0 for k in ("step", "val", "preview", "start"))
    run = preview_overhead.default_run(u, 30)
    assert run["held"] == 3 and run["total_pct"] == run["preview_pct"] + run["validation_pct"] > 0
    trainer = preview_overhead.make(str(tmp_path), tiny_ckpt, 50, False, preview_seconds=1.0)
    previews = preview_overhead.previews_mod.Previews(trainer.cfg, trainer)
    previews.conditioning = preview_overhead.random_conditioning(trainer, 2)
    files = previews.render(trainer, "epoch_1", 1, 0)
    assert len(files) == 2 and all(os.path.isfile(os.path.join(trainer.cfg.output_dir, f)) for f in files)
    trainer.cleanup()
