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
