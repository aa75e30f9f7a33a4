"""The benchmark scripts keep working (their GPU paths are exercised here at tiny sizes on the CPU)."""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import common  # noqa: E402
import launch_count  # noqa: E402
import memory_model  # noqa: E402
import prepare_speed  # noqa: E402
import train_step  # noqa: E402

from acestep_lora.testing import tiny_dit_config  # noqa: E402


def test_train_step_row_runs(tmp_path):
    row = train_step.bench_row(str(tmp_path), tiny_dit_config(), 2, 50, "on", steps=2, warmup=1, rank=4)
    assert row["audio_s"] == 4 and row["ms_median"] > 0 and row["tflop"] > 0 and row["estimate_gib"] > 0
    padded = train_step.bench_row(str(tmp_path), tiny_dit_config(), 2, (50, 30), "off", steps=1, warmup=0, rank=4)
    assert padded["audio_s"] == 80 / 25
    text = train_step.table([row, {**row, "batch": 1, "frames": 1500, "checkpointing": "off"}])
    assert "not measured (no GPU); target >= 10x" in text  # a CPU row never claims a GPU figure


def test_flop_count_matches_the_official_order_of_magnitude():
    # The official baseline reports 5.13 TFLOP/step at 1 x 1500 (its own count); ours is within 10 %.
    assert abs(common.training_tflops(common.full_config(), 1, 1500, 769, 64,
                                      ["q_proj", "k_proj", "v_proj", "o_proj"]) / 5.13 - 1) < 0.1


def test_launch_count_models_cuda_dispatch():
    counter = launch_count.count_eager(frames=100, layers=2, rank=4)
    k = counter.kernels
    assert counter.syncs == 0  # no host syncs (.item()) inside a training step
    assert k["_flash_attention_forward"] == 4 and k["_flash_attention_backward"] == 4 * 5  # self + cross; GQA bwd
    assert k["_fused_rms_norm"] > 0 and k["native_dropout"] > 0 and "bernoulli_" not in k  # fused as on CUDA
    assert k["mm"] > 0 and "view" not in k and "_to_copy" in k


def test_kernel_model_of_multi_tensor_ops():
    params = [torch.zeros(10) for _ in range(100)]
    adamw = torch.ops.aten._fused_adamw_.default
    assert launch_count.kernels_launched(adamw, (params, params, params, params, params)) == 4  # 30 per launch
    assert launch_count.kernels_launched(torch.ops.aten.view.default, (params[0], [10])) == 0
    assert launch_count._multi_tensor_launches(([torch.zeros(65536 * 400)],)) == 2  # 320 chunks per launch


def test_caching_allocator_rules():
    mib = 2 ** 20
    alloc = memory_model.CachingAllocator()
    alloc.malloc(1, 100)  # rounded to 512 bytes, in a new 2 MiB small-pool segment
    assert alloc.allocated == 512 and alloc.reserved == 2 * mib
    alloc.malloc(2, 3 * mib)  # 1-10 MiB: a new 20 MiB segment, split
    assert alloc.allocated == 512 + 3 * mib and alloc.reserved == 22 * mib
    alloc.malloc(3, 11 * mib + 1)  # best fit: the free 17 MiB rest of that segment, split again
    assert alloc.reserved == 22 * mib and alloc.allocated == 512 + 14 * mib + 512
    alloc.malloc(4, 17 * mib)  # nothing cached fits: its own segment, rounded up to 2 MiB, not split
    assert alloc.reserved == 40 * mib and alloc.allocated == 512 + 32 * mib + 512
    alloc.free(2)
    alloc.free(3)  # coalesces with its neighbours: one free 20 MiB block again
    alloc.malloc(5, 20 * mib)
    assert alloc.reserved == 40 * mib and alloc.allocated == alloc.peak == 512 + 38 * mib


def test_gpu_session_script_runs_without_a_gpu(tmp_path):
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", os.path.join(root, "bench", "gpu_session.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    targets = (tmp_path / "targets.txt").read_text()
    assert ">= 10x the official audio-s/s at 1 x 1500" in targets and "not measured (no GPU)" in targets
    assert "| 1 x 1500 |" in (tmp_path / "train_step.txt").read_text()
    assert "skipped" in (tmp_path / "test_gpu.txt").read_text()


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
    assert run["held"] == 3 and run["total_pct"] > 0
    assert math.isclose(run["total_pct"], run["preview_pct"] + run["validation_pct"], rel_tol=1e-9)
    trainer = preview_overhead.make(str(tmp_path), tiny_ckpt, 50, False, preview_seconds=1.0)
    previews = preview_overhead.previews_mod.Previews(trainer.cfg, trainer)
    previews.conditioning = preview_overhead.random_conditioning(trainer, 2)
    files = previews.render(trainer, "epoch_1", 1, 0)
    assert len(files) == 2 and all(os.path.isfile(os.path.join(trainer.cfg.output_dir, f)) for f in files)
    trainer.cleanup()
