"""Parity with the official ACE-Step 1.5 implementation (tests/fixtures/acestep15_tiny, see its README).

Every stored output was computed by the official model code in fp32; ours must match within 1e-5 relative error.
"""
import hashlib
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from acestep_lora import load_dit, load_silence_latent, load_vae

from conftest import FIXTURE

TOL = 1e-5
SHA256 = {  # from the fixture README: proves the fixture itself is the one the official code wrote
    "config.json": "91882ffb04ff2643518be80f5f70a695aed39719d73c9e49f72f238c9c441c11",
    "model.safetensors": "5a0dcb10ec75ec23821fa63588b97eb2b8f247c59a054d6431663cd9f6efe437",
    "silence_latent.pt": "b630d94f83d46e100c7f83929c95b3e99c29e14d861c78fc9a6dd88b4bbad74d",
    "golden.safetensors": "f586a8cc8952b265e8318d4b8df133c07cc8ac2fb5fe20684a9bb82e73d6083d",
    "vae/config.json": "6f1ab2a2a97e71b1e83f139c3197df9cca73a9d3bc5e27d615b208c5257939d4",
    "vae/diffusion_pytorch_model.safetensors": "e0fde935e0491709dc2e69ec828e77167e342642a95b2d8657a875ec07e485f7",
    "golden_generate.safetensors": "b13ff027c8162f6901cde18c7179b1c94d18d63c663a854279a9512ba4e73f77",
}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def golden():
    return load_file(os.path.join(FIXTURE, "golden.safetensors"))


@pytest.fixture(scope="module")
def model(official_ckpt):
    return load_dit(official_ckpt, "acestep-v15-turbo")


@pytest.mark.parametrize("name", sorted(SHA256))
def test_fixture_files_are_the_official_ones(name):
    with open(os.path.join(FIXTURE, name), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == SHA256[name]


def _decoder(model, g, p, **extra):
    with torch.no_grad():
        return model.decoder(hidden_states=g[p + "hidden_states"] if p + "hidden_states" in g else g[p + "xt"],
                             timestep=g[p + "timestep"] if p + "timestep" in g else g[p + "t"],
                             timestep_r=g[p + "timestep_r"] if p + "timestep_r" in g else g[p + "t"],
                             attention_mask=g[p + "attention_mask"],
                             encoder_hidden_states=g[p + "encoder_hidden_states"],
                             encoder_attention_mask=g[p + "encoder_attention_mask"],
                             context_latents=g[p + "context_latents"], **extra)


def test_decoder_odd_length_matches_official(model, golden):
    out = _decoder(model, golden, "decoder_call.")
    assert isinstance(out, tuple)
    pred = out[0]
    assert pred.shape == (2, 37, 64)
    assert rel_err(pred, golden["decoder_call.out.pred"]) <= TOL


def test_decoder_ignores_masks_like_official(model, golden):
    """The official DiT discards both masks; row 1's padded encoder mask must not change the output."""
    g = dict(golden)
    g["decoder_call.encoder_attention_mask"] = torch.ones_like(g["decoder_call.encoder_attention_mask"])
    assert torch.equal(_decoder(model, g, "decoder_call.")[0], _decoder(model, golden, "decoder_call.")[0])


@pytest.mark.parametrize("prefix", ["encoder_call.", "encoder_call_noref."])
def test_condition_encoder_matches_official(model, golden, prefix):
    g = golden
    with torch.no_grad():
        states, mask = model.encoder(
            text_hidden_states=g[prefix + "text_hidden_states"], text_attention_mask=g[prefix + "text_attention_mask"],
            lyric_hidden_states=g[prefix + "lyric_hidden_states"],
            lyric_attention_mask=g[prefix + "lyric_attention_mask"],
            refer_audio_acoustic_hidden_states_packed=g[prefix + "refer_audio_acoustic_hidden_states_packed"],
            refer_audio_order_mask=g[prefix + "refer_audio_order_mask"])
    assert mask.dtype == torch.bool
    assert torch.equal(mask, g[prefix + "out.encoder_attention_mask"])
    assert rel_err(states, g[prefix + "out.encoder_hidden_states"]) <= TOL


def test_training_loss_example_matches_official(model, golden, official_ckpt):
    g = golden
    x0, noise, t = g["loss_example.x0"], g["loss_example.noise"], g["loss_example.t"]
    xt = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
    assert rel_err(xt, g["loss_example.xt"]) <= TOL
    silence = load_silence_latent(official_ckpt, "acestep-v15-turbo")
    context = torch.cat([silence[:, :37].expand(2, -1, -1), torch.ones(2, 37, 64)], dim=-1)
    assert rel_err(context, g["loss_example.context_latents"]) <= TOL
    pred = _decoder(model, g, "loss_example.")[0]
    assert rel_err(pred, g["loss_example.out.pred"]) <= TOL
    loss = F.mse_loss(pred, noise - x0)
    assert abs(loss.item() - g["loss_example.out.loss"].item()) / g["loss_example.out.loss"].item() <= TOL


def test_vae_posterior_matches_official(official_ckpt, golden):
    vae = load_vae(official_ckpt)
    post = vae.encode(golden["vae_encode.audio"])
    assert post.mean.shape == (1, 64, 1000)
    assert rel_err(post.mean, golden["vae_encode.out.mean"]) <= TOL
    assert rel_err(post.std, golden["vae_encode.out.std"]) <= TOL
