"""The nodes' model inputs over ComfyUI's model folders (headless stand-ins, scripts/headless.py): what the
dropdowns list and which default a user with only ComfyUI's files, only the official folder, or both gets; the four
nodes (Create -> Collect -> Prepare -> Train) on ComfyUI's files alone, 2B- and XL-shaped, with the LoRA loading in
PEFT (the official app, kaola) and as the ComfyUI file; Train refusing tensors of another model; the variant a file
name does not say, chosen once in Prepare."""
import importlib
import json
import math
import os
import shutil
import warnings

import pytest
import torch

from acestep_lora.checkpoint import file_identity

DIT_2B, DIT_XL = "diffusion_models/acestep_v1.5_turbo.safetensors", "diffusion_models/acestep_v1.5_xl_turbo.safetensors"
AIO_2B = "checkpoints/ace_step_1.5_turbo_aio.safetensors"


def node(comfy, module, cls):
    return getattr(importlib.import_module(f"{comfy.pack.__name__}.nodes.{module}"), cls)


def install_comfy_files(comfy, comfy_models, parts=("diffusion_models", "checkpoints", "vae", "text_encoders")):
    """ComfyUI's files into the stand-in's models folders, and the Qwen tokenizer where ComfyUI ships it."""
    for part in parts:
        shutil.copytree(os.path.join(comfy_models, part), os.path.join(comfy.models, part), dirs_exist_ok=True)
    base = os.path.dirname(comfy.models)
    shutil.copytree(os.path.join(comfy_models, "qwen25_tokenizer"),
                    os.path.join(base, "comfy", "text_encoders", "qwen25_tokenizer"), dirs_exist_ok=True)


def model_inputs(comfy, node_id):
    spec = comfy.pack.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
    return {name: value for section in ("required", "optional") for name, value in spec[section].items()}


# ----------------------------------------------------------------------------------------------------------------
# Dropdowns and defaults


def test_only_comfyui_files_list_them_and_default_to_the_2b_turbo_file(comfy, comfy_models):
    install_comfy_files(comfy, comfy_models)
    for node_id in ("ACEStepLoRA_PrepareTrainingData", "ACEStepLoRA_Train"):
        inputs = model_inputs(comfy, node_id)
        choices, spec = inputs["config_path"]
        assert choices == [DIT_2B, DIT_XL, AIO_2B, "checkpoints/ace_step_1.5_xl_turbo_aio.safetensors"], node_id
        assert spec["default"] == DIT_2B, node_id  # no path to type
    prepare = model_inputs(comfy, "ACEStepLoRA_PrepareTrainingData")
    assert prepare["vae"][0] == ["auto", "vae/ace_1.5_vae.safetensors"] and prepare["vae"][1]["default"] == "auto"
    assert prepare["text_encoder"][0] == ["auto", "text_encoders/qwen_0.6b_ace15.safetensors"]
    assert prepare["variant"][0] == ["auto", "turbo", "base", "sft"] and prepare["variant"][1]["advanced"]
    assert "vae" not in model_inputs(comfy, "ACEStepLoRA_Train")  # Train reads the DiT alone


def test_only_an_all_in_one_file_is_a_working_default(comfy, comfy_models):
    install_comfy_files(comfy, comfy_models, parts=("checkpoints",))
    choices, spec = model_inputs(comfy, "ACEStepLoRA_PrepareTrainingData")["config_path"]
    assert spec["default"] == AIO_2B and choices[0] == AIO_2B


def test_official_folder_and_comfyui_files_default_to_the_official_folder(comfy, comfy_models, comfy_official):
    install_comfy_files(comfy, comfy_models)
    os.symlink(comfy_official, os.path.join(comfy.models, "Ace-Step1.5"))
    choices, spec = model_inputs(comfy, "ACEStepLoRA_Train")["config_path"]
    assert choices[:2] == ["acestep-v15-turbo", "acestep-v15-xl-turbo"] and DIT_XL in choices
    assert spec["default"] == "acestep-v15-turbo"


# ----------------------------------------------------------------------------------------------------------------
# The four nodes on ComfyUI's files alone


def tone(seconds, freq, rate=44100):
    t = torch.arange(int(seconds * rate)) / rate
    wave = 0.3 * torch.sin(2 * math.pi * freq * t) * (1 + 0.5 * torch.sin(2 * math.pi * 2 * t))
    return {"waveform": torch.stack([wave, wave]).unsqueeze(0), "sample_rate": rate}


def four_nodes(comfy, model, run="runs/native_lora", **prepare_kw):
    """Create x2 (chained) -> Collect -> Prepare -> Train, as ComfyUI runs them (under inference mode)."""
    create, collect = node(comfy, "samples", "CreateTrainingSample")(), node(comfy, "samples",
                                                                            "CollectTrainingSamples")()
    with torch.inference_mode():
        (first,) = create.create(audio=tone(1.2, 220.0), caption="warm synth pads", output_dir="samples", bpm=100)
        (second,) = create.create(audio=tone(1.6, 330.0), caption="bright synth lead", output_dir="samples", bpm=120,
                                  previous=first)
        lists = collect.collect(samples_dir="samples", sample_info=second)
        names = node(comfy, "samples", "CollectTrainingSamples").RETURN_NAMES
        prepared = node(comfy, "prepare", "PrepareTrainingData")().prepare(
            **dict(zip(names, lists)), output_dir="tensors", checkpoint_dir=os.path.join(comfy.models, "Ace-Step1.5"),
            config_path=model, device="cpu", custom_tag="mystyle", **prepare_kw)
        trained = node(comfy, "train", "TrainLoRA")().train(**train_inputs(comfy, prepared["result"][0], model, run))
    return prepared, trained


def train_inputs(comfy, tensor_dir, model, run, **kw):
    return dict(tensor_dir=tensor_dir, checkpoint_dir=os.path.join(comfy.models, "Ace-Step1.5"), config_path=model,
                output_dir=run, lora_rank=4, lora_alpha=8, lora_dropout=0.0, learning_rate=1e-3, train_epochs=2,
                batch_size=1, gradient_accumulation=1, save_every_n_epochs=0, seed=1, resume_from="",
                target_modules="q_proj,k_proj,v_proj,o_proj", device="cpu", warmup_steps=0, unique_id="9",
                preview_seconds=1.0, preview_count=1, **kw)


def decoder_inputs(cfg, frames=13, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, frames, 64, generator=g), timestep=torch.tensor([0.5]),
                timestep_r=torch.tensor([0.5]), encoder_hidden_states=torch.randn(1, tokens, cfg.condition_width,
                                                                                  generator=g),
                context_latents=torch.randn(1, frames, 128, generator=g))


@pytest.mark.parametrize("model,family", [(DIT_2B, "2B"), (DIT_XL, "XL")])
def test_four_nodes_on_comfyui_files_alone(comfy, comfy_models, model, family, capsys):
    from peft import PeftModel

    from acestep_lora.lora_io import merge_lora_, read_comfy_lora, read_lora
    from acestep_lora.native import load_dit_file

    install_comfy_files(comfy, comfy_models)
    prepared, trained = four_nodes(comfy, model)
    tensor_dir, status = prepared["result"]
    dit_file = os.path.join(comfy.models, *model.split("/"))
    # Prepare says which files it used and what it derived
    assert f"Model: ACE-Step 1.5 {family} turbo" in status and f"diffusion model: {dit_file}" in status
    assert "VAE: " + os.path.join(comfy.models, "vae", "ace_1.5_vae.safetensors") + " (auto)" in status
    assert "tokenizer: " + os.path.join(os.path.dirname(comfy.models), "comfy", "text_encoders",
                                        "qwen25_tokenizer") in status
    assert "silence latent: derived from the VAE" in status and "2 encoded" in status
    manifest = json.load(open(os.path.join(tensor_dir, "manifest.json")))
    assert manifest["checkpoint"]["dit"] == file_identity(dit_file) and manifest["checkpoint"]["source"] == "comfy"
    # Train: the LoRA, with the metadata a LoRA from the official folder carries
    lora_info, log, previews = trained["result"]
    assert f"model: ACE-Step 1.5 {family} turbo" in log and dit_file in log
    # previews from the same files (VAE and text encoder found beside them): the LoRA off, then after epoch 2
    assert previews["sample_rate"] == 48000 and previews["waveform"].shape == (1, 2, 48000)
    assert [(e["epoch"], e["base"]) for e in trained["ui"]["acestep_lora_previews"]] == [(0, True), (2, False)]
    assert lora_info["config_path"] == model and lora_info["steps"] == 4
    _, meta = read_comfy_lora(lora_info["comfy_lora_path"])
    assert meta["acestep_lora.base_config"] == os.path.basename(model)
    assert (meta["acestep_lora.variant"], meta["acestep_lora.trigger_tag"], meta["acestep_lora.rank"]) == \
        ("turbo", "mystyle", "4")
    # It loads in PEFT (the official app, kaola) and as the ComfyUI file, and both act the same on the model
    source_model = load_dit_file(dit_file, components=("decoder",))
    inputs = decoder_inputs(source_model.config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(load_dit_file(dit_file, components=("decoder",)).decoder,
                                               lora_info["path"]).eval()
    assert [str(w.message) for w in caught] == []
    merged = source_model.decoder
    weights = read_lora(lora_info["comfy_lora_path"])
    assert len(weights.pairs) == source_model.config.num_hidden_layers * 8
    merge_lora_(merged, weights)
    with torch.no_grad():
        via_peft, via_comfy_file = peft_model.get_base_model()(**inputs)[0], merged(**inputs)[0]
        plain = load_dit_file(dit_file, components=("decoder",)).decoder(**inputs)[0]
    assert (via_peft - plain).abs().max() > 1e-4  # the LoRA does something
    assert torch.allclose(via_comfy_file, via_peft, rtol=1e-3, atol=1e-4)  # the ComfyUI file is bf16


def test_train_refuses_tensors_prepared_with_another_model(comfy, comfy_models, comfy_official):
    install_comfy_files(comfy, comfy_models)
    os.symlink(comfy_official, os.path.join(comfy.models, "Ace-Step1.5"))
    prepared, _ = four_nodes(comfy, DIT_2B)
    tensor_dir = prepared["result"][0]
    train = node(comfy, "train", "TrainLoRA")()
    for other, said in ((DIT_XL, "'acestep_v1.5_xl_turbo'"), ("acestep-v15-turbo", "'acestep-v15-turbo'"),
                        (AIO_2B, "'ace_step_1.5_turbo_aio'")):
        with pytest.raises(ValueError, match="prepared with config_path 'acestep_v1.5_turbo'") as error, \
                torch.inference_mode():
            train.train(**train_inputs(comfy, tensor_dir, other, "runs/other"))
        assert said in str(error.value), str(error.value)


def test_variant_a_file_name_does_not_say_is_chosen_once_in_prepare(comfy, comfy_models):
    install_comfy_files(comfy, comfy_models, parts=("vae", "text_encoders"))
    folder = os.path.join(comfy.models, "diffusion_models")
    os.makedirs(folder)
    shutil.copy(os.path.join(comfy_models, *DIT_2B.split("/")), os.path.join(folder, "my_finetune.safetensors"))
    with pytest.raises(ValueError, match="my_finetune.safetensors.*turbo, base or sft.*Choose the variant"):
        four_nodes(comfy, "diffusion_models/my_finetune.safetensors")
    prepared, trained = four_nodes(comfy, "diffusion_models/my_finetune.safetensors", variant="base")
    assert "variant 'base' from the variant input" in prepared["result"][1]
    lora_info, log, _ = trained["result"]
    assert "variant 'base' from Prepare's variant input (the same file)" in log
    assert "logit_normal timesteps" in log  # base trains as base
