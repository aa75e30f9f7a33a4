"""Loaders find the official layout and fail with messages that name the missing piece and show the layout."""
import json
import os
import shutil

import pytest
import torch

from acestep_lora import list_dit_configs, load_dit, load_silence_latent, load_text_encoder, load_vae
from acestep_lora.checkpoint import dit_identity
from acestep_lora.config import AceStepConfig
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


# ----------------------------------------------------------------------------------------------------------------
# XL


def spec_keys(h: int, heads: int, kv: int, inter: int, layers: int, enc: int, enc_heads: int, enc_kv: int,
              enc_inter: int, head_dim: int = 128) -> dict:
    """Key -> shape of the official model, written out from the spec's list (spec §2.1), independently of
    acestep_lora.model; the DiT at width ``h``, the condition encoder / tokenizer / detokenizer at ``enc``."""
    keys = {}

    def attn(prefix, width, nq, nkv):
        keys.update({f"{prefix}.q_proj.weight": (nq * head_dim, width),
                     f"{prefix}.k_proj.weight": (nkv * head_dim, width),
                     f"{prefix}.v_proj.weight": (nkv * head_dim, width),
                     f"{prefix}.o_proj.weight": (width, nq * head_dim),
                     f"{prefix}.q_norm.weight": (head_dim,), f"{prefix}.k_norm.weight": (head_dim,)})

    def mlp(prefix, width, hidden):
        keys.update({f"{prefix}.gate_proj.weight": (hidden, width), f"{prefix}.up_proj.weight": (hidden, width),
                     f"{prefix}.down_proj.weight": (width, hidden)})

    def enc_layer(prefix):
        attn(prefix + ".self_attn", enc, enc_heads, enc_kv)
        mlp(prefix + ".mlp", enc, enc_inter)
        keys.update({prefix + ".input_layernorm.weight": (enc,), prefix + ".post_attention_layernorm.weight": (enc,)})

    for i in range(layers):
        p = f"decoder.layers.{i}"
        keys.update({f"{p}.{n}.weight": (h,) for n in ("self_attn_norm", "cross_attn_norm", "mlp_norm")})
        attn(p + ".self_attn", h, heads, kv)
        attn(p + ".cross_attn", h, heads, kv)  # keys/values from the context after condition_embedder (width h)
        mlp(p + ".mlp", h, inter)
        keys[p + ".scale_shift_table"] = (1, 6, h)
    keys.update({"decoder.proj_in.1.weight": (h, 192, 2), "decoder.proj_in.1.bias": (h,),
                 "decoder.condition_embedder.weight": (h, enc), "decoder.condition_embedder.bias": (h,),
                 "decoder.norm_out.weight": (h,), "decoder.proj_out.1.weight": (h, 64, 2),
                 "decoder.proj_out.1.bias": (64,), "decoder.scale_shift_table": (1, 2, h)})
    for te in ("time_embed", "time_embed_r"):
        keys.update({f"decoder.{te}.linear_1.weight": (h, 256), f"decoder.{te}.linear_1.bias": (h,),
                     f"decoder.{te}.linear_2.weight": (h, h), f"decoder.{te}.linear_2.bias": (h,),
                     f"decoder.{te}.time_proj.weight": (6 * h, h), f"decoder.{te}.time_proj.bias": (6 * h,)})
    keys.update({"encoder.text_projector.weight": (enc, 1024), "encoder.lyric_encoder.embed_tokens.weight": (enc, 1024),
                 "encoder.lyric_encoder.embed_tokens.bias": (enc,), "encoder.lyric_encoder.norm.weight": (enc,),
                 "encoder.timbre_encoder.embed_tokens.weight": (enc, 64),
                 "encoder.timbre_encoder.embed_tokens.bias": (enc,),
                 "encoder.timbre_encoder.norm.weight": (enc,), "encoder.timbre_encoder.special_token": (1, 1, enc)})
    for i in range(8):
        enc_layer(f"encoder.lyric_encoder.layers.{i}")
    for i in range(4):
        enc_layer(f"encoder.timbre_encoder.layers.{i}")
    keys.update({"tokenizer.audio_acoustic_proj.weight": (enc, 64), "tokenizer.audio_acoustic_proj.bias": (enc,),
                 "tokenizer.attention_pooler.embed_tokens.weight": (enc, enc),
                 "tokenizer.attention_pooler.embed_tokens.bias": (enc,),
                 "tokenizer.attention_pooler.norm.weight": (enc,),
                 "tokenizer.attention_pooler.special_token": (1, 1, enc),
                 "tokenizer.quantizer.project_in.weight": (6, enc), "tokenizer.quantizer.project_in.bias": (6,),
                 "tokenizer.quantizer.project_out.weight": (enc, 6), "tokenizer.quantizer.project_out.bias": (enc,)})
    for i in range(2):
        enc_layer(f"tokenizer.attention_pooler.layers.{i}")
        enc_layer(f"detokenizer.layers.{i}")
    keys.update({"detokenizer.embed_tokens.weight": (enc, enc), "detokenizer.embed_tokens.bias": (enc,),
                 "detokenizer.norm.weight": (enc,), "detokenizer.special_tokens": (1, 5, enc),
                 "detokenizer.proj_out.weight": (64, enc), "detokenizer.proj_out.bias": (64,),
                 "null_condition_emb": (1, 1, enc)})
    return keys


def test_full_size_xl_key_set_shapes_and_parameter_count():
    """The official XL config (config.XL_FIELDS) on the meta device: every key and shape the spec gives, 829 tensors,
    4,987,310,726 parameters (9,512.5 MiB in bf16, the size of the published bf16 XL file)."""
    from acestep_lora.config import XL_FIELDS
    from acestep_lora.model import AceStepModel

    with torch.device("meta"):
        model = AceStepModel(AceStepConfig(**XL_FIELDS))
    expected = spec_keys(h=2560, heads=32, kv=8, inter=9728, layers=32, enc=2048, enc_heads=16, enc_kv=8,
                         enc_inter=6144)
    assert len(expected) == 829
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    total = sum(p.numel() for p in model.parameters())
    assert total == sum(torch.Size(s).numel() for s in expected.values()) == 4_987_310_726
    assert sum(p.numel() for p in model.decoder.layers[0].parameters()) == 127_163_392
    assert sum(p.numel() for p in model.decoder.parameters()) == 4_168_897_088
    assert sum(p.numel() for p in model.encoder.parameters()) == 608_367_616  # the 2B model's encoder size
    assert [layer.window for layer in model.decoder.layers] == [128 if i % 2 == 0 else None for i in range(32)]
    # the 2B model through the same independent list (cross-checks spec_keys against test_model's)
    with torch.device("meta"):
        small = AceStepModel(AceStepConfig())
    assert {k: tuple(v.shape) for k, v in small.state_dict().items()} == spec_keys(
        h=2048, heads=16, kv=8, inter=6144, layers=24, enc=2048, enc_heads=16, enc_kv=8, enc_inter=6144)


def test_xl_folders_are_listed_with_their_family(tmp_path, tiny_ckpt):
    from acestep_lora.checkpoint import describe_dit_folders
    from acestep_lora.testing import tiny_dit_config, write_dit

    root = tmp_path / "ckpt"
    shutil.copytree(os.path.join(tiny_ckpt, "acestep-v15-turbo"), root / "acestep-v15-turbo")
    write_dit(str(root / "acestep-v15-xl-sft"), tiny_dit_config("xl-sft"))
    (root / "acestep-v15-broken").mkdir()
    (root / "acestep-v15-broken" / "config.json").write_text("{not json")
    assert list_dit_configs(str(root)) == ["acestep-v15-broken", "acestep-v15-turbo", "acestep-v15-xl-sft"]
    found = {d["name"]: d for d in describe_dit_folders(str(root))}
    assert found["acestep-v15-xl-sft"] == {"name": "acestep-v15-xl-sft", "variant": "sft", "family": "XL",
                                           "hidden_size": 96}
    assert found["acestep-v15-turbo"]["family"] == "2B" and "error" in found["acestep-v15-broken"]
    model = load_dit(str(root), "acestep-v15-xl-sft")
    assert model.config.condition_width == 64 and model.decoder.condition_embedder.weight.shape == (96, 64)


def test_variant_from_config_without_is_turbo():
    assert AceStepConfig.from_dict({"model_version": "xl_turbo"}).variant == "turbo"
    assert AceStepConfig.from_dict({"model_version": "xl_sft"}).variant == "sft"
    assert AceStepConfig.from_dict({"model_version": "xl_base"}).variant == "base"


def test_weights_mismatch_names_the_file_and_the_key(ckpt_copy):
    from safetensors.torch import load_file, save_file

    path = os.path.join(ckpt_copy, "acestep-v15-turbo", "model.safetensors")
    state = load_file(path)
    state["decoder.layers.0.extra.weight"] = torch.zeros(1)
    save_file(state, path)
    with pytest.raises(ValueError, match=r"acestep-v15-turbo/model\.safetensors.*decoder\.layers\.0\.extra\.weight"):
        load_dit(ckpt_copy, "acestep-v15-turbo")
