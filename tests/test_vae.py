"""Tiled VAE encode/decode equal the whole-clip result; frame arithmetic matches the official hop."""
import os

import pytest
import torch

from acestep_lora import load_vae


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_tiled_encode_equals_whole_clip(tiny_ckpt):
    vae = load_vae(tiny_ckpt)
    audio = 0.3 * torch.randn(1, 2, 48000 * 5 + 777, generator=torch.Generator().manual_seed(0))
    whole = vae.encode(audio)
    tiled = vae.encode_tiled(audio, chunk_seconds=1.0, overlap_seconds=1.0)
    assert whole.mean.shape == tiled.mean.shape == (1, 64, (48000 * 5 + 777) // 1920)
    assert rel(tiled.mean, whole.mean) < 1e-5
    assert rel(tiled.std, whole.std) < 1e-5


def test_tiling_without_enough_overlap_differs(tiny_ckpt):
    """Guards the test above: with no overlap, window edges do change the result."""
    vae = load_vae(tiny_ckpt)
    audio = 0.3 * torch.randn(1, 2, 48000 * 4, generator=torch.Generator().manual_seed(1))
    assert rel(vae.encode_tiled(audio, 1.0, 0.0).mean, vae.encode(audio).mean) > 1e-3


def test_posterior_sample_is_seeded(tiny_ckpt):
    vae = load_vae(tiny_ckpt)
    post = vae.encode(0.3 * torch.randn(1, 2, 48000))
    a = post.sample(torch.Generator().manual_seed(5))
    b = post.sample(torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, post.mean)
    assert (post.std > 0).all()


def test_decode_and_tiled_decode(tiny_ckpt):
    vae = load_vae(tiny_ckpt)
    latents = torch.randn(1, 64, 60, generator=torch.Generator().manual_seed(2))
    audio = vae.decode(latents)
    assert audio.shape == (1, 2, 60 * 1920)
    assert rel(vae.decode_tiled(latents, chunk_frames=20, overlap_frames=16), audio) < 1e-5


def test_decoder_matches_diffusers_on_official_fixture(official_ckpt):
    """The fixture has no decode output; cross-check our decoder against the class the official code uses."""
    from diffusers import AutoencoderOobleck

    ours = load_vae(official_ckpt)
    theirs = AutoencoderOobleck.from_pretrained(f"{official_ckpt}/vae").eval()
    latents = torch.randn(1, 64, 50, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = theirs.decode(latents).sample
    assert rel(ours.decode(latents), expected) < 1e-5


@pytest.mark.parametrize("spelling", ["weight_g", "parametrizations"])
def test_comfyui_format_vae_reproduces_the_official_golden_encode(official_ckpt, tmp_path, spelling):
    """The official fixture's VAE in ComfyUI's layout (stable-audio names, [C] Snake parameters, either weight-norm
    spelling) encodes the golden audio exactly as diffusers' AutoencoderOobleck did."""
    import os

    from safetensors.torch import load_file, save_file

    from acestep_lora import native
    from conftest import FIXTURE

    path = str(tmp_path / "ace_1.5_vae.safetensors")
    save_file(native.comfy_vae_state(official_ckpt, spelling), path)
    golden = load_file(os.path.join(FIXTURE, "golden.safetensors"))
    posterior = native.load_vae_file(path).encode(golden["vae_encode.audio"])
    assert rel(posterior.mean, golden["vae_encode.out.mean"]) < 1e-5
    assert rel(posterior.std, golden["vae_encode.out.std"]) < 1e-5


def test_encoder_only_load_reads_and_builds_no_decoder(tiny_ckpt, monkeypatch):
    full = load_vae(tiny_ckpt)
    audio = 0.3 * torch.randn(1, 2, 48000, generator=torch.Generator().manual_seed(3))
    from acestep_lora import vae as vae_module
    monkeypatch.setattr(vae_module.Decoder, "__init__", lambda *a, **k: pytest.fail("the decoder was built"))
    encoder_only = vae_module.load_vae(tiny_ckpt, decoder=False)
    assert encoder_only.model.decoder is None and not any(k.startswith("decoder.") for k in
                                                            encoder_only.model.state_dict())
    assert torch.equal(encoder_only.encode(audio).mean, full.encode(audio).mean)
    with pytest.raises(RuntimeError, match="loaded without its decoder"):
        encoder_only.decode(torch.zeros(1, 64, 4))


def test_decoder_only_load_reads_and_builds_no_encoder(tiny_ckpt, comfy_models, monkeypatch):
    """Previews and `sample` only decode: the decoder alone (official folder and ComfyUI file), the same audio."""
    from acestep_lora import native
    from acestep_lora import vae as vae_module

    full = load_vae(tiny_ckpt)
    latents = torch.randn(1, 64, 6, generator=torch.Generator().manual_seed(4))
    from_file = native.load_vae_file(os.path.join(comfy_models, "vae", "ace_1.5_vae.safetensors"), encoder=False)
    assert from_file.model.encoder is None and from_file.decode(latents).shape == (1, 2, 6 * 1920)
    assert not any(k.startswith("encoder.") for k in from_file.model.state_dict())
    monkeypatch.setattr(vae_module.Encoder, "__init__", lambda *a, **k: pytest.fail("the encoder was built"))
    decoder_only = vae_module.load_vae(tiny_ckpt, encoder=False)
    assert decoder_only.model.encoder is None and not any(k.startswith("encoder.") for k in
                                                            decoder_only.model.state_dict())
    assert torch.equal(decoder_only.decode(latents), full.decode(latents))
    with pytest.raises(RuntimeError, match="loaded without its encoder"):
        decoder_only.encode(torch.zeros(1, 2, 1920))


def test_prepare_never_builds_the_decoder(tiny_ckpt, tmp_path, monkeypatch):
    """Prepare only encodes; the sampler (load_vae's default) is the one that decodes."""
    from acestep_lora import vae as vae_module
    from acestep_lora.prepare import PrepareSettings, prepare_dataset

    from test_prepare import item
    monkeypatch.setattr(vae_module.Decoder, "__init__", lambda *a, **k: pytest.fail("Prepare built the decoder"))
    result = prepare_dataset([item("a", 1.0)], str(tmp_path), PrepareSettings(tiny_ckpt, device="cpu"))
    assert result.encoded == 1
