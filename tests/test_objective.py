"""The training objective alone: timesteps per variant, the draw, and the loss as a function of batch and draw."""
import pytest
import torch
import torch.nn.functional as F

from acestep_lora import load_dit
from acestep_lora.data import collate
from acestep_lora.objective import TURBO_SHIFT3_TIMESTEPS, Draw, FlowMatching, loss, resolve_sampling

CPU = torch.device("cpu")


def sample(frames, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    return {"target_latents": torch.randn(frames, 64, generator=g),
            "context_latents": torch.randn(frames, 128, generator=g),
            "encoder_hidden_states": torch.randn(tokens, 64, generator=g)}


def test_auto_sampling_follows_the_variant():
    assert resolve_sampling("auto", "turbo") == "turbo_discrete"
    assert resolve_sampling("auto", "base") == resolve_sampling("auto", "sft") == "logit_normal"
    assert resolve_sampling("logit_normal", "turbo") == "logit_normal"
    with pytest.raises(ValueError, match="timestep_sampling 'uniform' is not one of auto, turbo_discrete"):
        resolve_sampling("uniform", "turbo")


def test_turbo_draws_the_official_discrete_timesteps_and_base_logit_normal():
    g = torch.Generator().manual_seed(0)
    turbo = FlowMatching("turbo_discrete", CPU, torch.float32)
    assert set(turbo.timesteps(400, g).tolist()) == set(torch.tensor(TURBO_SHIFT3_TIMESTEPS).tolist())
    base = FlowMatching("logit_normal", CPU, torch.float32, mu=-0.4, sigma=1.0)
    t = base.timesteps(20000, g)
    assert 0 < t.min() and t.max() < 1
    # max of two logit-normal(-0.4, 1) draws: the median is sigmoid(-0.4 + 0.545) ~ 0.536
    assert t.median().item() == pytest.approx(0.536, abs=0.02)


def test_draw_order_is_noise_then_t_then_the_dropout_coin():
    """Exact resume and the reference tests replay the generator in this order."""
    batch = collate([sample(10, 5, 0), sample(10, 5, 1)])
    null = torch.zeros(1, 1, 64)
    objective = FlowMatching("logit_normal", CPU, torch.float32, cfg_dropout=0.5, null_condition=null)
    draw = objective.draw(batch, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 10, 64, generator=g)
    t = torch.sigmoid(torch.randn((2, 2), generator=g) * 1.0 - 0.4).amax(dim=0)
    keep = torch.rand(2, generator=g) >= 0.5
    assert torch.equal(draw.noise, noise) and torch.equal(draw.t, t) and torch.equal(draw.keep_condition, keep)
    # turbo (distilled, no CFG) never drops the condition, whatever cfg_dropout says
    turbo = FlowMatching("turbo_discrete", CPU, torch.float32, cfg_dropout=0.5)
    assert turbo.cfg_dropout == 0 and turbo.draw(batch, g).keep_condition is None
    with pytest.raises(ValueError, match="null_condition_emb"):
        FlowMatching("logit_normal", CPU, torch.float32, cfg_dropout=0.1)


def test_loss_is_the_flow_matching_mse_of_the_draw(tiny_ckpt):
    decoder = load_dit(tiny_ckpt).decoder.eval()
    batch = collate([sample(12, 6, 0)])
    g = torch.Generator().manual_seed(5)
    draw = Draw(torch.randn(1, 12, 64, generator=g), torch.tensor([0.75]))
    x0 = batch.target_latents
    xt = 0.75 * draw.noise + 0.25 * x0
    with torch.no_grad():
        pred = decoder(hidden_states=xt, timestep=draw.t, timestep_r=draw.t,
                       encoder_hidden_states=batch.encoder_hidden_states, context_latents=batch.context_latents)[0]
        assert torch.allclose(loss(decoder, batch, draw), F.mse_loss(pred, draw.noise - x0), rtol=1e-6)
        # a dropped condition is replaced by the null embedding, whole
        null = torch.full((1, 1, 64), 0.25)
        dropped = loss(decoder, batch, Draw(draw.noise, draw.t, torch.tensor([False])), null)
        unconditioned = collate([dict(sample(12, 6, 0), encoder_hidden_states=torch.full((6, 64), 0.25))])
        assert torch.equal(dropped, loss(decoder, unconditioned, draw))


def test_padded_frames_do_not_count(tiny_ckpt):
    """A padded batch's loss is the frame-weighted mean of each sample's loss alone."""
    decoder = load_dit(tiny_ckpt).decoder.eval()
    samples = [sample(14, 6, 0), sample(9, 4, 1)]
    g = torch.Generator().manual_seed(2)
    noises = [torch.randn(14, 64, generator=g), torch.randn(9, 64, generator=g)]
    t = torch.tensor([0.9, 0.5])
    batch = collate(samples)
    padded_noise = torch.stack([noises[0], F.pad(noises[1], (0, 0, 0, 5))])
    with torch.no_grad():
        together = loss(decoder, batch, Draw(padded_noise, t))
        alone = [loss(decoder, collate([s]), Draw(n[None], t[i:i + 1]))
                 for i, (s, n) in enumerate(zip(samples, noises))]
    assert together.item() == pytest.approx((alone[0].item() * 14 + alone[1].item() * 9) / 23, rel=1e-5)
