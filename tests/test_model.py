"""The full-size model built on the meta device has exactly the official key set, shapes and size (spec §2.1)."""
import pytest
import torch

from acestep_lora.config import AceStepConfig
from acestep_lora.attention import attention_bias
from acestep_lora.model import AceStepModel, pack_sequences, unpack_references

H, HKV, INTER = 2048, 1024, 6144


def official_keys() -> dict:
    """Key -> shape, written out from the spec's list, independently of acestep_lora.model."""
    keys = {}

    def attn(prefix):
        keys.update({f"{prefix}.q_proj.weight": (H, H), f"{prefix}.k_proj.weight": (HKV, H),
                     f"{prefix}.v_proj.weight": (HKV, H), f"{prefix}.o_proj.weight": (H, H),
                     f"{prefix}.q_norm.weight": (128,), f"{prefix}.k_norm.weight": (128,)})

    def mlp(prefix):
        keys.update({f"{prefix}.gate_proj.weight": (INTER, H), f"{prefix}.up_proj.weight": (INTER, H),
                     f"{prefix}.down_proj.weight": (H, INTER)})

    def enc_layer(prefix):
        attn(prefix + ".self_attn")
        mlp(prefix + ".mlp")
        keys.update({prefix + ".input_layernorm.weight": (H,), prefix + ".post_attention_layernorm.weight": (H,)})

    for i in range(24):
        p = f"decoder.layers.{i}"
        for norm in ("self_attn_norm", "cross_attn_norm", "mlp_norm"):
            keys[f"{p}.{norm}.weight"] = (H,)
        attn(p + ".self_attn")
        attn(p + ".cross_attn")
        mlp(p + ".mlp")
        keys[p + ".scale_shift_table"] = (1, 6, H)
    keys.update({"decoder.proj_in.1.weight": (H, 192, 2), "decoder.proj_in.1.bias": (H,),
                 "decoder.condition_embedder.weight": (H, H), "decoder.condition_embedder.bias": (H,),
                 "decoder.norm_out.weight": (H,), "decoder.proj_out.1.weight": (H, 64, 2),
                 "decoder.proj_out.1.bias": (64,), "decoder.scale_shift_table": (1, 2, H)})
    for te in ("time_embed", "time_embed_r"):
        keys.update({f"decoder.{te}.linear_1.weight": (H, 256), f"decoder.{te}.linear_1.bias": (H,),
                     f"decoder.{te}.linear_2.weight": (H, H), f"decoder.{te}.linear_2.bias": (H,),
                     f"decoder.{te}.time_proj.weight": (6 * H, H), f"decoder.{te}.time_proj.bias": (6 * H,)})
    keys["encoder.text_projector.weight"] = (H, 1024)
    keys.update({"encoder.lyric_encoder.embed_tokens.weight": (H, 1024),
                 "encoder.lyric_encoder.embed_tokens.bias": (H,), "encoder.lyric_encoder.norm.weight": (H,)})
    for i in range(8):
        enc_layer(f"encoder.lyric_encoder.layers.{i}")
    keys.update({"encoder.timbre_encoder.embed_tokens.weight": (H, 64),
                 "encoder.timbre_encoder.embed_tokens.bias": (H,), "encoder.timbre_encoder.norm.weight": (H,),
                 "encoder.timbre_encoder.special_token": (1, 1, H)})
    for i in range(4):
        enc_layer(f"encoder.timbre_encoder.layers.{i}")
    keys.update({"tokenizer.audio_acoustic_proj.weight": (H, 64), "tokenizer.audio_acoustic_proj.bias": (H,),
                 "tokenizer.attention_pooler.embed_tokens.weight": (H, H),
                 "tokenizer.attention_pooler.embed_tokens.bias": (H,), "tokenizer.attention_pooler.norm.weight": (H,),
                 "tokenizer.attention_pooler.special_token": (1, 1, H),
                 "tokenizer.quantizer.project_in.weight": (6, H), "tokenizer.quantizer.project_in.bias": (6,),
                 "tokenizer.quantizer.project_out.weight": (H, 6), "tokenizer.quantizer.project_out.bias": (H,)})
    for i in range(2):
        enc_layer(f"tokenizer.attention_pooler.layers.{i}")
        enc_layer(f"detokenizer.layers.{i}")
    keys.update({"detokenizer.embed_tokens.weight": (H, H), "detokenizer.embed_tokens.bias": (H,),
                 "detokenizer.norm.weight": (H,), "detokenizer.special_tokens": (1, 5, H),
                 "detokenizer.proj_out.weight": (64, H), "detokenizer.proj_out.bias": (64,),
                 "null_condition_emb": (1, 1, H)})
    return keys


@pytest.fixture(scope="module")
def full_model():
    with torch.device("meta"):
        return AceStepModel(AceStepConfig())


def test_full_size_key_set_and_shapes_are_official(full_model):
    expected = official_keys()
    state = full_model.state_dict()
    assert len(expected) == 677
    assert set(state) == set(expected)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_full_size_parameter_counts(full_model):
    total = sum(p.numel() for p in full_model.parameters())
    assert total == sum(torch.Size(s).numel() for s in official_keys().values())
    assert round(total / 1e9, 3) == 2.394
    layer = sum(p.numel() for p in full_model.decoder.layers[0].parameters())
    assert layer == 62_933_504
    assert round(sum(p.numel() for p in full_model.decoder.parameters()) / 1e9, 3) == 1.575
    assert round(sum(p.numel() for p in full_model.encoder.parameters()) / 1e9, 3) == 0.608


def test_layer_types_alternate_sliding_and_full(full_model):
    windows = [layer.window for layer in full_model.decoder.layers]
    assert windows == [128 if i % 2 == 0 else None for i in range(24)]


def test_variant_from_config():
    assert AceStepConfig(is_turbo=True).variant == "turbo"
    assert AceStepConfig.from_dict({"is_turbo": False, "model_version": "base"}).variant == "base"
    assert AceStepConfig.from_dict({"model_version": "sft"}).variant == "sft"


def test_components_subset_builds_only_those(tmp_path):
    with torch.device("meta"):
        m = AceStepModel(AceStepConfig(), components=("decoder", "null_condition_emb"))
    assert m.encoder is None and m.tokenizer is None and m.detokenizer is None
    assert all(k.startswith(("decoder.", "null_condition_emb")) for k in m.state_dict())


def test_attention_bias_band_and_padding():
    bias = attention_bias(5, 5, 1, torch.tensor([[1, 1, 1, 1, 0]]), torch.float32, "cpu")
    allowed = bias[0, 0] == 0
    expected = torch.tensor([[abs(i - j) <= 1 and j < 4 for j in range(5)] for i in range(5)])
    assert torch.equal(allowed, expected)
    assert attention_bias(5, 5, None, None, torch.float32, "cpu") is None


def test_pack_sequences_moves_valid_tokens_first_stably():
    h1 = torch.arange(3.0).view(1, 3, 1)
    h2 = torch.arange(10.0, 12.0).view(1, 2, 1)
    packed, mask = pack_sequences(h1, h2, torch.tensor([[1, 0, 1]]), torch.tensor([[0, 1]]))
    assert packed.flatten().tolist() == [0.0, 2.0, 11.0, 1.0, 10.0]
    assert mask.tolist() == [[True, True, True, False, False]]


def test_unpack_references_keeps_order_per_row():
    packed = torch.arange(4.0).view(4, 1)
    out, mask = unpack_references(packed, torch.tensor([1, 0, 1, 1]))
    assert out[..., 0].tolist() == [[1.0, 0.0, 0.0], [0.0, 2.0, 3.0]]
    assert mask.tolist() == [[1, 0, 0], [1, 1, 1]]


@pytest.mark.parametrize("num_quantizers", [1, 2])
def test_residual_fsq_matches_vector_quantize_pytorch(num_quantizers):
    """The audio tokenizer's quantiser equals the library class the official model uses (outputs, codes)."""
    from vector_quantize_pytorch import ResidualFSQ as Reference

    from acestep_lora.model import ResidualFSQ

    torch.manual_seed(0)
    reference = Reference(dim=64, levels=[8, 8, 8, 5, 5, 5], num_quantizers=num_quantizers).eval()
    ours = ResidualFSQ(64, [8, 8, 8, 5, 5, 5], num_quantizers)
    ours.load_state_dict(reference.state_dict())
    x = 2 * torch.randn(2, 7, 64)
    with torch.no_grad():
        expected, expected_codes = reference(x)
        out, codes = ours(x)
        assert torch.allclose(out, expected, atol=1e-6) and torch.equal(codes.long(), expected_codes.long())
        assert torch.allclose(ours.get_output_from_indices(codes), reference.get_output_from_indices(expected_codes),
                              atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Training-step structure: fused projections, the LoRA down-projection and SwiGLU with lean backward


def test_fused_projections_keep_names_values_and_outputs():
    import copy

    from acestep_lora.model import SharedInput
    from acestep_lora.testing import init_weights_, tiny_dit_config

    model = AceStepModel(tiny_dit_config("turbo"), components=("decoder",))
    init_weights_(model, 0)
    decoder = model.decoder.requires_grad_(False)
    reference = copy.deepcopy(decoder)
    reference.requires_grad_(True)  # trainable weights are never fused: the plain path
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    decoder.fuse_projections()
    attn = decoder.layers[0].self_attn
    fused = attn._fused_weight
    assert fused.shape == (attn.q_proj.out_features + 2 * attn.k_proj.out_features, attn.q_proj.in_features)
    assert attn.v_proj.weight.untyped_storage()._cdata == fused.untyped_storage()._cdata
    assert decoder.layers[1].mlp._fused_weight.shape[0] == 2 * decoder.layers[1].mlp.up_proj.out_features
    after = decoder.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(2, 21, 64, generator=g), timestep=torch.tensor([0.3, 0.9]),
              timestep_r=torch.tensor([0.3, 0.9]), encoder_hidden_states=torch.randn(2, 9, 64, generator=g),
              context_latents=torch.randn(2, 21, 128, generator=g))
    with torch.no_grad():
        out = decoder(**kw)[0]
    expected = reference(**kw)[0]
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    decoder.double()  # a conversion gives every weight its own storage: fused again on the next forward
    assert all(m._fused_weight is None for m in decoder.modules() if isinstance(m, SharedInput))
    with torch.no_grad():
        out64 = decoder(**{k: v.double() for k, v in kw.items()})[0]
    assert attn._fused_weight.dtype == torch.float64 and torch.allclose(out64.float(), expected, atol=1e-5)


def test_lora_down_projection_equals_dropout_then_linear():
    """Same random draws, values and gradients as F.dropout + F.linear, with the mask kept instead of the copy."""
    import torch.nn.functional as F

    from acestep_lora.model import _DroppedDown

    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    x2, a2 = x.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    grad = torch.randn(3, 5, 4, dtype=torch.float64)
    torch.manual_seed(7)
    h = _DroppedDown.apply(x, a, 0.3)
    torch.manual_seed(7)
    h2 = F.linear(F.dropout(x2, 0.3, True), a2)
    assert torch.equal(h, h2)
    (h * grad).sum().backward()
    (h2 * grad).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-12) and torch.allclose(a.grad, a2.grad, atol=1e-12)


def test_swiglu_backward_equals_autograd():
    import torch.nn.functional as F

    from acestep_lora.model import _SwiGLU

    gate, up = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True), \
        torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLU.apply, (gate, up))
    out = _SwiGLU.apply(gate, up)
    assert torch.equal(out, F.silu(gate) * up)
