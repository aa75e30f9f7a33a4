"""Loaders find the official layout and fail with messages that name the missing piece and show the layout."""
import json
import os
import shutil

import pytest
import torch

from acestep_lora import list_dit_configs, load_dit, load_silence_latent, load_text_encoder, load_vae
from acestep_lora.checkpoint import dit_identity
from acestep_lora.testing import make_tiny_checkpoint


@pytest.fixture()
def ckpt_copy(tiny_ckpt, tmp_path):
    dst = tmp_path / "checkpoints"
    shutil.copytree(tiny_ckpt, dst)
    return str(dst)


def test_lists_dit_folders(tiny_ckpt):
    assert list_dit_configs(tiny_ckpt) == ["acestep-v15-base", "acestep-v15-turbo"]
    assert list_dit_configs("/nonexistent") == []


def test_loads_every_part(tiny_ckpt):
    model = load_dit(tiny_ckpt, "acestep-v15-base")
    assert model.config.variant == "base" and not model.config.is_turbo
    assert all(not p.requires_grad for p in model.parameters())
    assert load_silence_latent(tiny_ckpt, "acestep-v15-turbo").shape[::2] == (1, 64)
    assert load_vae(tiny_ckpt).hop == 1920
    assert load_text_encoder(tiny_ckpt).model.config.hidden_size == 32


def test_components_subset_reads_only_decoder(tiny_ckpt):
    model = load_dit(tiny_ckpt, "acestep-v15-turbo", components=("decoder", "null_condition_emb"))
    assert model.encoder is None
    assert not any(p.is_meta for p in model.parameters())


def test_dtype_conversion(tiny_ckpt):
    model = load_dit(tiny_ckpt, "acestep-v15-turbo", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_checkpoint_dir_shows_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_dit(str(tmp_path / "nope"), "acestep-v15-turbo")
    assert "checkpoint_dir" in str(e.value) and "acestep-v15-turbo/{config.json" in str(e.value)


def test_unknown_config_path_lists_found_folders(tiny_ckpt):
    with pytest.raises(FileNotFoundError) as e:
        load_dit(tiny_ckpt, "acestep-v15-sft")
    msg = str(e.value)
    assert "acestep-v15-sft" in msg and "acestep-v15-base, acestep-v15-turbo" in msg


def test_empty_config_path(tiny_ckpt):
    with pytest.raises(ValueError, match="config_path is empty"):
        load_dit(tiny_ckpt, "")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "silence_latent.pt"])
def test_missing_dit_file_named(ckpt_copy, name):
    os.remove(os.path.join(ckpt_copy, "acestep-v15-turbo", name))
    with pytest.raises(FileNotFoundError) as e:
        load_dit(ckpt_copy, "acestep-v15-turbo")
        load_silence_latent(ckpt_copy, "acestep-v15-turbo")
    assert name in str(e.value) and "Expected layout" in str(e.value)


def test_missing_vae_and_text_encoder_named(ckpt_copy):
    shutil.rmtree(os.path.join(ckpt_copy, "vae"))
    with pytest.raises(FileNotFoundError, match=r"VAE folder not found.*vae"):
        load_vae(ckpt_copy)
    os.remove(os.path.join(ckpt_copy, "Qwen3-Embedding-0.6B", "config.json"))
    with pytest.raises(FileNotFoundError, match=r"Text encoder config file not found"):
        load_text_encoder(ckpt_copy)


@pytest.mark.parametrize("name,message", [("model.safetensors", "Text encoder weights"),
                                          ("tokenizer.json", "Text encoder tokenizer")])
def test_text_encoder_files_named(ckpt_copy, name, message):
    os.remove(os.path.join(ckpt_copy, "Qwen3-Embedding-0.6B", name))
    with pytest.raises(FileNotFoundError, match=f"{message} file not found.*{name}"):
        load_text_encoder(ckpt_copy)


def test_config_that_does_not_match_weights(ckpt_copy):
    path = os.path.join(ckpt_copy, "acestep-v15-turbo", "config.json")
    cfg = json.load(open(path))
    cfg["num_hidden_layers"] = 3
    cfg.pop("layer_types")
    json.dump(cfg, open(path, "w"))
    with pytest.raises(ValueError, match="missing keys"):
        load_dit(ckpt_copy, "acestep-v15-turbo")
    cfg["num_hidden_layers"] = 2
    cfg["intermediate_size"] = 96
    json.dump(cfg, open(path, "w"))
    with pytest.raises(ValueError, match="has shape"):
        load_dit(ckpt_copy, "acestep-v15-turbo")


def test_identity_changes_with_weights(ckpt_copy, tmp_path):
    before = dit_identity(ckpt_copy, "acestep-v15-turbo")
    assert before == dit_identity(ckpt_copy, "acestep-v15-turbo")
    other = make_tiny_checkpoint(str(tmp_path / "other"), seed=7)
    shutil.copy(os.path.join(other, "acestep-v15-turbo", "model.safetensors"),
                os.path.join(ckpt_copy, "acestep-v15-turbo", "model.safetensors"))
    assert dit_identity(ckpt_copy, "acestep-v15-turbo") != before
