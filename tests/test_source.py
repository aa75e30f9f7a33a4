"""acestep_lora/source.py from the command line's side: config_path / vae / text_encoder as file paths (or with
ComfyUI's models folder as checkpoint_dir), the tokenizer of the ComfyUI install a file sits in, and every wrong
choice refused with the input, the value and the fix. (The nodes' dropdowns: tests/test_nodes_models.py; key maps,
loading and parity: tests/test_native.py.)"""
import os
import shutil

import pytest
import soundfile as sf
from safetensors.torch import load_file, save_file

from acestep_lora.__main__ import main
from acestep_lora.options import PrepareSettings, TrainConfig
from acestep_lora.source import Folders, comfy_tokenizer_near, from_config, resolve_choice
from acestep_lora.vae import load_vae

from test_prepare import tone


@pytest.fixture()
def comfyui(comfy_models, tmp_path):
    """A ComfyUI install's folders: ComfyUI/models/{diffusion_models,checkpoints,vae,text_encoders} and the
    tokenizer it ships in ComfyUI/comfy/text_encoders/qwen25_tokenizer."""
    root = tmp_path / "ComfyUI"
    for part in ("diffusion_models", "checkpoints", "vae", "text_encoders"):
        shutil.copytree(os.path.join(comfy_models, part), root / "models" / part)
    shutil.copytree(os.path.join(comfy_models, "qwen25_tokenizer"), root / "comfy" / "text_encoders" /
                    "qwen25_tokenizer")
    return root


def test_models_folder_as_checkpoint_dir_finds_the_parts_and_the_tokenizer(comfyui):
    models = str(comfyui / "models")
    source = from_config(PrepareSettings(models, "diffusion_models/acestep_v1.5_xl_turbo.safetensors"))
    assert source.kind == "comfy" and source.config.family == "XL" and source.variant == "turbo"
    assert source.vae_file == str(comfyui / "models" / "vae" / "ace_1.5_vae.safetensors")
    assert source.text_encoder_file == str(comfyui / "models" / "text_encoders" / "qwen_0.6b_ace15.safetensors")
    assert source.tokenizer_dir() == str(comfyui / "comfy" / "text_encoders" / "qwen25_tokenizer")
    assert comfy_tokenizer_near(source.text_encoder_file) == source.tokenizer_dir()
    assert source.load_text_encoder().tokenizer("la la").input_ids[-1] == source.load_text_encoder().tokenizer.\
        convert_tokens_to_ids("<|endoftext|>")
    # absolute paths need no checkpoint_dir; an all-in-one file brings its VAE and text encoder
    aio = str(comfyui / "models" / "checkpoints" / "ace_step_1.5_turbo_aio.safetensors")
    source = from_config(TrainConfig("t", "", "o", config_path=aio))
    assert source.vae_file == source.text_encoder_file == source.dit_file == aio


def test_cli_prepares_and_trains_from_comfyui_files(comfyui, tmp_path, capsys):
    songs = tmp_path / "songs"
    songs.mkdir()
    for i, seconds in enumerate((1.0, 1.4)):
        sf.write(str(songs / f"s{i}.wav"), tone(seconds, seed=i).T.numpy(), 48000)
        (songs / f"s{i}_caption.txt").write_text(f"synth groove {i}")
    models = str(comfyui / "models")
    assert main(["prepare", "--samples-dir", str(songs), "--output-dir", str(tmp_path / "t"), "--checkpoint-dir",
                 models, "--config-path", "diffusion_models/acestep_v1.5_turbo.safetensors", "--vae",
                 "vae/ace_1.5_vae.safetensors", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Model: ACE-Step 1.5 2B turbo" in out and "qwen25_tokenizer" in out
    assert "ace_1.5_vae.safetensors\n" in out  # chosen, so not marked (auto)
    assert main(["train", "--tensor-dir", str(tmp_path / "t"), "--checkpoint-dir", "", "--output-dir",
                 str(tmp_path / "run"), "--config-path", os.path.join(models, "diffusion_models",
                                                                      "acestep_v1.5_turbo.safetensors"),
                 "--epochs", "1", "--rank", "4", "--device", "cpu"]) == 0
    assert os.path.isfile(tmp_path / "run" / "final" / "adapter" / "adapter_model.safetensors")
    # the diffusion-model file alone trains; previews (on by default) need its VAE and text encoder: said, not fatal
    said = capsys.readouterr()
    assert "previews: off for this run: no VAE" in said.out + said.err
    assert not os.path.exists(tmp_path / "run" / "previews")


def folders_of(root):
    models = root / "models"
    return Folders(diffusion_models=[str(models / "diffusion_models")], checkpoints=[str(models / "checkpoints")],
                   vae=[str(models / "vae")], text_encoders=[str(models / "text_encoders")])


@pytest.mark.parametrize("model,kw,error,message", [
    ("acestep-v15-turbo", dict(vae="vae/ace_1.5_vae.safetensors"), ValueError,
     r"config_path 'acestep-v15-turbo' is an official folder: it brings its own VAE.*set vae and text_encoder to auto"),
    ("acestep-v15-turbo", dict(variant="base"), ValueError,
     r"variant 'base' contradicts acestep-v15-turbo/config.json \('turbo'\).*set variant to auto"),
    ("acestep-v15-sft", {}, FileNotFoundError,
     r"(?s)config_path 'acestep-v15-sft'.*does not exist.*Or use ComfyUI's ACE-Step 1.5 files"),
    ("vae/ace_1.5_vae.safetensors", {}, ValueError,
     r"config_path 'vae/ace_1.5_vae.safetensors' is an ACE-Step 1.5 VAE file; choose a diffusion model"),
    ("diffusion_models/acestep_v1.5_base.safetensors", {}, FileNotFoundError,
     r"config_path 'diffusion_models/acestep_v1.5_base.safetensors' was not found.*refresh the node"),
    ("diffusion_models/acestep_v1.5_turbo.safetensors", dict(text_encoder="vae/ace_1.5_vae.safetensors"),
     ValueError, r"text_encoder .*ace_1.5_vae.safetensors' is an ACE-Step 1.5 VAE file, not a text encoder"),
    ("diffusion_models/acestep_v1.5_turbo.safetensors", dict(variant="fast"), ValueError,
     r"variant 'fast' is not one of \['auto', 'turbo', 'base', 'sft'\]"),
    ("", {}, ValueError, "config_path is empty"),
])
def test_wrong_choices_name_the_input_the_value_and_the_fix(comfyui, comfy_official, model, kw, error, message):
    folders = folders_of(comfyui)
    folders.checkpoint_dir = comfy_official
    with pytest.raises(error, match=message):
        resolve_choice(model, folders, **kw)


def test_a_tokenizer_that_does_not_fit_the_text_encoder_is_named(comfyui, tmp_path):
    """ComfyUI's real tokenizer knows ~151k tokens; a text encoder with a smaller table would index past it."""
    path = comfyui / "models" / "text_encoders" / "qwen_0.6b_ace15.safetensors"
    state = load_file(str(path))
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:100].contiguous()
    save_file(state, str(path))
    source = resolve_choice("diffusion_models/acestep_v1.5_turbo.safetensors", folders_of(comfyui))
    with pytest.raises(ValueError, match=r"knows \d+ tokens, the text encoder .* only 100: they do not belong"):
        source.load_text_encoder()


def test_official_folder_fills_what_comfyui_files_lack(comfyui, comfy_official):
    """A diffusion-model file alone, with the official download beside it: VAE and text encoder from there."""
    folders = Folders(diffusion_models=[str(comfyui / "models" / "diffusion_models")], checkpoint_dir=comfy_official)
    source = resolve_choice("diffusion_models/acestep_v1.5_turbo.safetensors", folders)
    assert source.vae_file is None and source.text_encoder_file is None
    text = source.describe()
    assert f"VAE: {comfy_official}/vae (auto: no VAE file found, the official folder's)" in text
    assert source.load_vae().config == load_vae(comfy_official).config
