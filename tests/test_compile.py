"""The compiled decoder: one graph without breaks, one compile per length bucket, the eager results."""
import pytest
import torch

from acestep_lora import lora
from acestep_lora.compile import CompiledDecoder
from acestep_lora.model import AceStepModel
from acestep_lora.testing import init_weights_, tiny_dit_config

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_decoder(layers=2, dropout=0.0):
    torch.manual_seed(0)
    model = AceStepModel(tiny_dit_config("turbo", num_hidden_layers=layers), components=("decoder",))
    init_weights_(model, 0)
    adapted = lora.inject(model.decoder, QKVO, 4, 8, dropout)
    for layer in adapted.values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    return model.decoder, adapted


def batch(frames, tokens, seed=1):
    g = torch.Generator().manual_seed(seed)
    b = len(frames)
    t = torch.rand(b, generator=g)
    kw = dict(hidden_states=torch.randn(b, max(frames), 64, generator=g), timestep=t, timestep_r=t,
              encoder_hidden_states=torch.randn(b, max(tokens), 64, generator=g),
              context_latents=torch.randn(b, max(frames), 128, generator=g))
    if b > 1:
        kw.update(mask_padding=True,
                  attention_mask=(torch.arange(max(frames))[None] < torch.tensor(frames)[:, None]).float(),
                  encoder_attention_mask=(torch.arange(max(tokens))[None] < torch.tensor(tokens)[:, None]).float())
    return kw


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_region_has_no_graph_breaks(checkpointing):
    decoder, _ = lora_decoder(dropout=0.1)  # training mode, LoRA dropout on
    decoder.gradient_checkpointing = checkpointing
    compiled = CompiledDecoder(decoder, frame_bucket=64, token_bucket=16)
    kw = batch([37, 30], [11, 7])
    explanation = torch._dynamo.explain(compiled._forward)(
        kw["hidden_states"], kw["timestep"], kw["timestep_r"], kw["encoder_hidden_states"], kw["context_latents"],
        torch.tensor([37, 30]), torch.tensor([11, 7]))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


def test_recompiles_are_bounded_by_the_length_buckets():
    decoder, _ = lora_decoder()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    torch._dynamo.reset()
    compiled = CompiledDecoder(decoder, frame_bucket=64, token_bucket=16, backend=counting_backend)
    shapes = [(37, 11), (41, 9), (64, 16), (70, 11), (100, 3), (23, 5)]
    with torch.no_grad():
        for frames, tokens in shapes:
            out = compiled(**batch([frames], [tokens]))[0]
            assert out.shape == (1, frames, 64)
    assert len(graphs) == len({compiled.bucket(f, t) for f, t in shapes}) == 2


def test_compiled_training_step_equals_eager_on_a_padded_batch():
    """Forward and LoRA gradients through AOT autograd (functionalised, partitioned), fp32, padded batch."""
    decoder, adapted = lora_decoder()
    kw = batch([37, 30], [11, 7])
    torch._dynamo.reset()
    compiled = CompiledDecoder(decoder, frame_bucket=64, token_bucket=16, backend="aot_eager")
    results = []
    for forward in (compiled, decoder):
        for layer in adapted.values():
            layer.lora_A.grad = layer.lora_B.grad = None
        out = forward(**kw)[0]
        (out[0].square().sum() + out[1, :30].square().sum()).backward()
        results.append((out, {n: (l.lora_A.grad, l.lora_B.grad) for n, l in adapted.items()}))
    (out_c, grads_c), (out_e, grads_e) = results
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(out_c[0], out_e[0]) <= 1e-5 and rel(out_c[1, :30], out_e[1, :30]) <= 1e-5
    for name in adapted:
        assert rel(grads_c[name][0], grads_e[name][0]) <= 1e-5 and rel(grads_c[name][1], grads_e[name][1]) <= 1e-5


def test_inductor_compiled_forward_equals_eager():
    """inductor's generated kernels (C++ on a CPU): one layer keeps the compile short."""
    decoder, _ = lora_decoder(layers=1)
    kw = batch([37], [11])
    torch._dynamo.reset()
    compiled = CompiledDecoder(decoder, frame_bucket=64, token_bucket=16)
    with torch.no_grad():
        out, eager = compiled(**kw)[0], decoder(**kw)[0]
    assert ((out - eager).norm() / eager.norm()).item() <= 1e-5
