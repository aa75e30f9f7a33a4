"""CUDA-only checks (skipped without a GPU; bench/gpu_session.sh runs them in sessions that have one)."""
import pytest
import torch
import torch.nn.functional as F

from acestep_lora import load_dit, lora
from acestep_lora.data import collate
from acestep_lora.prepare import PrepareSettings, prepare_dataset
from acestep_lora.train import TrainConfig, Trainer, train_lora

from test_prepare import item

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_tensors(tiny_ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cuda_tensors"))
    prepare_dataset([item("a", 2.0), item("b", 3.0)], out, PrepareSettings(tiny_ckpt, device="cuda"))
    return out


def make(tiny_ckpt, tensors, tmp_path, **kw):
    cfg = dict(tensor_dir=tensors, checkpoint_dir=tiny_ckpt, output_dir=str(tmp_path), lora_rank=8, lora_alpha=16,
               lora_dropout=0.0, device="cuda", log_every=1000)
    cfg.update(kw)
    trainer = Trainer(TrainConfig(**cfg))
    trainer.setup()
    return trainer


def test_prepared_tensors_are_bf16(cuda_tensors):
    import json
    import os
    manifest = json.load(open(os.path.join(cuda_tensors, "manifest.json")))
    data = torch.load(os.path.join(cuda_tensors, manifest["samples"][0]), weights_only=True)
    assert data["target_latents"].dtype == torch.bfloat16 and data["encoder_attention_mask"].dtype == torch.bool


def test_no_host_sync_inside_training_steps(tiny_ckpt, cuda_tensors, tmp_path):
    trainer = make(tiny_ckpt, cuda_tensors, tmp_path)
    batch = collate([trainer.data.samples[0]])
    for _ in range(2):  # warm-up (lazy optimizer state, cuBLAS handles)
        trainer.step(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(trainer.metrics.pending_steps) == 5  # read back only at the next flush


def test_bf16_step_matches_fp32_reference(tiny_ckpt, cuda_tensors, tmp_path):
    """Loss and LoRA gradients of the bf16-autocast step agree with an fp32 computation of the same step."""
    trainer = make(tiny_ckpt, cuda_tensors, tmp_path)
    with torch.no_grad():
        for layer in trainer.lora_layers.values():
            layer.lora_B.normal_(0, 0.05)
    batch = collate([trainer.data.samples[0]])
    state = trainer.noise_gen.get_state()
    loss = trainer.loss(batch)
    loss.backward()

    reference = load_dit(tiny_ckpt, device="cuda").decoder
    layers = lora.inject(reference, trainer.targets, 8, 16, 0.0)
    lora.load_peft_state_dict(layers, lora.peft_state_dict(trainer.lora_layers))
    g = torch.Generator(device="cuda")
    g.set_state(state)
    x0 = batch.target_latents.float()
    noise = torch.randn(x0.shape, generator=g, device="cuda", dtype=torch.bfloat16).float()
    t = trainer.objective.turbo_table[torch.randint(0, 8, (1,), generator=g, device="cuda")].float()
    xt = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
    pred = reference(hidden_states=xt, timestep=t, timestep_r=t, encoder_hidden_states=batch.encoder_hidden_states
                     .float(), context_latents=batch.context_latents.float())[0]
    ref_loss = F.mse_loss(pred, noise - x0)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 2e-2
    for name, layer in trainer.lora_layers.items():
        ref = layers[name].lora_B.grad
        rel = ((layer.lora_B.grad - ref).norm() / ref.norm()).item()
        assert rel < 5e-2, (name, rel)


def test_training_runs_on_cuda(tiny_ckpt, cuda_tensors, tmp_path):
    result = train_lora(TrainConfig(tensor_dir=cuda_tensors, checkpoint_dir=tiny_ckpt, output_dir=str(tmp_path),
                                    lora_rank=8, lora_alpha=16, train_epochs=3, save_every_n_epochs=2, batch_size=2,
                                    device="cuda"))
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(p[1])) for p in result.history)


# ---------------------------------------------------------------------------------------------------------------
# Attention on fused kernels (acestep_lora/attention.py), the compiled decoder, the memory estimate

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from acestep_lora import attention  # noqa: E402
from acestep_lora.attention import AttentionPlan  # noqa: E402

from test_attention import CASES, emulated_flash, reference  # noqa: E402

NO_MATH = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
MATH_OPS = {"_scaled_dot_product_attention_math", "_softmax", "softmax", "_safe_softmax"}


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def cuda_backends():
    return [b for b in ("flash", "efficient") if attention._cuda_kernel_runs(b, 0, torch.bfloat16)]


@pytest.mark.parametrize("case", list(CASES))
def test_fused_attention_kernels_match_the_reference(case):
    """Every CUDA backend, every layer type, padded or not: bf16 output and gradients vs an fp64 reference."""
    lq, lk, window, key_lengths, is_self = CASES[case]
    g = torch.Generator(device="cuda").manual_seed(0)
    b, hq, hkv, d = 3, 16, 8, 128
    scale = 8  # longer sequences than the CPU test: several flash blocks per sequence
    lq, lk = lq * scale, lk * scale
    window = None if window is None else window * scale
    key_lengths = None if key_lengths is None else torch.tensor([n * scale for n in key_lengths], dtype=torch.int32)
    query_lengths = key_lengths if is_self else None
    q = torch.randn(b, lq, hq, d, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(b, lk, hkv, d, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(b, lk, hkv, d, device="cuda", generator=g, dtype=torch.bfloat16)
    grad = torch.randn(b, lq, hq, d, device="cuda", generator=g, dtype=torch.bfloat16)
    keep = torch.ones(b, lq, 1, 1, device="cuda") if query_lengths is None else \
        (torch.arange(lq, device="cuda")[None, :] < query_lengths.cuda()[:, None]).float()[..., None, None]
    ref_inputs = [t.double().cpu().requires_grad_() for t in (q, k, v)]
    expected = reference(*ref_inputs, window, key_lengths, query_lengths)
    (expected * grad.double().cpu() * keep.double().cpu()).sum().backward()
    assert cuda_backends(), "no fused attention kernel runs on this GPU"
    for backend in cuda_backends():
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        plan = AttentionPlan(backend, b, lq, lk, dtype=torch.bfloat16, device="cuda",
                             key_lengths=None if key_lengths is None else key_lengths.cuda(),
                             query_lengths=None if query_lengths is None else query_lengths.cuda(), windows=[window])
        log = OpLog()
        with sdpa_kernel(NO_MATH), log:
            out = plan(*inputs, window)
            (out.float() * grad.float() * keep).sum().backward()
        assert not MATH_OPS & set(log.ops), (backend, sorted(set(log.ops)))
        valid = keep.cpu()[..., 0, 0].bool()
        err = (out.detach().double().cpu() - expected.detach())[valid].norm() / expected.detach()[valid].norm()
        assert err < 2e-2, (backend, err)
        for mine, ref in zip(inputs, ref_inputs):
            rel = ((mine.grad.double().cpu() - ref.grad).norm() / ref.grad.norm()).item()
            assert rel < 3e-2, (backend, rel)
        if backend == "flash":  # the CPU tests' emulator keeps the kernel's contract
            emulated = AttentionPlan("flash", b, lq, lk, dtype=torch.float32, device="cpu",
                                     key_lengths=key_lengths, query_lengths=query_lengths)
            attention_kernel = attention.flash_kernel
            try:
                attention.flash_kernel = emulated_flash
                emu = emulated(q.float().cpu(), k.float().cpu(), v.float().cpu(), window)
            finally:
                attention.flash_kernel = attention_kernel
            assert ((emu[valid] - out.float().cpu()[valid]).norm() / emu[valid].norm()) < 2e-2


@pytest.mark.parametrize("padded", [False, True])
def test_decoder_never_runs_math_attention(tiny_ckpt, padded):
    """Forward and backward of the LoRA decoder under bf16 autocast with the MATH SDPA backend disabled: no error,
    no math attention op, two fused attention calls per layer (self, cross) on each backend the GPU runs."""
    decoder = load_dit(tiny_ckpt, device="cuda", dtype=torch.bfloat16).decoder
    layers = lora.inject(decoder, ["q_proj", "k_proj", "v_proj", "o_proj"], 8, 16, 0.1)
    decoder.train()
    g = torch.Generator(device="cuda").manual_seed(0)
    frames, tokens = (300, 40)
    kw = dict(hidden_states=torch.randn(2, frames, 64, device="cuda", generator=g),
              timestep=torch.tensor([0.3, 0.9], device="cuda"), timestep_r=torch.tensor([0.3, 0.9], device="cuda"),
              encoder_hidden_states=torch.randn(2, tokens, decoder.condition_embedder.in_features, device="cuda",
                                                generator=g),
              context_latents=torch.randn(2, frames, 128, device="cuda", generator=g))
    if padded:
        kw.update(mask_padding=True, frame_lengths=torch.tensor([300, 170], device="cuda"),
                  encoder_lengths=torch.tensor([40, 23], device="cuda"))
    for backend in cuda_backends():
        decoder.attention_backend = backend
        log = OpLog()
        with sdpa_kernel(NO_MATH), log, torch.autocast("cuda", dtype=torch.bfloat16):
            out = decoder(**kw)[0]
        with sdpa_kernel(NO_MATH), log:
            out.float().square().mean().backward()
        assert torch.isfinite(out).all()
        assert not MATH_OPS & set(log.ops), (backend, sorted(set(log.ops)))
        fused = {"flash": "_flash_attention_forward", "efficient": "_scaled_dot_product_efficient_attention"}
        assert log.ops.count(fused[backend]) == 2 * len(decoder.layers)
        assert all(layer.lora_A.grad is not None for layer in layers.values())
        for layer in layers.values():
            layer.lora_A.grad = layer.lora_B.grad = None


def test_choose_backend_on_this_gpu_avoids_math():
    backend = attention.choose_backend(torch.device("cuda"), torch.bfloat16)
    capability = torch.cuda.get_device_capability()
    assert backend == ("flash" if capability >= (8, 0) else "efficient")
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        assert attention.choose_backend(torch.device("cuda"), torch.bfloat16) == "efficient"


def test_compiled_decoder_with_cuda_graphs_equals_eager(tiny_ckpt):
    from acestep_lora.compile import CompiledDecoder

    decoder = load_dit(tiny_ckpt, device="cuda", dtype=torch.bfloat16).decoder
    layers = lora.inject(decoder, ["q_proj", "k_proj", "v_proj", "o_proj"], 8, 16, 0.0)
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    g = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 230, 64, device="cuda", generator=g),
              timestep=torch.tensor([0.6], device="cuda"), timestep_r=torch.tensor([0.6], device="cuda"),
              encoder_hidden_states=torch.randn(1, 40, decoder.condition_embedder.in_features, device="cuda",
                                                generator=g),
              context_latents=torch.randn(1, 230, 128, device="cuda", generator=g))
    torch._dynamo.reset()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = CompiledDecoder(decoder, cuda_graphs=True, dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = decoder(**kw)[0].float()
        for _ in range(3):  # record, then replay
            out = compiled(**kw)[0].float()
            loss = out.square().mean()
            loss.backward()
    assert ((out - eager).norm() / eager.norm()).item() < 2e-2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 1  # replayed, not recompiled


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["compiled", "cuda_graphs"])
def test_trainer_compiles_its_step_on_cuda_and_trains_what_eager_trains(tiny_ckpt, cuda_tensors, tmp_path,
                                                                        cuda_graphs):
    """compile = auto on CUDA: the trainer's step is compiled (Triton kernels; with cuda_graphs replayed), nothing
    falls back, and three epochs give the eager losses and LoRA weights within bf16 tolerance."""
    from acestep_lora.compile import CompiledDecoder

    runs = {}
    torch._dynamo.reset()
    for mode in ("auto", "off"):
        trainer = make(tiny_ckpt, cuda_tensors, tmp_path / mode, compile=mode, cuda_graphs=cuda_graphs,
                       train_epochs=3, save_every_n_epochs=0, batch_size=2)
        result = trainer.train()
        if mode == "auto":
            assert isinstance(trainer.step_decoder, CompiledDecoder) and trainer.step_decoder.failed is None
            assert "step compiled (torch.compile" in trainer.header()
        runs[mode] = ([loss for _, loss, *_ in result.history],
                      torch.cat([p.detach().flatten() for p in trainer.params]))
    (losses_c, weights_c), (losses_e, weights_e) = runs["auto"], runs["off"]
    for a, b in zip(losses_c, losses_e):
        assert abs(a - b) <= 3e-2 * abs(b), (losses_c, losses_e)
    assert ((weights_c - weights_e).norm() / weights_e.norm()).item() < 5e-2


def test_memory_estimate_matches_a_real_step(tiny_ckpt, tmp_path):
    """acestep_lora.memory's estimate against torch.cuda.max_memory_allocated of the real step, mid-size config."""
    import sys
    import os
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from common import make_trainer, train_step

    from acestep_lora.memory import estimate_peak_bytes
    from acestep_lora.testing import tiny_dit_config

    cfg = tiny_dit_config("turbo", hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                          num_key_value_heads=4, head_dim=64, num_hidden_layers=8, sliding_window=64)
    torch.cuda.empty_cache()
    trainer = make_trainer(str(tmp_path), cfg, 2, 6000, 300, 16, device="cuda")
    train_step(trainer)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    train_step(trainer)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    estimate = estimate_peak_bytes(cfg, 2, 6000, 300, 16, trainer.targets, False,
                                   dataset_bytes=trainer.data.bytes())
    assert abs(estimate / measured - 1) < 0.1, (estimate / 2 ** 20, measured / 2 ** 20)
