"""Attention plans compute the reference attention: windows, GQA and padding, on every backend's code path.

The CUDA kernels cannot run here, so the flash and memory-efficient paths run with kernel emulators that implement
the kernels' documented contracts in plain torch (``emulated_flash``: dense or varlen cumulative lengths, GQA,
bidirectional window; ``emulated_efficient``: equal head counts, an additive bias). Everything around the kernel —
segment lengths, K/V expansion, bias layout and alignment, reshapes — is the production code. tests/test_gpu.py
compares the emulators with the real kernels on a GPU.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from acestep_lora import attention
from acestep_lora.attention import AttentionPlan

HQ, HKV, D = 4, 2, 16


def reference(q, k, v, window=None, key_lengths=None, query_lengths=None):
    """softmax(q k^T / sqrt(D)) v per sample and head, in float64, for the valid queries; invalid rows zero."""
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    out = torch.zeros(b, lq, hq, d, dtype=torch.float64)
    for i in range(b):
        nk = lk if key_lengths is None else int(key_lengths[i])
        nq = lq if query_lengths is None else int(query_lengths[i])
        for h in range(hq):
            kh = h // (hq // hkv)
            scores = q[i, :nq, h].double() @ k[i, :nk, kh].double().T / math.sqrt(d)
            if window is not None:
                pos = torch.arange(max(nq, nk))
                scores = scores.masked_fill((pos[:nq, None] - pos[None, :nk]).abs() > window, float("-inf"))
            out[i, :nq, h] = scores.softmax(-1) @ v[i, :nk, kh].double()
    return out


def emulated_flash(q, k, v, cu_q, cu_k, max_q, max_k, window):
    """FlashAttention-2's contract: [B, L, H, D] dense or [total, H, D] with cumulative lengths; GQA; the window
    aligned to the bottom-right corner (key j visible to query i iff |j - (i + Lk - Lq)| <= window); a query
    without keys outputs 0."""
    if cu_q is None:
        b, lq, hq, d = q.shape
        lk = k.shape[1]
        cu_q = torch.arange(b + 1, dtype=torch.int32) * lq
        cu_k = torch.arange(b + 1, dtype=torch.int32) * lk
        return emulated_flash(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, lq, lk,
                              window).view(b, lq, hq, d)
    assert cu_q.dtype == cu_k.dtype == torch.int32 and int(cu_q[-1]) == q.shape[0] and int(cu_k[-1]) == k.shape[0]
    out = torch.zeros_like(q)
    groups = q.shape[1] // k.shape[1]
    for s in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        assert q1 - q0 <= max_q and k1 - k0 <= max_k
        if q1 == q0 or k1 == k0:
            continue
        qs = q[q0:q1].transpose(0, 1)  # (H, Lq, D)
        ks = k[k0:k1].repeat_interleave(groups, dim=1).transpose(0, 1)
        vs = v[k0:k1].repeat_interleave(groups, dim=1).transpose(0, 1)
        scores = qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1])
        if window is not None:
            i = torch.arange(q1 - q0)[:, None] + (k1 - k0) - (q1 - q0)
            scores = scores.masked_fill((torch.arange(k1 - k0)[None, :] - i).abs() > window, float("-inf"))
        out[q0:q1] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out


def emulated_efficient(q, k, v, bias):
    """The memory-efficient kernel's contract: [B, H, L, D], equal head counts, additive bias [B, H, Lq, Lk] whose
    rows are 8-element aligned."""
    assert q.shape[1] == k.shape[1] == v.shape[1], "the memory-efficient kernel takes equal head counts only"
    if bias is not None:
        assert bias.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        assert all(st % 8 == 0 for st in bias.stride()[:-1]) and bias.stride(-1) == 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


@pytest.fixture
def kernels(monkeypatch):
    monkeypatch.setattr(attention, "flash_kernel", emulated_flash)
    monkeypatch.setattr(attention, "efficient_kernel", emulated_efficient)


def qkv(batch, lq, lk, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, lq, HQ, D, generator=g), torch.randn(batch, lk, HKV, D, generator=g),
            torch.randn(batch, lk, HKV, D, generator=g))


def valid_rows(out, query_lengths):
    if query_lengths is None:
        return out
    return torch.cat([out[i, :n] for i, n in enumerate(query_lengths.tolist())])


CASES = {  # name: (Lq, Lk, window, key lengths, self-attention?)
    "sliding": (23, 23, 3, None, True),
    "full": (23, 23, None, None, True),
    "cross": (23, 9, None, None, False),
    "sliding, padded": (23, 23, 3, [23, 11, 4], True),
    "full, padded": (23, 23, None, [23, 11, 4], True),
    "cross, padded": (23, 9, None, [9, 5, 1], False),
    "sliding window wider than the sequence": (6, 6, 8, [6, 2, 5], True),
}


@pytest.mark.parametrize("backend", ["sdpa", "efficient", "flash"])
@pytest.mark.parametrize("case", list(CASES))
def test_plan_equals_reference(kernels, backend, case):
    lq, lk, window, key_lengths, is_self = CASES[case]
    q, k, v = qkv(3, lq, lk)
    key_lengths = None if key_lengths is None else torch.tensor(key_lengths, dtype=torch.int32)
    query_lengths = key_lengths if is_self else None
    plan = AttentionPlan(backend, 3, lq, lk, dtype=torch.float32, device="cpu", key_lengths=key_lengths,
                         query_lengths=query_lengths, windows=[window])
    out = plan(q, k, v, window)
    assert out.shape == (3, lq, HQ, D)
    expected = reference(q, k, v, window, key_lengths, query_lengths)
    rows = valid_rows(out, query_lengths)
    assert (valid_rows(expected, query_lengths) - rows).abs().max() <= 1e-6
    assert torch.isfinite(out).all()  # padded queries hold finite values: the masked loss multiplies them by 0


def test_flash_segments_split_each_sample_into_valid_prefix_and_padded_tail():
    plan = AttentionPlan("flash", 2, 5, 4, dtype=torch.bfloat16, device="cpu",
                         key_lengths=torch.tensor([4, 1]), query_lengths=torch.tensor([5, 3]))
    assert plan.cu_q.tolist() == [0, 5, 5, 8, 10] and plan.cu_k.tolist() == [0, 4, 4, 5, 8]
    assert plan.cu_q.dtype == plan.cu_k.dtype == torch.int32
    cross = AttentionPlan("flash", 2, 5, 4, dtype=torch.bfloat16, device="cpu", key_lengths=torch.tensor([4, 1]))
    assert cross.cu_q.tolist() == [0, 5, 5, 10, 10]  # every query attends; the key tail gets no query
    assert not hasattr(AttentionPlan("flash", 2, 5, 5, dtype=torch.bfloat16, device="cpu"), "biases")  # no mask


def test_efficient_bias_is_built_once_aligned_and_only_when_needed():
    plan = AttentionPlan("efficient", 2, 13, 13, dtype=torch.float16, device="cpu", windows=[None, 3, None])
    assert set(plan.biases) == {None, 3} and plan.biases[None] is None
    bias = plan.biases[3]
    assert bias.shape == (1, 1, 13, 13) and bias.stride(-2) == 16  # one [1, 1, L, L] band, rows padded to 16
    padded = AttentionPlan("efficient", 2, 13, 13, dtype=torch.float16, device="cpu", windows=[None],
                           key_lengths=torch.tensor([13, 7]))
    assert padded.biases[None].shape == (2, 1, 13, 13)


def test_encoder_masks_of_any_pattern_use_biases(kernels):
    """The lyric encoder's token mask can be any pattern: such a plan never takes the lengths-only flash path."""
    q, k, v = qkv(2, 7, 7)
    valid = torch.tensor([[1, 1, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    plan = AttentionPlan("flash", 2, 7, 7, dtype=torch.float32, device="cpu", key_valid=valid, windows=[2])
    assert plan.backend == "efficient"
    out = plan(q, k, v, 2)
    for i in range(2):
        keep = valid[i].nonzero().flatten()
        for j in range(7):
            near = keep[(keep - j).abs() <= 2]
            expected = reference(q[i:i + 1, j:j + 1], k[i:i + 1, near], v[i:i + 1, near])[0, 0]
            assert (out[i, j] - expected).abs().max() <= 1e-6


def test_choose_backend_off_cuda_is_the_sdpa_reference():
    assert attention.choose_backend(torch.device("cpu"), torch.bfloat16) == "sdpa"
    assert attention.choose_backend(torch.device("cpu"), torch.float32) == "sdpa"


def test_lengths_from_prefix_masks():
    mask = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert attention.lengths_from_mask(mask).tolist() == [5, 3]
    assert attention.lengths_from_mask(mask, group=2).tolist() == [3, 2]  # a patch is valid if any frame is


@pytest.mark.parametrize("backend", ["efficient", "flash"])
def test_decoder_on_every_backend_equals_the_official_fixture(kernels, official_ckpt, backend):
    """The whole decoder through each backend's code path computes the official outputs (golden fixture)."""
    import os

    from safetensors.torch import load_file

    from acestep_lora import load_dit

    from conftest import FIXTURE

    g = load_file(os.path.join(FIXTURE, "golden.safetensors"))
    decoder = load_dit(official_ckpt, "acestep-v15-turbo").decoder
    decoder.attention_backend = backend
    p = "decoder_call."
    with torch.no_grad():
        pred = decoder(hidden_states=g[p + "hidden_states"], timestep=g[p + "timestep"],
                       timestep_r=g[p + "timestep_r"], attention_mask=g[p + "attention_mask"],
                       encoder_hidden_states=g[p + "encoder_hidden_states"],
                       encoder_attention_mask=g[p + "encoder_attention_mask"],
                       context_latents=g[p + "context_latents"])[0]
    expected = g[p + "out.pred"]
    assert ((pred.double() - expected.double()).norm() / expected.double().norm()).item() <= 1e-5


@pytest.mark.parametrize("backend", ["efficient", "flash"])
def test_padded_decoder_on_every_backend_equals_the_sdpa_reference(kernels, tiny_ckpt, backend):
    from acestep_lora import load_dit

    decoder = load_dit(tiny_ckpt).decoder.eval()
    g = torch.Generator().manual_seed(0)
    x, ctx, enc = torch.randn(2, 21, 64, generator=g), torch.randn(2, 21, 128, generator=g), \
        torch.randn(2, 9, 64, generator=g)
    t = torch.tensor([0.7, 0.3])
    kw = dict(hidden_states=x, timestep=t, timestep_r=t, encoder_hidden_states=enc, context_latents=ctx,
              attention_mask=torch.tensor([[1.0] * 21, [1.0] * 14 + [0.0] * 7]),
              encoder_attention_mask=torch.tensor([[1.0] * 9, [1.0] * 5 + [0.0] * 4]), mask_padding=True)
    with torch.no_grad():
        expected = decoder(**kw)[0]
        decoder.attention_backend = backend
        out = decoder(**kw)[0]
    assert (out[0] - expected[0]).abs().max() <= 1e-5 and (out[1, :14] - expected[1, :14]).abs().max() <= 1e-5
    by_lengths = decoder(**{**kw, "attention_mask": None, "encoder_attention_mask": None},
                         frame_lengths=torch.tensor([21, 14]), encoder_lengths=torch.tensor([9, 5]))[0]
    assert torch.equal(by_lengths, out)
