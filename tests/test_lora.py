"""Our LoRA layers compute what PEFT's compute (outputs and gradients), and the training step matches a plain
fp32 reference step built on PEFT."""
import math

import pytest
import torch
import torch.nn.functional as F

from acestep_lora import load_dit, lora
from acestep_lora.data import collate
from acestep_lora.prepare import PrepareSettings, prepare_dataset
from acestep_lora.train import TrainConfig, Trainer

from test_prepare import item


def peft_linear(base, rank, alpha, dropout):
    from peft import LoraConfig, get_peft_model

    holder = torch.nn.Sequential(base)
    model = get_peft_model(holder, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=["0"]))
    return model, model.base_model.model[0]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_linear_matches_peft(dropout):
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 32, bias=False)
    ours = lora.LoRALinear(torch.nn.Linear(48, 32, bias=False), rank=4, alpha=8, dropout=dropout)
    ours.base.weight.data.copy_(base.weight)
    _, theirs = peft_linear(base, 4, 8, dropout)
    with torch.no_grad():
        ours.lora_A.normal_()
        ours.lora_B.normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(2, 5, 48)
    torch.manual_seed(1)
    y_ours = ours(x)
    torch.manual_seed(1)
    y_theirs = theirs(x)
    assert torch.allclose(y_ours, y_theirs, atol=1e-6)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    assert torch.allclose(ours.lora_A.grad, theirs.lora_A["default"].weight.grad, atol=1e-5)
    assert torch.allclose(ours.lora_B.grad, theirs.lora_B["default"].weight.grad, atol=1e-5)


def test_init_follows_peft_scheme():
    """A: Kaiming-uniform(a=sqrt(5)) like PEFT (bound 1/sqrt(fan_in)), B: zeros, both fp32."""
    torch.manual_seed(0)
    layer = lora.LoRALinear(torch.nn.Linear(64, 16), rank=8, alpha=16, dropout=0.0)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > 0.3 * bound
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.lora_A.dtype == torch.float32


def test_inject_rejects_no_match():
    with pytest.raises(ValueError, match="no Linear layer matched"):
        lora.inject(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["q_proj"], 4, 4, 0.0)


def test_training_step_matches_fp32_peft_reference(tiny_ckpt, tmp_path):
    """Loss and every LoRA gradient of our step equal a straightforward PEFT + F.mse_loss step on the same inputs."""
    from peft import LoraConfig, get_peft_model

    tensors = str(tmp_path / "t")
    prepare_dataset([item("a", 1.0)], tensors, PrepareSettings(tiny_ckpt, device="cpu"))
    trainer = Trainer(TrainConfig(tensor_dir=tensors, checkpoint_dir=tiny_ckpt, output_dir=str(tmp_path / "o"),
                                  lora_rank=4, lora_alpha=8, lora_dropout=0.0, device="cpu"))
    trainer.setup()
    with torch.no_grad():
        for layer in trainer.lora_layers.values():
            layer.lora_B.normal_(0, 0.05)  # a non-trivial adapter
    batch = collate([trainer.data.samples[0]])
    gen_state = trainer.noise_gen.get_state()
    loss = trainer.loss(batch)
    loss.backward()

    # Reference: the official recipe written plainly, with PEFT, in fp32.
    g = torch.Generator().manual_seed(0)
    g.set_state(gen_state)
    x0 = batch.target_latents
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0.0]) + trainer.objective.turbo_table[torch.randint(0, 8, (1,), generator=g)]
    xt = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
    reference = get_peft_model(load_dit(tiny_ckpt).decoder, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                       target_modules=trainer.targets))
    state = lora.peft_state_dict(trainer.lora_layers)
    from peft import set_peft_model_state_dict
    set_peft_model_state_dict(reference, state)
    pred = reference.base_model.model(hidden_states=xt, timestep=t, timestep_r=t,
                                      encoder_hidden_states=batch.encoder_hidden_states,
                                      context_latents=batch.context_latents)[0]
    ref_loss = F.mse_loss(pred, noise - x0)
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for name, layer in trainer.lora_layers.items():
        a = ref_grads[f"base_model.model.{name}.lora_A.default.weight"]
        b = ref_grads[f"base_model.model.{name}.lora_B.default.weight"]
        assert torch.allclose(layer.lora_A.grad, a, rtol=1e-4, atol=1e-7)
        assert torch.allclose(layer.lora_B.grad, b, rtol=1e-4, atol=1e-7)


# -- reading LoRA files to listen to them (lora_io.read_lora / merge_lora_) -------------------------------------

def small_decoder():
    from acestep_lora.model import DiT
    from acestep_lora.testing import tiny_dit_config

    torch.manual_seed(0)
    return DiT(tiny_dit_config()).eval()


def trained_layers(decoder, rank=4, alpha=8.0):
    layers = lora.inject(decoder, ["q_proj", "v_proj"], rank, alpha, 0.0)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.2)
    return layers


def decoder_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 12, 64, generator=g), timestep=torch.tensor([0.6]),
                timestep_r=torch.tensor([0.6]), encoder_hidden_states=torch.randn(1, 5, 64, generator=g),
                context_latents=torch.randn(1, 12, 128, generator=g))


@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_merged_lora_computes_what_the_lora_layers_compute(tmp_path, scale):
    from acestep_lora.lora_io import merge_lora_, read_lora

    wrapped = small_decoder()
    layers = trained_layers(wrapped)
    for layer in layers.values():
        layer.scaling *= scale  # the LoRA layers at strength `scale`
    lora.save_peft_adapter(str(tmp_path / "adapter"), layers, ["q_proj", "v_proj"], 4, 8.0, 0.0)
    merged = small_decoder()
    weights = read_lora(str(tmp_path / "adapter"))
    assert weights.kind == "PEFT adapter folder" and weights.ranks == {4} and len(weights.pairs) == 2 * 2 * 2
    merge_lora_(merged, weights, scale)
    with torch.no_grad():
        assert torch.allclose(merged(**decoder_inputs())[0], wrapped(**decoder_inputs())[0], atol=1e-5)


def test_read_lora_accepts_every_layout(tmp_path):
    from acestep_lora.lora_io import read_lora, save_comfy_lora

    layers = trained_layers(small_decoder())
    adapter = tmp_path / "run" / "checkpoints" / "epoch_2" / "adapter"
    lora.save_peft_adapter(str(adapter), layers, ["q_proj", "v_proj"], 4, 8.0, 0.0)
    save_comfy_lora(str(tmp_path / "c.safetensors"), lora.pairs(layers), 8.0, {}, torch.float32)
    reference = read_lora(str(adapter))
    for path in (adapter.parent, adapter / "adapter_model.safetensors", tmp_path / "c.safetensors"):
        got = read_lora(str(path))
        assert set(got.pairs) == set(reference.pairs) and got.factors == reference.factors == {
            m: 2.0 for m in reference.pairs}
        assert all(torch.equal(got.pairs[m]["B"], reference.pairs[m]["B"]) for m in got.pairs)
    with pytest.raises(FileNotFoundError, match="final"):  # a run folder: points at final/
        (tmp_path / "run" / "final").mkdir()
        read_lora(str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_lora(str(tmp_path / "missing"))


def test_comfy_file_without_alpha_plays_as_comfyui_plays_it(tmp_path):
    from safetensors.torch import save_file

    from acestep_lora.lora_io import comfy_state_dict, read_lora

    layers = trained_layers(small_decoder())
    state = {k: v for k, v in comfy_state_dict(lora.pairs(layers), 8.0, torch.float32).items()
             if not k.endswith(".alpha")}
    save_file(state, str(tmp_path / "no_alpha.safetensors"))
    weights = read_lora(str(tmp_path / "no_alpha.safetensors"))
    assert set(weights.factors.values()) == {1.0} and "factor 1.0" in weights.notes[0]


def test_lora_that_does_not_fit_is_refused(tmp_path):
    from safetensors.torch import save_file

    from acestep_lora.lora_io import check_lora_fits, merge_lora_, read_lora

    decoder = small_decoder()
    other = {"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 8),
             "lora_unet_down_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(8, 4)}
    save_file(other, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(ValueError, match="lora_unet_down_blocks_0_attn1_to_q"):
        read_lora(str(tmp_path / "sdxl.safetensors"))

    wide = {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 2048),
            "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(2048, 4),
            "base_model.model.layers.0.self_attn.q_proj.alpha": torch.tensor(8.0)}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"shapes.*lora_A \[4, 2048\].*\[64, 64\]"):
        check_lora_fits(read_lora(str(tmp_path / "wide.safetensors")), decoder)

    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    deep = {"base_model.model.layers.30.cross_attn.k_proj.lora_A.weight": torch.zeros(4, 64),
            "base_model.model.layers.30.cross_attn.k_proj.lora_B.weight": torch.zeros(32, 4)}
    save_file(deep, str(tmp_path / "deep.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.30\.cross_attn\.k_proj.*another model"):
        merge_lora_(decoder, read_lora(str(tmp_path / "deep.safetensors")))
    assert all(torch.equal(v, before[k]) for k, v in decoder.state_dict().items())  # nothing merged
