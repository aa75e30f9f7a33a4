"""ComfyUI-format files: the official layout converted to each format loads back to identical weights (2B- and
XL-shaped), conditioning computed from either source is equal, files are recognised from their headers, and every
mismatch is an error naming the file and the key."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from acestep_lora import native
from acestep_lora.checkpoint import file_identity, load_dit, read_header
from acestep_lora.manifest import TENSOR_KEYS
from acestep_lora.config import XL_FIELDS, AceStepConfig
from acestep_lora.model import AceStepModel
from acestep_lora.prepare import context_latents_for
from acestep_lora.prompts import caption_prompt, lyrics_prompt
from acestep_lora.source import AUTO, Folders, ModelSource, default_model_choice, model_choices, part_choices, \
    resolve_choice
from acestep_lora.testing import init_weights_, make_tiny_comfy_models, tiny_dit_config
from acestep_lora.text import load_text_encoder, load_tokenizer
from acestep_lora.vae import load_vae
from conftest import SILENCE_PROBE as PROBE

CONFIGS = {"2B": "acestep-v15-turbo", "XL": "acestep-v15-xl-turbo"}


@pytest.fixture(scope="module")
def official(comfy_official):
    """conftest.comfy_official: 2B- and XL-shaped DiT folders a ComfyUI file can carry, silence latents the VAE's."""
    return comfy_official


@pytest.fixture(scope="module", params=list(CONFIGS))
def comfy(request, official, tmp_path_factory):
    """(config_path, official dir, {"dit", "vae", "text_encoder", "checkpoint", "tokenizer": path})."""
    config_path = CONFIGS[request.param]
    models = tmp_path_factory.mktemp(f"models_{request.param}")
    return config_path, official, make_tiny_comfy_models(str(models), official, config_path)


def equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------------------
# Round trips: official -> ComfyUI format -> our modules


def test_dit_round_trip_split_prefixed_and_checkpoint(comfy, tmp_path):
    config_path, root, paths = comfy
    expected = load_dit(root, config_path).state_dict()
    prefixed = str(tmp_path / "saved_by_comfyui.safetensors")  # what ComfyUI's own save nodes write
    save_file(native.comfy_dit_state(root, config_path, prefix="model.diffusion_model."), prefixed)
    for path in (paths["dit"], prefixed, paths["checkpoint"]):
        model = native.load_dit_file(path, variant="turbo")
        assert equal_states(model.state_dict(), expected), path
    assert native.read_dit_config(paths["dit"]).family == ("XL" if "xl" in config_path else "2B")


def test_dit_config_from_shapes_equals_official_config(comfy):
    config_path, root, paths = comfy
    ours = native.read_dit_config(paths["dit"])
    official = AceStepConfig.from_json(os.path.join(root, config_path, "config.json"))
    assert ours.to_dict() == {k: v for k, v in official.to_dict().items() if k in ours.to_dict()}


def test_converter_refuses_what_the_format_cannot_carry(tiny_ckpt):
    """The shared tiny DiT uses a sliding window of 8; a ComfyUI file always means the official 128."""
    assert native.unrepresentable_fields(load_dit(tiny_ckpt).config) == {"sliding_window": 8}
    with pytest.raises(ValueError, match=r"sets \{'sliding_window': 8\}.*would change the model"):
        native.comfy_dit_state(tiny_ckpt, "acestep-v15-turbo")


@pytest.mark.parametrize("spelling", ["weight_g", "parametrizations"])
def test_vae_round_trip_both_weight_norm_spellings(comfy, tmp_path, spelling):
    _, root, paths = comfy
    path = str(tmp_path / "vae.safetensors")
    save_file(native.comfy_vae_state(root, spelling), path)
    names = set(read_header(path)[0])
    assert ("decoder.layers.0.parametrizations.weight.original1" in names) == (spelling == "parametrizations")
    assert "decoder.layers.1.layers.0.beta" in names  # the key ComfyUI detects this VAE by
    expected = load_vae(root)
    for file in (path, paths["checkpoint"]):
        vae = native.load_vae_file(file)
        assert vae.config == {k: v for k, v in expected.config.items() if not k.startswith("_")}
        assert equal_states(vae.model.state_dict(), expected.model.state_dict())


def test_text_encoder_round_trip(comfy):
    _, root, paths = comfy
    expected = load_text_encoder(root).model.state_dict()
    tokenizer = load_tokenizer(paths["tokenizer"])
    for path in (paths["text_encoder"], paths["checkpoint"]):
        assert equal_states(native.load_text_encoder_file(path, tokenizer).model.state_dict(), expected)
    assert "model.embed_tokens.weight" in read_header(paths["text_encoder"])[0]


def test_bf16_files_load_into_the_requested_dtype(official, tmp_path):
    paths = make_tiny_comfy_models(str(tmp_path), official, dtype=torch.bfloat16)
    assert {dtype for dtype, _ in read_header(paths["dit"])[0].values()} == {"BF16"}
    model = native.load_dit_file(paths["dit"], dtype=torch.float32)
    expected = load_dit(official, "acestep-v15-turbo").state_dict()
    assert all(torch.equal(v, expected[k].to(torch.bfloat16).float()) for k, v in model.state_dict().items())


def test_training_reads_only_the_decoder(comfy, monkeypatch):
    _, _, paths = comfy
    read = []
    original = native.read_tensors

    def spy(path, names, *args, **kwargs):
        read.extend(names.values())
        return original(path, names, *args, **kwargs)

    monkeypatch.setattr(native, "read_tensors", spy)
    model = native.load_dit_file(paths["checkpoint"], components=("decoder", "null_condition_emb"))
    assert model.encoder is None and model.tokenizer is None
    assert read and all(k.startswith(("model.diffusion_model.decoder.", "model.diffusion_model.null_condition_emb"))
                        for k in read)


# ----------------------------------------------------------------------------------------------------------------
# Conditioning parity: what Prepare computes, from the official folder and from ComfyUI's files


def conditioning(source: ModelSource, audio: torch.Tensor, caption: str, lyrics: str) -> dict:
    """Prepare's per-sample tensors (prepare._Models.encode), through the source API, posterior mean as latents."""
    vae, text = source.load_vae(), source.load_text_encoder()
    dit = source.load_dit(components=("encoder",))
    silence = source.load_silence_latent()
    latents = vae.encode(audio).mean[0].transpose(0, 1)
    prompt = caption_prompt(caption, 120, "4", "C major", audio.shape[-1] / 48000)
    hidden, mask = text.encode_caption(prompt)
    lyric, lyric_mask = text.embed_lyrics(lyrics_prompt(lyrics, "en"))
    states, state_mask = dit.encoder(hidden, mask, lyric, lyric_mask, silence[:, : dit.config.timbre_fix_frame],
                                     torch.zeros(1, dtype=torch.long))
    return {"target_latents": latents, "encoder_hidden_states": states, "encoder_attention_mask": state_mask,
            "context_latents": context_latents_for(silence, latents.shape[0]),
            "caption_ids": torch.tensor(text.tokenizer(prompt).input_ids)}


def test_conditioning_parity_official_vs_comfy_files(comfy, monkeypatch):
    config_path, root, paths = comfy
    original = native.derive_silence_latent  # as long as the tiny official file, with the short probe
    monkeypatch.setattr(native, "derive_silence_latent", lambda vae: original(vae, 300, PROBE))
    audio = 0.3 * torch.randn(1, 2, 48000 + 1920 * 7, generator=torch.Generator().manual_seed(0))
    args = (audio, "upbeat electronic pop, bright synth", "[verse]\nla la love\n[chorus]\noh yeah")
    expected = conditioning(ModelSource.official(root, config_path), *args)
    split = ModelSource.comfy(paths["dit"], paths["vae"], paths["text_encoder"], tokenizer=paths["tokenizer"])
    aio = ModelSource.comfy(checkpoint=paths["checkpoint"], tokenizer=paths["tokenizer"])
    for source in (split, aio):
        got = conditioning(source, *args)
        for key, value in expected.items():
            assert torch.allclose(got[key].float(), value.float(), rtol=1e-5, atol=1e-6), key


def test_prepare_dataset_parity_official_vs_comfy_files(comfy, monkeypatch, tmp_path):
    """prepare_dataset itself: the .pt files from the official folder and from ComfyUI's split files (chosen as
    the nodes' dropdowns name them) and all-in-one checkpoint hold equal tensors, the VAE's sampled latents
    included; only the model identity (and so the cache key and file name) differs."""
    import soundfile as sf

    from acestep_lora.prepare import PrepareItem, PrepareSettings, prepare_dataset

    config_path, root, paths = comfy
    original = native.derive_silence_latent  # as long as the tiny official file, with the short probe
    monkeypatch.setattr(native, "derive_silence_latent", lambda vae: original(vae, 300, PROBE))
    gen = torch.Generator().manual_seed(1)
    items = []
    for i, seconds in enumerate((1.3, 2.1)):
        path = str(tmp_path / f"song{i}.wav")
        sf.write(path, (0.3 * torch.randn(int(44100 * seconds), 2, generator=gen)).numpy(), 44100)
        items.append(PrepareItem(name=path, path=path, caption=f"upbeat electronic pop {i}, bright synth",
                                 lyrics="[verse]\nla la love\n[chorus]\noh yeah", bpm=120, keyscale="C major",
                                 language="en"))
    models = os.path.dirname(os.path.dirname(paths["dit"]))
    folders = Folders(diffusion_models=[os.path.join(models, "diffusion_models")],
                      checkpoints=[os.path.join(models, "checkpoints")], vae=[os.path.join(models, "vae")],
                      text_encoders=[os.path.join(models, "text_encoders")], tokenizer_dirs=[paths["tokenizer"]])
    runs = {"official": PrepareSettings(root, config_path, device="cpu"),
            "split": PrepareSettings("", "diffusion_models/" + os.path.basename(paths["dit"]), device="cpu"),
            "all-in-one": PrepareSettings("", "checkpoints/" + os.path.basename(paths["checkpoint"]), device="cpu")}
    prepared = {name: prepare_dataset(items, str(tmp_path / name), settings, folders=folders)
                for name, settings in runs.items()}
    expected = [torch.load(os.path.join(prepared["official"].tensor_dir, f), weights_only=True)
                for f in prepared["official"].files]
    for name in ("split", "all-in-one"):
        result = prepared[name]
        assert "from ComfyUI files" in result.status and "silence latent: derived from the VAE" in result.status
        assert result.files != prepared["official"].files  # another model identity, another cache key
        assert len(result.files) == len(expected) == len(items)  # zip below must compare every sample
        for want, file in zip(expected, result.files):
            got = torch.load(os.path.join(result.tensor_dir, file), weights_only=True)
            for key in TENSOR_KEYS:
                assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, (name, key)
                assert torch.allclose(got[key].float(), want[key].float(), rtol=1e-5, atol=1e-6), (name, key)
            assert got["metadata"]["text_prompt"] == want["metadata"]["text_prompt"]
    manifest = json.load(open(os.path.join(prepared["split"].tensor_dir, "manifest.json")))
    assert manifest["checkpoint"]["source"] == "comfy" and manifest["checkpoint"]["dit"] == file_identity(paths["dit"])
    assert manifest["checkpoint"]["config_path"] == os.path.splitext(os.path.basename(paths["dit"]))[0]


def test_derived_silence_latent_equals_encoding_the_whole_silent_clip(official):
    vae = load_vae(official)
    derived = native.derive_silence_latent(vae, frames=200, probe_frames=PROBE)
    whole = vae.encode(torch.zeros(1, 2, 200 * 1920)).mean.transpose(1, 2)
    assert derived.shape == (1, 200, 64)
    assert ((derived - whole).norm() / whole.norm()).item() < 1e-5
    # the structure ComfyUI's built-in silence latent has: edge frames, then one frame repeated
    assert torch.equal(derived[0, 40], derived[0, 160]) and not torch.equal(derived[0, 0], derived[0, 40])


# ----------------------------------------------------------------------------------------------------------------
# Exactness: every mismatch names the file and the key


def rewrite(path: str, out: str, change) -> str:
    state = {k: v.clone() for k, v in load_file(path).items()}
    change(state)
    save_file(state, out + ".tmp")
    os.replace(out + ".tmp", out)
    return out


@pytest.mark.parametrize("part,key", [("dit", "decoder.layers.1.mlp.up_proj.weight"),
                                      ("dit", "encoder.lyric_encoder.layers.0.mlp.up_proj.weight"),
                                      ("vae", "encoder.layers.2.layers.0.layers.1.weight_v"),
                                      ("text_encoder", "model.layers.1.mlp.up_proj.weight")])
def test_missing_extra_and_misshaped_keys_name_file_and_key(comfy, tmp_path, part, key):
    _, _, paths = comfy
    load = {"dit": lambda p: native.load_dit_file(p, variant="turbo"), "vae": native.load_vae_file,
            "text_encoder": lambda p: native.load_text_encoder_file(p, None)}[part]
    cases = {"missing": lambda s: s.pop(key),
             "extra": lambda s: s.__setitem__(key.replace("weight", "bias"), torch.zeros(3)),
             "shape": lambda s: s.__setitem__(key, torch.zeros(3, 5))}
    for case, change in cases.items():
        bad = rewrite(paths[part], str(tmp_path / f"{case}.safetensors"), change)
        with pytest.raises(ValueError) as e:
            load(bad)
        message = str(e.value)
        named = key.replace("weight", "bias") if case == "extra" else key
        assert bad in message and named in message, (case, message)


def test_checkpoint_with_a_stray_key_is_rejected(comfy, tmp_path):
    _, _, paths = comfy
    bad = rewrite(paths["checkpoint"], str(tmp_path / "aio.safetensors"),
                  lambda s: s.__setitem__("first_stage_model.foo", torch.zeros(1)))
    with pytest.raises(ValueError, match=r"aio\.safetensors.*first_stage_model\.foo"):
        native.load_vae_file(bad)


def test_quantized_file_is_rejected_clearly(comfy, tmp_path):
    _, _, paths = comfy
    key = "decoder.layers.0.self_attn.q_proj.weight"
    bad = rewrite(paths["dit"], str(tmp_path / "fp8.safetensors"),
                  lambda s: s.__setitem__(key, s[key].to(torch.float8_e4m3fn)))
    with pytest.raises(ValueError, match="quantized.*bf16/fp16/fp32"):
        native.load_dit_file(bad, variant="turbo")


def test_variant_comes_from_the_name_or_must_be_given(comfy, tmp_path):
    _, _, paths = comfy
    assert native.variant_from_name("acestep_v1.5_xl_turbo_bf16.safetensors") == "turbo"
    assert native.variant_from_name("diffusion_models/acestep_v1.5_base.safetensors") == "base"
    assert native.variant_from_name("ace_step_1.5_sft_aio.safetensors") == "sft"
    assert native.variant_from_name("merge-sft-turbo-xl-ta-0.3.safetensors") is None
    assert native.variant_from_name("my_finetune.safetensors") is None
    renamed = str(tmp_path / "my_finetune.safetensors")
    shutil.copy(paths["dit"], renamed)
    with pytest.raises(ValueError, match="my_finetune.safetensors.*turbo, base or sft"):
        ModelSource.comfy(renamed)
    assert ModelSource.comfy(renamed, variant="base").config.variant == "base"
    assert not ModelSource.comfy(renamed, variant="base").config.is_turbo


# ----------------------------------------------------------------------------------------------------------------
# Recognising and listing files


def test_listing_recognises_each_kind_and_skips_other_files(comfy, tmp_path):
    _, _, paths = comfy
    models = os.path.dirname(os.path.dirname(paths["dit"]))
    decoys = tmp_path / "decoys"
    decoys.mkdir()
    (decoys / "notes.safetensors").write_bytes(b"not a safetensors file")
    save_file({"weight": torch.zeros(2)}, str(decoys / "other_model.safetensors"))
    # a Qwen3 language model (padded 151,936-token table) is not the ACE-Step text encoder
    save_file({"model.embed_tokens.weight": torch.zeros(151936, 1, dtype=torch.bool),
               "model.layers.0.self_attn.q_norm.weight": torch.zeros(1)}, str(decoys / "qwen_3_06b_base.safetensors"))
    nested = tmp_path / "nested" / "sub"
    nested.mkdir(parents=True)
    shutil.copy(paths["dit"], nested / "acestep_v1.5_turbo.safetensors")

    found = native.list_native_files([os.path.join(models, d) for d in os.listdir(models)] + [str(decoys)])
    kinds = {os.path.basename(f.path): f.kind for f in found}
    assert kinds == {os.path.basename(paths["dit"]): "dit", "ace_1.5_vae.safetensors": "vae",
                     "qwen_0.6b_ace15.safetensors": "text_encoder", os.path.basename(paths["checkpoint"]): "checkpoint"}
    aio = next(f for f in found if f.kind == "checkpoint")
    assert aio.provides == ("dit", "vae", "text_encoder") and aio.variant == "turbo"
    nested_names = [f.name for f in native.list_native_files([str(tmp_path / "nested")])]
    assert nested_names == ["sub/acestep_v1.5_turbo.safetensors"]
    assert [f.kind for f in native.list_native_files([os.path.join(models, "checkpoints"),
                                                      os.path.join(models, "vae")], ["vae"])] == ["vae", "checkpoint"]


def test_stable_audio_vae_is_not_listed(tmp_path):
    """Same Oobleck keys, but a 2048x hop: ComfyUI treats it as Stable Audio's, so must we."""
    from acestep_lora.vae import Oobleck

    cfg = {"encoder_hidden_size": 128, "encoder_channels": 4, "downsampling_ratios": [2, 4, 4, 8, 8],
           "channel_multiples": [1, 2, 4, 8, 16], "decoder_channels": 4, "decoder_input_channels": 64,
           "audio_channels": 2}
    state = {}
    for key, value in Oobleck(cfg).state_dict().items():
        module, param = key.rsplit(".", 1)
        if param == "weight":
            state[f"{module}.weight_g"], state[f"{module}.weight_v"] = value.flatten(1).norm(dim=1), value
        else:
            state[key] = value
    key_map = native.vae_key_map(cfg)
    save_file({key_map[k][0]: v.reshape(key_map[k][1]).contiguous() for k, v in state.items()},
              str(tmp_path / "stable_audio_vae.safetensors"))
    assert native.classify_file(str(tmp_path / "stable_audio_vae.safetensors")) is None
    assert native.load_vae_file(str(tmp_path / "stable_audio_vae.safetensors")).hop == 2048  # loadable on request


# ----------------------------------------------------------------------------------------------------------------
# The source abstraction


def checkpoint_fingerprint(checkpoint_dir: str, config_path: str) -> dict:
    """Prepare's cache key of the model before sources existed (prepare.py until the nodes took ComfyUI files):
    an official source's identity must stay equal, or every existing cache would be encoded again."""
    from acestep_lora.checkpoint import dit_identity, folder_identity, load_config

    cfg = load_config(checkpoint_dir, config_path)
    return {"config_path": os.path.basename(os.path.normpath(config_path)), "variant": cfg.variant,
            "is_turbo": cfg.is_turbo, "condition_width": (cfg.encoder_hidden_size or cfg.hidden_size),
            "dit": dit_identity(checkpoint_dir, config_path),
            "vae": folder_identity(os.path.join(checkpoint_dir, "vae")),
            "text_encoder": folder_identity(os.path.join(checkpoint_dir, "Qwen3-Embedding-0.6B"))}


def test_official_source_identity_equals_prepare_fingerprint(tiny_ckpt):
    source = ModelSource.official(tiny_ckpt, "acestep-v15-base")
    assert source.identity() == checkpoint_fingerprint(tiny_ckpt, "acestep-v15-base")
    assert source.variant == "base" and source.variant_origin == "config.json"
    assert source.name == "acestep-v15-base"


def test_comfy_source_describes_what_it_uses(comfy):
    config_path, _, paths = comfy
    source = ModelSource.comfy(checkpoint=paths["checkpoint"], tokenizer=["/nonexistent", paths["tokenizer"]])
    text = source.describe()
    assert paths["checkpoint"] in text and "variant 'turbo' from the file name" in text
    assert "derived from the VAE" in text and paths["tokenizer"] in text
    assert ("XL" in text) == ("xl" in config_path)
    identity = source.identity()
    assert identity["silence_latent"] == "derived from the VAE" and identity["source"] == "comfy"
    assert identity["condition_width"] == 64 and identity["variant"] == "turbo"


def test_comfy_source_identity_follows_file_contents(comfy, tmp_path):
    _, _, paths = comfy
    vae = str(tmp_path / "ace_1.5_vae.safetensors")
    shutil.copy(paths["vae"], vae)
    before = ModelSource.comfy(paths["dit"], vae).identity()
    rewrite(vae, vae, lambda s: s.__setitem__("decoder.layers.0.bias", s["decoder.layers.0.bias"] + 1))
    after = ModelSource.comfy(paths["dit"], vae).identity()
    assert before["vae"] != after["vae"] and before["dit"] == after["dit"]


def test_missing_tokenizer_and_wrong_kinds_fail_with_the_fix(comfy):
    _, _, paths = comfy
    source = ModelSource.comfy(paths["dit"], paths["vae"], paths["text_encoder"])
    with pytest.raises(FileNotFoundError, match="qwen25_tokenizer"):
        source.load_text_encoder()
    with pytest.raises(ValueError, match="diffusion_model .* is an ACE-Step 1.5 VAE file, not a diffusion model"):
        ModelSource.comfy(paths["vae"])
    with pytest.raises(ValueError, match="is an ACE-Step 1.5 all-in-one checkpoint file, not a VAE"):
        ModelSource.comfy(paths["dit"], vae=paths["checkpoint"])
    with pytest.raises(ValueError, match="no VAE"):
        ModelSource.comfy(paths["dit"]).load_vae()
    with pytest.raises(FileNotFoundError, match="vae file not found"):
        ModelSource.comfy(paths["dit"], vae=paths["vae"] + ".missing")


def test_official_folder_fills_missing_parts(comfy):
    config_path, root, paths = comfy
    source = ModelSource.comfy(paths["dit"], official_dir=root)
    assert source.load_vae().config == load_vae(root).config
    assert equal_states(source.load_text_encoder().model.state_dict(), load_text_encoder(root).model.state_dict())


def test_dropdown_choices_default_and_auto_resolution(comfy, tmp_path):
    config_path, root, paths = comfy
    models = os.path.dirname(os.path.dirname(paths["dit"]))
    folders = Folders(checkpoint_dir=root, diffusion_models=[os.path.join(models, "diffusion_models")],
                      checkpoints=[os.path.join(models, "checkpoints")], vae=[os.path.join(models, "vae")],
                      text_encoders=[os.path.join(models, "text_encoders")], tokenizer_dirs=[paths["tokenizer"]])
    choices = model_choices(folders)
    dit_choice = "diffusion_models/" + os.path.basename(paths["dit"])
    assert choices == ["acestep-v15-turbo", "acestep-v15-xl-turbo", dit_choice,
                       "checkpoints/" + os.path.basename(paths["checkpoint"])]
    assert default_model_choice(choices) == "acestep-v15-turbo"
    assert default_model_choice(choices[2:]) == choices[2]  # the split file before the all-in-one
    assert default_model_choice([]) is None
    assert part_choices(folders, "vae") == [AUTO, "vae/ace_1.5_vae.safetensors"]
    assert resolve_choice("acestep-v15-turbo", folders).kind == "official"
    source = resolve_choice(dit_choice, folders)
    assert source.vae_file == paths["vae"] and source.text_encoder_file == paths["text_encoder"]
    assert "VAE: " + paths["vae"] + " (auto)" in source.describe()
    only_native = Folders(**{**folders.__dict__, "checkpoint_dir": None, "vae": []})
    with pytest.raises(ValueError, match="no VAE"):
        resolve_choice(dit_choice, only_native).require("vae")
    assert resolve_choice("checkpoints/" + os.path.basename(paths["checkpoint"]), only_native).vae_file == \
        paths["checkpoint"]


# ----------------------------------------------------------------------------------------------------------------
# XL


def test_xl_shaped_decoder_trains_with_the_encoder_at_its_own_width():
    cfg = tiny_dit_config("xl-turbo")
    assert cfg.condition_width == 64 != cfg.hidden_size == 96 and cfg.family == "XL"
    model = AceStepModel(cfg)
    init_weights_(model, seed=0)
    gen = torch.Generator().manual_seed(1)
    states, mask = model.encoder(torch.randn(2, 9, 32, generator=gen), torch.ones(2, 9),
                                 torch.randn(2, 11, 32, generator=gen), torch.ones(2, 11),
                                 torch.zeros(2, 5, 64), torch.tensor([0, 1]))
    assert states.shape == (2, 9 + 11 + 1, 64)
    states = torch.where(torch.tensor([True, False])[:, None, None], states, model.null_condition_emb.expand_as(states))
    x0, noise = torch.randn(2, 13, 64, generator=gen), torch.randn(2, 13, 64, generator=gen)
    t = torch.tensor([0.3, 0.8])
    xt = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
    pred, _ = model.decoder(xt, t, t, encoder_hidden_states=states.detach(),
                            context_latents=torch.randn(2, 13, 128, generator=gen))
    loss = torch.nn.functional.mse_loss(pred, noise - x0)
    loss.backward()
    assert pred.shape == (2, 13, 64) and torch.isfinite(loss)
    assert model.decoder.condition_embedder.weight.grad.shape == (96, 64)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.layers[-1].parameters())


def test_xl_native_key_map_and_config_from_the_full_size_shapes():
    """ComfyUI's XL file has the official XL keys; the config derived from their shapes is the official one."""
    cfg = AceStepConfig(**XL_FIELDS)
    with torch.device("meta"):
        state = AceStepModel(cfg).state_dict()
    for prefix in ("", "model.diffusion_model."):
        view = {k: ("BF16", tuple(v.shape)) for k, v in state.items()}
        assert native.dit_key_map(state, prefix)["decoder.layers.31.mlp.down_proj.weight"] == \
            prefix + "decoder.layers.31.mlp.down_proj.weight"
        derived = native.dit_config_from_shapes(view, "turbo", "acestep_v1.5_xl_turbo_bf16.safetensors")
        assert {k: getattr(derived, k) for k in XL_FIELDS} == XL_FIELDS
        assert derived.head_dim == 128 and derived.family == "XL" and derived.text_hidden_dim == 1024


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_native_files_load_straight_onto_the_gpu(comfy):
    _, _, paths = comfy
    source = ModelSource.comfy(checkpoint=paths["checkpoint"], tokenizer=paths["tokenizer"])
    dit = source.load_dit(components=("decoder", "null_condition_emb"), device="cuda", dtype=torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in dit.parameters()} == {("cuda", torch.bfloat16)}
    assert source.load_vae(device="cuda").device.type == "cuda"
    silence = ModelSource.comfy(checkpoint=paths["checkpoint"]).load_silence_latent(device="cuda")
    cpu = ModelSource.comfy(checkpoint=paths["checkpoint"]).load_silence_latent()
    assert silence.device.type == "cuda" and torch.allclose(silence.cpu(), cpu, rtol=1e-4, atol=1e-5)
