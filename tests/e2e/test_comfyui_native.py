"""End-to-end on a real ComfyUI server holding only ComfyUI's own ACE-Step 1.5 files (no official folder): the
model dropdowns list them and default to the 2B turbo file, the four nodes train from them with no path typed,
and ComfyUI's own UNETLoader loads that same file and applies the LoRA with LoraLoaderModelOnly at strength 1.0
(no "lora key not loaded", every targeted weight patched by (alpha/rank)·B·A). The same for an XL-shaped file.

The files are tiny but in ComfyUI's formats and shapes its detection accepts (``comfy_compatible_config`` in
test_comfyui_server.py; the XL one is wider than its condition encoder, as the XL models are): the DiT as
``diffusion_models/acestep_v1.5_{turbo,xl_turbo}.safetensors`` (fp32, so the patch check is exact), the VAE as
``vae/ace_1.5_vae.safetensors`` (stable-audio-tools layout), the text encoder as
``text_encoders/qwen_0.6b_ace15.safetensors`` with Qwen3-Embedding's 151,669-token table, so the tokenizer
ComfyUI ships (comfy/text_encoders/qwen25_tokenizer) is the one Prepare uses. Skipped without ``COMFYUI_DIR``;
see tests/e2e/README.md.
"""
from __future__ import annotations

import os
import sys

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
if not COMFYUI_DIR or not os.path.isfile(os.path.join(COMFYUI_DIR, "main.py")):
    pytest.skip("COMFYUI_DIR is not set to a ComfyUI checkout (folder with main.py)", allow_module_level=True)

import json  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_comfyui_server import (ALPHA, COLLECT, CREATE, PREPARE, RANK, TRAIN, TRAIN_SETTINGS,  # noqa: E402
                                 build_training_prompt, check_lora_applied, comfy_compatible_config,
                                 launch_server, write_clips)

DIT_2B, DIT_XL = "acestep_v1.5_turbo.safetensors", "acestep_v1.5_xl_turbo.safetensors"
QWEN3_EMBEDDING_ROWS = 151669


def xl_compatible_config():
    """A tiny XL: the DiT (256 wide) wider than its condition encoder (128), with every size ComfyUI hard-codes
    kept (see comfy_compatible_config); ComfyUI 0.20.1 detects encoder_hidden_size and the rest from the shapes."""
    from acestep_lora.testing import tiny_dit_config

    base = comfy_compatible_config()
    fields = {k: getattr(base, k) for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                            "head_dim", "text_hidden_dim", "timbre_hidden_dim",
                                            "num_lyric_encoder_hidden_layers", "num_timbre_encoder_hidden_layers",
                                            "num_attention_pooler_hidden_layers", "fsq_dim")}
    return tiny_dit_config("xl-turbo", hidden_size=256, intermediate_size=768, encoder_hidden_size=128,
                           encoder_intermediate_size=384, encoder_num_attention_heads=16,
                           encoder_num_key_value_heads=8, sliding_window=128, **fields)


def write_comfy_files(models):
    """The DiTs, the VAE and the text encoder in ComfyUI's formats, written by this pack's converter (native.py)."""
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3Model

    from acestep_lora import native
    from acestep_lora.model import AceStepModel
    from acestep_lora.testing import init_weights_, write_vae

    configs = {DIT_2B: comfy_compatible_config(), DIT_XL: xl_compatible_config()}
    configs[DIT_2B].sliding_window = 128  # what a ComfyUI file means (native.unrepresentable_fields)
    for seed, (name, cfg) in enumerate(configs.items()):
        model = AceStepModel(cfg)
        init_weights_(model, seed)
        state = model.state_dict()
        save_file({key: state[k].contiguous() for k, key in native.dit_key_map(state).items()},
                  os.path.join(models, "diffusion_models", name))
    with tempfile.TemporaryDirectory() as official:
        write_vae(os.path.join(official, "vae"), seed=2)
        os.makedirs(os.path.join(models, "vae"), exist_ok=True)
        save_file(native.comfy_vae_state(official), os.path.join(models, "vae", native.COMFY_VAE_NAME))
    torch.manual_seed(3)
    text = Qwen3Model(Qwen3Config(vocab_size=QWEN3_EMBEDDING_ROWS, hidden_size=1024, intermediate_size=1024,
                                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                                  rope_theta=1_000_000.0, tie_word_embeddings=True))
    state = {native.TEXT_MODEL_PREFIX + k: v.to(torch.bfloat16).contiguous() for k, v in text.state_dict().items()}
    os.makedirs(os.path.join(models, "text_encoders"), exist_ok=True)
    save_file(state, os.path.join(models, "text_encoders", native.COMFY_TEXT_ENCODER_NAME))
    return configs


@pytest.fixture(scope="module")
def native_server(tmp_path_factory, request):
    made = {}
    srv = launch_server(tmp_path_factory, request, "comfyui_native",
                        lambda base: made.update(write_comfy_files(os.path.join(base, "models"))))
    srv.configs = made
    return srv


def test_dropdowns_list_comfyui_files_and_default_to_the_2b_turbo(native_server):
    info = native_server.get("/object_info")
    for node in (PREPARE, TRAIN):
        choices, spec = info[node]["input"]["required"]["config_path"]
        assert choices == [f"diffusion_models/{DIT_2B}", f"diffusion_models/{DIT_XL}"], (node, choices)
        assert spec["default"] == f"diffusion_models/{DIT_2B}", node
    optional = info[PREPARE]["input"]["optional"]
    assert optional["vae"][0] == ["auto", "vae/ace_1.5_vae.safetensors"]
    assert optional["text_encoder"][0] == ["auto", "text_encoders/qwen_0.6b_ace15.safetensors"]
    print(f"config_path: {choices} (default {spec['default']}); vae: {optional['vae'][0]}; text_encoder: "
          f"{optional['text_encoder'][0]}")


def train_through_the_server(server, model, run, clips=None):
    """The four nodes with config_path = the dropdown's default or ``model``, nothing else about the model given."""
    prompt = build_training_prompt(clips or write_clips(server.input, 2))
    prepare, train = (next(k for k, v in prompt.items() if v["class_type"] == kind) for kind in (PREPARE, TRAIN))
    for node in (prepare, train):
        prompt[node]["inputs"].update(checkpoint_dir="", config_path=f"diffusion_models/{model}")
    prompt[prepare]["inputs"]["output_dir"] = f"acestep_lora/tensors_{run}"
    prompt[train]["inputs"].update(output_dir=f"acestep_lora/runs/{run}", **TRAIN_SETTINGS)
    prompt["900"] = {"class_type": "PreviewAny", "inputs": {"source": [train, 0]}}
    prompt["901"] = {"class_type": "PreviewAny", "inputs": {"source": [train, 1]}}
    entry = server.wait(server.submit(prompt))
    outputs = entry["outputs"]
    status, info, log = outputs[prepare]["text"][0], json.loads(outputs["900"]["text"][0]), outputs["901"]["text"][0]
    return status, info, log


@pytest.mark.parametrize("model,family", [(DIT_2B, "2B"), (DIT_XL, "XL")])
def test_four_nodes_train_from_comfyui_files_and_the_lora_applies_on_the_same_file(native_server, model, family):
    assert {CREATE, COLLECT} <= set(native_server.get("/object_info"))
    status, info, log = train_through_the_server(native_server, model, f"native_{family}")
    models = native_server.models
    assert f"Model: ACE-Step 1.5 {family} turbo" in status, status
    assert os.path.join(models, "diffusion_models", model) in status
    assert "VAE: " + os.path.join(models, "vae", "ace_1.5_vae.safetensors") + " (auto)" in status
    tokenizer = next(line for line in status.splitlines() if line.strip().startswith("tokenizer: "))
    assert tokenizer.rstrip().endswith(os.path.join("comfy", "text_encoders", "qwen25_tokenizer")), tokenizer
    assert "silence latent: derived from the VAE" in status
    assert f"model: ACE-Step 1.5 {family} turbo" in log and info["rank"] == RANK and info["alpha"] == ALPHA
    print(f"{family}: Prepare used\n{status[status.index('Model:'):status.index('silence latent')]}")
    cfg = native_server.configs[model]
    base_file = os.path.join(models, "diffusion_models", model)
    print(check_lora_applied(native_server, model, base_file, info["comfy_lora_name"], info["comfy_lora_path"],
                             cfg, f"e2e_native/{family}"))
