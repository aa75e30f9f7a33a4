"""The held-out validation loss: which samples are held out, a deterministic loss on them, best/, and resume."""
import json
import math
import os
import statistics

import pytest
import torch
from safetensors.torch import load_file

from acestep_lora import validation
from acestep_lora.data import collate
from acestep_lora.manifest import SampleInfo
from acestep_lora.objective import TURBO_SHIFT3_TIMESTEPS, Draw, loss
from acestep_lora.train import TrainConfig, Trainer, TrainingCancelled, train_lora


def config(tiny_ckpt, tensors, out, **kw):
    base = dict(tensor_dir=tensors, checkpoint_dir=tiny_ckpt, output_dir=str(out), lora_rank=8, lora_alpha=16,
                learning_rate=3e-3, train_epochs=4, save_every_n_epochs=0, warmup_steps=2, device="cpu",
                validation_every_n_epochs=1, preview_every_n_epochs=0)
    base.update(kw)
    return TrainConfig(**base)


def jsonl(path):
    return [json.loads(line) for line in open(os.path.join(path, "train_log.jsonl"))]


def validation_lines(path):
    return [(e["epoch"], e["step"], e["validation_loss"]) for e in jsonl(path) if "validation_loss" in e]


def infos(n, songs=None):
    """n samples; ``songs``: {song name: segment count} adds segmented songs."""
    out = [SampleInfo(file=f"s{i}.pt", name=f"s{i}.wav", cache_key=f"key{i}") for i in range(n)]
    for name, count in (songs or {}).items():
        out += [SampleInfo(file=f"{name}{j}.pt", name=name, cache_key=f"{name}-{j}", segment=j, segments=count,
                           duration_total=100.0) for j in range(count)]
    return out


# -- the split ---------------------------------------------------------------------------------------------------

def test_how_many_are_held_out():
    assert [validation.held_out_count(n, 0.1) for n in (1, 4, 5, 14, 15, 30, 99, 500)] == [0, 0, 1, 1, 2, 3, 10, 20]
    assert validation.held_out_count(30, 0.0) == 0 and validation.held_out_count(10, 0.5) == 5
    assert len(validation.choose(infos(30), 0.1, 42)) == 3 and validation.choose(infos(4), 0.1, 42) == []


def test_the_split_is_deterministic_and_follows_the_seed():
    a, b = validation.choose(infos(40), 0.1, 42), validation.choose(infos(40)[::-1], 0.1, 42)
    assert sorted(a) == sorted(b) and len(a) == 4  # the order of the dataset does not matter
    others = {tuple(sorted(validation.choose(infos(40), 0.1, seed))) for seed in range(6)}
    assert len(others) > 1


def test_segments_of_one_song_stay_together():
    data = infos(12, {"long_song.wav": 3, "other_song.wav": 2})
    for seed in range(20):
        held = set(validation.choose(data, 0.2, seed))
        for song, count in (("long_song.wav", 3), ("other_song.wav", 2)):
            keys = {f"{song}-{j}" for j in range(count)}
            assert keys <= held or not keys & held, (seed, held)


def test_a_resume_keeps_its_split_when_the_dataset_changes():
    before = infos(30)
    held = validation.choose(before, 0.1, 42)
    trained = [s.cache_key for s in before if s.cache_key not in held]
    previous = {"held_out": held, "trained": trained}
    # unchanged: the same split
    assert sorted(validation.choose(before, 0.1, 42, previous)) == sorted(held)
    # 10 samples added: target 4; the 3 stay held out, one more comes from the new ones, never from the trained
    grown = before + [SampleInfo(file=f"n{i}.pt", name=f"n{i}.wav", cache_key=f"new{i}") for i in range(10)]
    now = validation.choose(grown, 0.1, 42, previous)
    assert set(held) <= set(now) and len(now) == 4 and not set(now) & set(trained)
    # a held-out sample removed: the others stay, and its place is not taken by a trained sample
    shrunk = [s for s in before if s.cache_key != held[0]]
    assert sorted(validation.choose(shrunk, 0.1, 42, previous)) == sorted(held[1:])
    # trained samples unknown (an old checkpoint): nothing new is held out
    assert validation.choose(grown, 0.1, 42, {"held_out": [], "trained": None}) == []


def test_quadrature_points_are_midpoint_quantiles_of_the_training_t():
    assert validation.quadrature("turbo_discrete", -0.4, 1.0) == TURBO_SHIFT3_TIMESTEPS
    points = validation.quadrature("logit_normal", -0.4, 1.0)
    normal = statistics.NormalDist(-0.4, 1.0)
    for i, t in enumerate(points):  # P(max of two logit-normals <= t) = F(logit t)^2 = (i + 0.5) / 8
        assert normal.cdf(math.log(t / (1 - t))) ** 2 == pytest.approx((i + 0.5) / 8, abs=1e-12)
    # and they average what training draws: E[t] of the distribution vs the quadrature mean
    draws = torch.sigmoid(torch.randn(2, 200_000, generator=torch.Generator().manual_seed(0)) - 0.4).amax(0)
    assert sum(points) / len(points) == pytest.approx(draws.mean().item(), abs=3e-3)


# -- on a trainer ------------------------------------------------------------------------------------------------

def test_held_out_samples_are_not_trained_on(tiny_ckpt, six, tmp_path, pack_log):
    trainer = Trainer(config(tiny_ckpt, six, tmp_path / "a"))
    held = trainer.validation.keys
    assert len(held) == 1 and len(trainer.data) == 5
    assert not set(held) & {s.cache_key for s in trainer.data.manifest.samples_info}
    assert trainer.signature["validation"]["split"] == 0.1
    off = Trainer(config(tiny_ckpt, six, tmp_path / "b", validation_split=0.0))
    assert len(off.data) == 6 and "validation" not in off.signature and off.validation.keys == []
    assert off.signature["dataset"] != trainer.signature["dataset"]  # the trained samples differ
    trainer.train()
    trainer.cleanup()
    name = trainer.validation.held.manifest.samples_info[0].name
    note = (f"validation: 1 of 6 samples held out ({name}); its loss every epoch and after the last, the lowest "
            "one's LoRA kept in best/")
    assert trainer.metrics.lines[1] == note and note in pack_log.text  # right after the header


def test_validation_loss_is_deterministic_and_leaves_training_alone(tiny_ckpt, six, tmp_path):
    trainer = Trainer(config(tiny_ckpt, six, tmp_path, lora_dropout=0.5))
    trainer.setup()
    for _ in range(3):  # a LoRA that is not zero
        trainer.step(collate([trainer.data.samples[0]]))
    cpu, noise = torch.get_rng_state(), trainer.noise_gen.get_state()
    first, second = trainer.validation.evaluate(trainer), trainer.validation.evaluate(trainer)
    assert first == second and math.isfinite(first)  # bit for bit, despite LoRA dropout 0.5 in training
    assert torch.equal(torch.get_rng_state(), cpu) and torch.equal(trainer.noise_gen.get_state(), noise)
    assert trainer.net.training  # train mode restored
    # the objective's own loss at those timesteps and noise, one timestep at a time
    sample = {k: v.float() for k, v in trainer.validation.held.samples[0].items()}
    key = trainer.validation.keys[0]
    t = torch.tensor(TURBO_SHIFT3_TIMESTEPS)
    noise = torch.randn((8, *sample["target_latents"].shape),
                        generator=torch.Generator().manual_seed(validation.noise_seed(key)))
    trainer.net.eval()
    with torch.no_grad():
        expected = sum(loss(trainer.net, collate([sample]), Draw(noise[i:i + 1], t[i:i + 1])) for i in range(8)) / 8
    trainer.net.train()
    assert first == pytest.approx(expected.item(), rel=1e-5)
    trainer.cleanup()


def test_validation_lines_best_and_the_lowest_epoch(tiny_ckpt, six, tmp_path):
    result = train_lora(config(tiny_ckpt, six, tmp_path, train_epochs=5, save_every_n_epochs=1,
                               learning_rate=2e-2))
    lines = validation_lines(tmp_path)
    assert [e for e, _, _ in lines] == [0, 1, 2, 3, 4, 5] and lines[0][1] == 0
    assert all(math.isfinite(v) for _, _, v in lines)
    assert all("loss" in e or "validation_loss" in e or "note" in e for e in jsonl(tmp_path))
    best_epoch = min(lines[1:], key=lambda x: x[2])[0]
    info = validation.best_info(str(tmp_path))
    assert info["epoch"] == best_epoch and info["validation_loss"] == min(v for _, _, v in lines[1:])
    ckpt = tmp_path / ("final" if best_epoch == 5 else f"checkpoints/epoch_{best_epoch}")
    for name in ("adapter/adapter_model.safetensors",):
        a, b = load_file(str(tmp_path / "best" / name)), load_file(str(ckpt / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = load_file(str(tmp_path / "best" / info["lora_file"]))
    ckpt_file = next(f for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in load_file(str(ckpt / ckpt_file)).items())
    assert f"best epoch {best_epoch}" in result.summary
    # the split is in every checkpoint
    state = json.load(open(tmp_path / "checkpoints" / "epoch_2" / validation.STATE_FILE))
    assert len(state["held_out"]) == 1 and len(state["trained"]) == 5


def test_validation_is_identical_after_cancel_and_resume(tiny_ckpt, six, tmp_path):
    full = train_lora(config(tiny_ckpt, six, tmp_path / "full", train_epochs=4))
    calls = [0]

    def cancel():
        calls[0] += 1
        return calls[0] == 13  # epoch 3, third batch

    with pytest.raises(TrainingCancelled):
        train_lora(config(tiny_ckpt, six, tmp_path / "run", train_epochs=4), cancel_requested=cancel)
    resumed = train_lora(config(tiny_ckpt, six, tmp_path / "run", train_epochs=4, resume_from="latest"))
    assert validation_lines(tmp_path / "run") == validation_lines(tmp_path / "full")  # bit for bit, epochs 0-4
    assert [p[1] for p in resumed.history] == [p[1] for p in full.history]
    assert validation.best_info(str(tmp_path / "run"))["epoch"] == validation.best_info(str(tmp_path / "full"))["epoch"]


def test_too_few_samples_or_split_off_train_on_everything(tiny_ckpt, six, tmp_path, pack_log):
    off = train_lora(config(tiny_ckpt, six, tmp_path / "off", validation_split=0.0))
    assert not validation_lines(tmp_path / "off") and not (tmp_path / "off" / "best").exists()
    assert not (tmp_path / "off" / "final" / validation.STATE_FILE).exists()
    assert all("loss" in e for e in jsonl(tmp_path / "off"))
    assert "best epoch" not in off.summary


def test_resume_after_samples_were_added_keeps_held_out_and_trained_apart(tiny_ckpt, six, tmp_path):
    import shutil
    from test_train import rewrite_samples
    tensors = str(tmp_path / "tensors")
    shutil.copytree(six, tensors)
    train_lora(config(tiny_ckpt, tensors, tmp_path / "run", train_epochs=2, save_every_n_epochs=1))
    before = json.load(open(tmp_path / "run" / "final" / validation.STATE_FILE))
    rewrite_samples(tensors, add=[f"new{i}" for i in range(10)])  # 16 samples: 2 to hold out
    trainer = Trainer(config(tiny_ckpt, tensors, tmp_path / "run", train_epochs=3, resume_from="latest"))
    assert set(before["held_out"]) <= set(trainer.validation.keys) and len(trainer.validation.keys) == 2
    assert not set(trainer.validation.keys) & set(before["trained"])
