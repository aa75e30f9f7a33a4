"""The sampler: parity with the official generate_audio, base/sft guidance, the CLI, seeds and LoRAs on the audio."""
import argparse
import os

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from acestep_lora import load_dit, load_silence_latent, lora
from acestep_lora import sampler as smp
from acestep_lora.lora_io import save_comfy_lora
from acestep_lora.prepare import PrepareSettings, prepare_dataset
from acestep_lora.sampler import (TURBO_TIMESTEPS, Conditioning, Prompt, SamplerSettings, add_sample_command, apg,
                                  condition, encode_prompts, generate, initial_noise, sample_latents)

from conftest import FIXTURE
from test_prepare import item

TOL = 1e-5
CASES = {  # case: (batch, frames, shift, seed), as the fixture README lists them
    "turbo_shift3_T40": (1, 40, 3.0, 1234),
    "turbo_shift1_T33_B2": (2, 33, 1.0, 7),
    "turbo_shift2_T64": (1, 64, 2.0, 99),
}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# -- parity with the official sampler ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def golden():
    return load_file(os.path.join(FIXTURE, "golden_generate.safetensors"))


@pytest.fixture(scope="module")
def official(official_ckpt):
    model = load_dit(official_ckpt, components=("decoder", "encoder"))
    return model, load_silence_latent(official_ckpt)


@pytest.mark.parametrize("case", sorted(CASES))
def test_generate_matches_official(case, golden, official):
    model, silence = official
    batch, frames, shift, seed = CASES[case]
    g = {k[len(case) + 1:]: v for k, v in golden.items() if k.startswith(case + ".")}
    # The official inputs are the text2music ones our sampler builds: silence as the (only) reference clip per row,
    # silence + ones as context, no cover.
    assert torch.equal(g["refer_audio_acoustic_hidden_states_packed"],
                       silence[:, :model.config.timbre_fix_frame].expand(batch, -1, -1))
    assert torch.equal(g["refer_audio_order_mask"], torch.arange(batch)) and not g["is_covers"].any()
    assert torch.equal(g["src_latents"], silence[:, :frames].expand(batch, -1, -1))
    assert bool((g["chunk_masks"] == 1).all())

    states, mask = condition(model.encoder, g["text_hidden_states"], g["text_attention_mask"],
                             g["lyric_hidden_states"], g["lyric_attention_mask"], silence,
                             model.config.timbre_fix_frame)
    assert rel_err(states, g["encoder_hidden_states"]) <= TOL
    assert torch.equal(mask.float(), g["encoder_attention_mask"])
    conditioning = Conditioning(states, mask, silence)
    assert rel_err(conditioning.context_latents(frames), g["context_latents"]) <= TOL
    assert torch.equal(initial_noise((batch, frames, 64), seed, "cpu", torch.float32), g["noise"])

    settings = SamplerSettings.for_variant("turbo", shift=shift)
    assert settings.timesteps().tolist() == pytest.approx(TURBO_TIMESTEPS[shift])
    out = sample_latents(model.decoder, conditioning, settings, seed=seed, frames=frames)
    assert out.shape == (batch, frames, 64)
    assert rel_err(out, g["out.target_latents"]) <= TOL
    # Guard: the neighbouring schedule lands far outside the tolerance.
    other = SamplerSettings.for_variant("turbo", shift=2.0 if shift != 2.0 else 3.0)
    assert rel_err(sample_latents(model.decoder, conditioning, other, seed=seed, frames=frames),
                   g["out.target_latents"]) > 1e-2


def test_turbo_tables_are_the_shifted_uniform_grid():
    for shift, table in TURBO_TIMESTEPS.items():
        grid = [1 - i / 8 for i in range(8)]
        assert list(table) == pytest.approx([shift * s / (1 + (shift - 1) * s) for s in grid], abs=1e-15)


# -- base / sft -------------------------------------------------------------------------------------------------

def test_variant_defaults_and_refusals():
    base, sft, turbo = (SamplerSettings.for_variant(v) for v in ("base", "sft", "turbo"))
    assert (base.steps, base.shift, base.guidance_scale, base.cfg_interval) == (32, 3.0, 7.0, (0.0, 1.0))
    assert (sft.steps, sft.guidance_scale) == (50, 7.0) and sft.variant == "sft"
    assert (turbo.steps, turbo.shift, turbo.uses_cfg) == (8, 3.0, False)
    assert SamplerSettings.for_variant("xl_sft").variant == "sft"
    t = SamplerSettings.for_variant("base", steps=4, shift=2.0).timesteps()
    assert t.tolist() == pytest.approx([1.0, 6 / 7, 2 / 3, 0.4, 0.0])  # 2s / (1 + s) on linspace(1, 0, 5)
    for kw, words in [(dict(steps=4), "fixed 8-step"), (dict(shift=2.5), "shift 1, 2 or 3"),
                      (dict(guidance_scale=3.0), "without CFG")]:
        with pytest.raises(ValueError, match=words):
            SamplerSettings.for_variant("turbo", **kw)
    with pytest.raises(ValueError, match="must be >= 1.0"):
        SamplerSettings.for_variant("base", guidance_scale=0.5)


@pytest.fixture(scope="module")
def base_model(tiny_ckpt):
    model = load_dit(tiny_ckpt, "acestep-v15-base")
    g = torch.Generator().manual_seed(5)
    states = torch.randn(1, 9, model.config.hidden_size, generator=g)
    silence = load_silence_latent(tiny_ckpt, "acestep-v15-base")
    conditioning = Conditioning(states, torch.ones(1, 9, dtype=torch.bool), silence)
    return model, conditioning


def reference_base_sampler(decoder, null, conditioning, frames, seed, steps, shift, scale, interval):
    """The official base/sft loop written out plainly (Euler on the shifted grid; APG inside the interval)."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    t = shift * t / (1 + (shift - 1) * t)
    x = torch.randn(1, frames, 64, generator=torch.Generator().manual_seed(seed))
    states = conditioning.encoder_hidden_states
    context = conditioning.context_latents(frames)
    average = 0
    for i in range(steps):
        ts = t[i] * torch.ones(2)
        v = decoder(hidden_states=torch.cat([x, x]), timestep=ts, timestep_r=ts,
                    encoder_hidden_states=torch.cat([states, null.expand_as(states)]),
                    context_latents=torch.cat([context, context]))[0]
        cond, uncond = v.chunk(2)
        if interval[0] <= t[i] <= interval[1]:
            average = (cond - uncond) + (-0.75) * average
            diff = average * torch.clamp(2.5 / average.norm(dim=1, keepdim=True), max=1.0)
            unit = torch.nn.functional.normalize(cond.double(), dim=1)
            orthogonal = diff.double() - (diff.double() * unit).sum(dim=1, keepdim=True) * unit
            v = cond + (scale - 1) * orthogonal.float()
        else:
            v = cond
        x = x - v * (t[i] - t[i + 1])
    return x


def test_base_cfg_path_matches_a_plain_reference(base_model):
    model, conditioning = base_model
    settings = SamplerSettings.for_variant("base", steps=6, shift=3.0, guidance_scale=4.0, cfg_interval=(0.0, 0.8))
    ours = sample_latents(model.decoder, conditioning, settings, seed=11, frames=30,
                          null_condition=model.null_condition_emb)
    with torch.no_grad():
        ref = reference_base_sampler(model.decoder, model.null_condition_emb, conditioning, 30, 11, 6, 3.0, 4.0,
                                     (0.0, 0.8))
    assert rel_err(ours, ref) < 1e-5


def test_guidance_one_equals_unguided(base_model):
    model, conditioning = base_model
    cond, uncond = torch.randn(2, 3, 17, 64).unbind(0)
    assert torch.equal(apg(cond, uncond, 1.0, smp._Momentum()), cond)  # APG at scale 1 is the conditional velocity

    kw = dict(seed=3, frames=24)
    unguided = sample_latents(model.decoder, conditioning, SamplerSettings.for_variant("base", steps=5,
                                                                                       guidance_scale=1.0), **kw)
    with_null = sample_latents(model.decoder, conditioning, SamplerSettings.for_variant("base", steps=5,
                                                                                        guidance_scale=1.0),
                               null_condition=model.null_condition_emb, **kw)
    guided = sample_latents(model.decoder, conditioning, SamplerSettings.for_variant("base", steps=5),
                            null_condition=model.null_condition_emb, **kw)
    assert torch.equal(unguided, with_null)
    assert rel_err(guided, unguided) > 1e-3
    with pytest.raises(ValueError, match="null condition"):
        sample_latents(model.decoder, conditioning, SamplerSettings.for_variant("base", steps=5), **kw)


def test_sample_latents_on_a_training_decoder(tiny_ckpt):
    """The trainer's use: a decoder wrapped in LoRA layers (B = 0: the model alone), in train mode, restored after."""
    model = load_dit(tiny_ckpt)
    silence = load_silence_latent(tiny_ckpt)
    conditioning = Conditioning(torch.randn(1, 5, 64), torch.ones(1, 5, dtype=torch.bool), silence)
    settings = SamplerSettings.for_variant("turbo")
    plain = sample_latents(model.decoder, conditioning, settings, seed=1, frames=20)
    lora.inject(model.decoder, ["q_proj", "v_proj"], 4, 8.0, dropout=0.5)
    model.decoder.train()
    steps = []
    wrapped = sample_latents(model.decoder, conditioning, settings, seed=1, frames=20,
                             progress=lambda i, n: steps.append((i, n)))
    assert model.decoder.training
    assert torch.equal(wrapped, plain)  # dropout off inside, B = 0
    assert steps == [(i, 8) for i in range(1, 9)]


# -- conditioning as prepare.py builds it ---------------------------------------------------------------------

def test_conditioning_equals_the_training_tensors(tiny_ckpt, tmp_path):
    out = str(tmp_path / "t")
    lyrics = "[verse]\nla la\nheart fire"
    result = prepare_dataset([item("a", 2.0, lyrics=lyrics, timesignature="3/4")], out,
                             PrepareSettings(tiny_ckpt, device="cpu"))
    data = torch.load(os.path.join(out, result.files[0]), map_location="cpu", weights_only=True)
    prompt = Prompt("caption a", lyrics, 2.0, bpm=120, keyscale="Am", timesignature="3/4", language="en")
    conditioning = encode_prompts(tiny_ckpt, [prompt])[0]
    assert conditioning.prompt.caption_text() == data["metadata"]["text_prompt"]
    assert torch.equal(conditioning.encoder_hidden_states[0], data["encoder_hidden_states"])
    assert torch.equal(conditioning.encoder_attention_mask[0], data["encoder_attention_mask"])
    assert torch.equal(conditioning.context_latents(prompt.frames)[0], data["context_latents"])


def test_prompt_checks():
    assert Prompt("x", duration=30).normalized().frames == 750 and Prompt("x", duration=2.04).frames == 50
    p = Prompt("x", "", 10, bpm="120", keyscale="F#m", timesignature="4/4", language="").normalized()
    assert (p.lyrics, p.bpm, p.keyscale, p.timesignature, p.language) == ("[Instrumental]", 120, "F# minor", "4",
                                                                            "unknown")
    for bad, words in [(Prompt(" "), "caption is empty"), (Prompt("x", duration=0), "duration 0"),
                       (Prompt("x", duration=601), "duration 601"), (Prompt("x", keyscale="H"), "keyscale")]:
        with pytest.raises(ValueError, match=words):
            bad.normalized()


# -- generate, the CLI, seeds, LoRAs ---------------------------------------------------------------------------

def cli(argv):
    parser = argparse.ArgumentParser(prog="acestep_lora")
    add_sample_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def test_cli_writes_flac(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out.flac"
    assert cli(["sample", "--checkpoint-dir", tiny_ckpt, "--caption", "chill lofi beat", "--duration", "1.5",
                "--seed", "4", "--device", "cpu", "-o", str(out)]) == 0
    audio, rate = sf.read(out, always_2d=True)
    assert rate == 48000 and audio.shape == (37 * 1920, 2)  # 1.5 s -> 37 latent frames
    assert 0 < abs(audio).max() <= 1.0 and audio.std() > 1e-3
    printed = capsys.readouterr().out
    assert f"Wrote {out}" in printed and "seed 4" in printed and "8 steps, shift 3" in printed
    assert "LoRA: none" in printed and "[Instrumental]" in printed
    with pytest.raises(FileExistsError, match="--overwrite"):
        cli(["sample", "--checkpoint-dir", tiny_ckpt, "--caption", "x", "--duration", "1", "-o", str(out)])
    with pytest.raises(ValueError, match="ending in .flac"):
        cli(["sample", "--checkpoint-dir", tiny_ckpt, "--caption", "x", "-o", str(tmp_path / "a.wav")])


def test_cli_base_model_uses_guidance(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "b.flac"
    cli(["sample", "--checkpoint-dir", tiny_ckpt, "--config-path", "acestep-v15-base", "--caption", "piano",
         "--duration", "1", "--steps", "4", "--device", "cpu", "-o", str(out)])
    assert "base: 4 steps, shift 3, guidance 7 (APG" in capsys.readouterr().out
    assert sf.info(out).frames == 25 * 1920


@pytest.fixture(scope="module")
def lora_files(tiny_ckpt, tmp_path_factory):
    """The same LoRA (values exactly representable in bf16) as a run's final/ folder, a PEFT folder and a ComfyUI
    file (bf16, with alpha)."""
    root = tmp_path_factory.mktemp("loras")
    decoder = load_dit(tiny_ckpt, components=("decoder",)).decoder
    layers = lora.inject(decoder, ["q_proj", "k_proj", "v_proj", "o_proj"], 4, 8.0, 0.0)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.copy_(layer.lora_A.bfloat16().float())
            layer.lora_B.copy_((0.3 * torch.randn(layer.lora_B.shape, generator=g)).bfloat16().float())
    final = root / "run" / "final"
    lora.save_peft_adapter(str(final / "adapter"), layers, ["q_proj", "k_proj", "v_proj", "o_proj"], 4, 8.0, 0.0)
    comfy = str(root / "my_lora.safetensors")
    save_comfy_lora(comfy, lora.pairs(layers), 8.0, {"format": "pt"})
    return str(final), str(final / "adapter"), comfy


def audio_of(tiny_ckpt, seed=2, **kw):
    return generate(tiny_ckpt, Prompt("dreamy synth", duration=0.6), seed=seed, device="cpu", **kw)


@pytest.fixture(scope="module")
def plain(tiny_ckpt):
    return audio_of(tiny_ckpt)


def test_same_seed_same_audio_other_seed_other_audio(tiny_ckpt, plain):
    again, other = audio_of(tiny_ckpt), audio_of(tiny_ckpt, seed=3)
    assert plain.waveform.shape == (2, 15 * 1920) and plain.sample_rate == 48000
    assert torch.equal(again.waveform, plain.waveform)
    assert not torch.allclose(other.waveform, plain.waveform, atol=1e-3)


def test_lora_scale_zero_nonzero_and_file_kinds(tiny_ckpt, lora_files, plain):
    final, adapter, comfy = lora_files
    zero = audio_of(tiny_ckpt, lora=adapter, lora_scale=0.0)
    assert torch.equal(zero.waveform, plain.waveform)
    peft = audio_of(tiny_ckpt, lora=adapter)
    assert not torch.allclose(peft.waveform, plain.waveform, atol=1e-3)
    assert torch.equal(audio_of(tiny_ckpt, lora=comfy).waveform, peft.waveform)
    run = audio_of(tiny_ckpt, lora=final)
    assert torch.equal(run.waveform, peft.waveform)
    assert "PEFT adapter folder" in run.lora and "rank 4, alpha 8" in run.lora and run.lora_scale == 1.0


def test_cli_prints_the_lora_and_reads_a_lyrics_file(tiny_ckpt, lora_files, tmp_path, capsys):
    (tmp_path / "lyrics.txt").write_text("[verse]\nla la la\n", encoding="utf-8")
    cli(["sample", "--checkpoint-dir", tiny_ckpt, "--caption", "x", "--duration", "1", "--lora", lora_files[2],
         "--scale", "0.5", "--lyrics-file", str(tmp_path / "lyrics.txt"), "--language", "en", "--device", "cpu",
         "-o", str(tmp_path / "l.flac")])
    printed = capsys.readouterr().out
    assert "LoRA: ComfyUI LoRA file" in printed and "at scale 0.5" in printed
    assert "lyrics: '[verse]\\nla la la'; language en" in printed


def test_refuses_a_lora_that_does_not_fit_before_loading_models(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(smp, "encode_prompts", lambda *a, **k: pytest.fail("a model was loaded"))
    bad = {"base_model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
           "base_model.model.layers.7.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)}
    from safetensors.torch import save_file
    save_file(bad, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.7\.self_attn\.q_proj.*another model"):
        audio_of(tiny_ckpt, lora=str(tmp_path / "other.safetensors"))


def test_decode_audio_uses_the_official_window_and_anti_clipping():
    class RecordingVAE:
        def decode_tiled(self, latents, chunk_frames, overlap_frames):
            self.args = (tuple(latents.shape), chunk_frames, overlap_frames)
            audio = torch.full((2, 2, latents.shape[-1] * 1920), 0.5)
            audio[0, 1, 7] = -2.0  # clip 0 peaks at 2: scaled down; clip 1 (peak 0.5) untouched
            return audio

    vae = RecordingVAE()
    audio = smp.decode_audio(vae, torch.zeros(2, 10, 64))
    assert vae.args == ((2, 64, 10), 512 - 2 * 64, 64)
    assert audio[0, 1, 7] == -1.0 and audio[0, 0, 0] == 0.25 and bool((audio[1] == 0.5).all())


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_generate_with_lora_is_bf16_deterministic_and_finite(tiny_ckpt, lora_files):
    runs = [generate(tiny_ckpt, Prompt("dreamy synth", duration=1.0), seed=5, device="cuda", lora=lora_files[2])
            for _ in range(2)]
    assert runs[0].dtype == "bfloat16" and runs[0].waveform.shape == (2, 25 * 1920)
    assert bool(torch.isfinite(runs[0].waveform).all()) and runs[0].waveform.abs().max() <= 1.0
    assert torch.equal(runs[0].waveform, runs[1].waveform)


@cuda
def test_cuda_sampling_a_bf16_decoder_with_fp32_lora_layers(tiny_ckpt):
    """The trainer's preview case on a GPU: bf16 base weights, fp32 LoRA layers, mixed under autocast."""
    model = load_dit(tiny_ckpt, device="cuda", dtype=torch.bfloat16)
    silence = load_silence_latent(tiny_ckpt, device="cuda", dtype=torch.bfloat16)
    conditioning = Conditioning(torch.randn(1, 5, 64), torch.ones(1, 5, dtype=torch.bool), silence)
    settings = SamplerSettings.for_variant("turbo")
    plain = sample_latents(model.decoder, conditioning, settings, seed=1, frames=20)
    layers = lora.inject(model.decoder, ["q_proj", "v_proj"], 4, 8.0, 0.0)
    assert plain.dtype == torch.bfloat16 and layers["layers.0.self_attn.q_proj"].lora_A.dtype == torch.float32
    wrapped = sample_latents(model.decoder, conditioning, settings, seed=1, frames=20)
    assert rel_err(wrapped.float(), plain.float()) < 1e-2
