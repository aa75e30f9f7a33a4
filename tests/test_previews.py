"""Audio previews while training: when and what is rendered, the LoRA-off reference, and that training is unchanged."""
import json
import os
import shutil
import types

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from acestep_lora import previews
from acestep_lora.manifest import DatasetMetadata, SampleInfo
from acestep_lora.prepare import PrepareSettings, prepare_dataset
from acestep_lora.sampler import Prompt, generate
from acestep_lora.train import TrainConfig, TrainingCancelled, train_lora

from test_prepare import item

SECONDS = 1.0  # short clips keep the tests fast; the length rule is the same at 20 s


@pytest.fixture(scope="module")
def five(tiny_ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("five"))
    prepare_dataset([item(n, 1.0, lyrics="la la" if n == "b" else "") for n in "abcde"], out,
                    PrepareSettings(tiny_ckpt, device="cpu", custom_tag="mytag"))
    return out


def config(tiny_ckpt, tensors, out, **kw):
    base = dict(tensor_dir=tensors, checkpoint_dir=tiny_ckpt, output_dir=str(out), lora_rank=8, lora_alpha=16,
                learning_rate=3e-3, train_epochs=3, save_every_n_epochs=2, warmup_steps=2, device="cpu",
                preview_seconds=SECONDS, validation_split=0.0)
    base.update(kw)
    return TrainConfig(**base)


def lines(path):
    return [json.loads(line) for line in open(os.path.join(path, "train_log.jsonl"))]


def read(path):
    data, rate = sf.read(path, dtype="float32")
    return torch.from_numpy(data.T.copy()), rate


def adapter(result):
    return load_file(os.path.join(result.adapter_dir, "adapter_model.safetensors"))


def test_previews_at_the_right_epochs_with_the_right_length(tiny_ckpt, five, tmp_path):
    events = []
    result = train_lora(config(tiny_ckpt, five, tmp_path, train_epochs=5, preview_every_n_epochs=2),
                        progress=events.append)
    sets = previews.saved_previews(str(tmp_path))
    assert [(s["epoch"], s["base"]) for s in sets] == [(0, True), (2, False), (4, False), (5, False)]
    for s in sets:
        assert [os.path.basename(f) for f in s["files"]] == ["preview_1.flac", "preview_2.flac"]
        for f in s["files"]:
            audio, rate = read(f)
            assert rate == 48000 and audio.shape == (2, int(SECONDS * 48000))  # 25 frames x 1920 samples
            assert 0 < audio.abs().max() <= 1
    listed = [(e["epoch"], e["step"], e["base"], e["previews"]) for e in lines(tmp_path) if "previews" in e]
    assert listed == [(0, 0, True, ["previews/base/preview_1.flac", "previews/base/preview_2.flac"])] + [
        (n, n * 5, False, [f"previews/epoch_{n}/preview_{i}.flac" for i in (1, 2)]) for n in (2, 4, 5)]
    announced = [p for e in events for p in e.previews]
    assert [(p["epoch"], p["files"]) for p in announced] == [(e, f) for e, _, _, f in listed]
    assert announced[0]["captions"] == ["caption a, mytag", "caption b, mytag"]  # the samples' tagged captions
    prompts = json.load(open(tmp_path / "previews" / "prompts.json"))
    assert prompts["prompts"][1]["lyrics"] == "la la" and prompts["prompts"][0]["lyrics"] == "[Instrumental]"
    assert "previews: " in result.summary and "epochs 2, 4, 5" in result.summary


def test_by_default_previews_come_with_each_checkpoint(tiny_ckpt, five, tmp_path):
    train_lora(config(tiny_ckpt, five, tmp_path / "a", train_epochs=4, save_every_n_epochs=3, preview_count=1))
    assert [s["epoch"] for s in previews.saved_previews(str(tmp_path / "a"))] == [0, 3, 4]
    train_lora(config(tiny_ckpt, five, tmp_path / "b", train_epochs=2, save_every_n_epochs=0, preview_count=1))
    assert [s["epoch"] for s in previews.saved_previews(str(tmp_path / "b"))] == [0, 2]  # only at the end


def test_previews_do_not_change_what_is_trained(tiny_ckpt, five, tmp_path):
    """The sampler's noise has its own generator and every RNG is restored: the same LoRA bit for bit."""
    settings = dict(train_epochs=3, lora_dropout=0.3, validation_split=0.2, validation_every_n_epochs=1)
    on = train_lora(config(tiny_ckpt, five, tmp_path / "on", preview_every_n_epochs=1, **settings))
    off = train_lora(config(tiny_ckpt, five, tmp_path / "off", preview_every_n_epochs=0, **settings))
    assert [p[1] for p in on.history] == [p[1] for p in off.history]
    a, b = adapter(on), adapter(off)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "off" / "previews").exists()
    assert len(previews.saved_previews(str(tmp_path / "on"))) == 4


def test_the_lora_off_reference_is_the_base_model(tiny_ckpt, five, tmp_path):
    """previews/base is the base model's answer to the same prompt and seed: what `acestep-lora sample` renders
    without a LoRA, the same on a second run; the trained LoRA's clips differ from it."""
    train_lora(config(tiny_ckpt, five, tmp_path / "one", train_epochs=2, learning_rate=2e-2, preview_seed=7))
    train_lora(config(tiny_ckpt, five, tmp_path / "two", train_epochs=1, preview_seed=7))
    for i in (1, 2):
        first, _ = read(tmp_path / "one" / "previews" / "base" / f"preview_{i}.flac")
        again, _ = read(tmp_path / "two" / "previews" / "base" / f"preview_{i}.flac")
        assert torch.equal(first, again)
    prompt = json.load(open(tmp_path / "one" / "previews" / "prompts.json"))["prompts"][1]
    alone = generate(tiny_ckpt, Prompt(prompt["caption"], prompt["lyrics"], SECONDS, prompt["bpm"],
                                       prompt["keyscale"], prompt["timesignature"], prompt["language"]),
                     seed=7 + 1, device="cpu")
    base, _ = read(tmp_path / "one" / "previews" / "base" / "preview_2.flac")
    assert torch.allclose(base, alone.waveform, atol=2 ** -22)  # 24-bit FLAC
    trained, _ = read(tmp_path / "one" / "previews" / "epoch_2" / "preview_2.flac")
    assert (trained - base).abs().max() > 1e-3


def test_a_resume_keeps_the_reference_and_lists_every_set(tiny_ckpt, five, tmp_path):
    pressed = [False]  # Cancel stays pressed, as in ComfyUI, from step 6 (epoch 2 of 5 steps each) on

    with pytest.raises(TrainingCancelled):
        train_lora(config(tiny_ckpt, five, tmp_path, train_epochs=3, save_every_n_epochs=1),
                   progress=lambda e: pressed.__setitem__(0, pressed[0] or e.step >= 6),
                   cancel_requested=lambda: pressed[0])
    base = tmp_path / "previews" / "base" / "preview_1.flac"
    stamp = base.stat().st_mtime_ns
    events = []
    train_lora(config(tiny_ckpt, five, tmp_path, train_epochs=3, save_every_n_epochs=1, resume_from="latest"),
               progress=events.append)
    assert base.stat().st_mtime_ns == stamp  # not rendered again
    assert [e["epoch"] for e in lines(tmp_path) if "previews" in e] == [0, 1, 2, 3]
    first = next(e for e in events if e.previews)  # the resumed run announces what it already has
    assert [p["epoch"] for p in first.previews] == [0, 1]


def test_prompts_from_the_user_get_the_trigger_tag_as_in_training():
    samples = [SampleInfo(file="a.pt", name="a", cache_key="k1", caption="held caption, tag", lyrics="held words"),
               SampleInfo(file="b.pt", name="b", cache_key="k2", caption="train caption, tag", bpm=120,
                          keyscale="A minor")]
    meta = DatasetMetadata(custom_tag="tag", tag_position="append")
    cfg = types.SimpleNamespace(preview_captions="", preview_lyrics="", preview_count=3, preview_seconds=20.0)
    prompts, notes = previews.choose_prompts(cfg, samples, meta)
    assert [p.caption for p in prompts] == ["held caption, tag", "train caption, tag", "held caption, tag"]
    assert prompts[0].lyrics == "held words" and prompts[1].bpm == 120 and prompts[1].keyscale == "A minor"
    assert {p.duration for p in prompts} == {20.0} and not notes
    cfg.preview_captions, cfg.preview_lyrics = "dreamy piano\nloud rock, TAG, drums", "[verse]\nla la\n---\n[chorus]"
    prompts, _ = previews.choose_prompts(cfg, samples, meta)
    assert [p.caption for p in prompts] == ["dreamy piano, tag", "loud rock, TAG, drums", "dreamy piano, tag"]
    assert [p.lyrics for p in prompts] == ["[verse]\nla la", "[chorus]", "[verse]\nla la"]
    assert prompts[1].bpm is None  # the user's prompt: no sample metadata
    prompts, _ = previews.choose_prompts(cfg, samples, DatasetMetadata(custom_tag="tag", tag_position="prepend"))
    assert prompts[0].caption == "tag, dreamy piano"
    cfg.preview_captions, cfg.preview_count = '["a", "b", "c"]', 2
    prompts, notes = previews.choose_prompts(cfg, samples, meta)
    assert [p.caption for p in prompts] == ["a, tag", "b, tag"] and "the first 2" in notes[0]


def test_no_text_encoder_says_how_to_train_without_previews(tiny_ckpt, five, tmp_path):
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt, ignore=shutil.ignore_patterns("Qwen3-Embedding-0.6B"))
    with pytest.raises(FileNotFoundError, match="preview_every_n_epochs to 0"):
        train_lora(config(str(ckpt), five, tmp_path / "run"))
    result = train_lora(config(str(ckpt), five, tmp_path / "run2", train_epochs=1, preview_every_n_epochs=0))
    assert os.path.isfile(result.comfy_lora_path) and not (tmp_path / "run2" / "previews").exists()


def test_cancel_while_rendering_stops_the_previews_then_training(tiny_ckpt, five, tmp_path):
    """Cancel pressed while a preview set renders: that set is dropped (said in the log), and training stops at
    its next step with a resumable checkpoint, as it always does."""
    pressed = [False]
    with pytest.raises(TrainingCancelled):
        train_lora(config(tiny_ckpt, five, tmp_path, train_epochs=3, preview_every_n_epochs=1),
                   progress=lambda e: pressed.__setitem__(0, pressed[0] or e.step >= 5),  # epoch 1's last step
                   cancel_requested=lambda: pressed[0])
    notes = [e["note"] for e in lines(tmp_path) if "note" in e]
    assert notes == ["previews epoch_1 stopped by Cancel"], notes
    assert not (tmp_path / "previews" / "epoch_1").exists()
    assert [d.name for d in (tmp_path / "checkpoints").iterdir()] == ["cancelled_epoch_2_step_5"]


def test_previews_and_sample_from_comfyui_files_xl(comfy_models, comfy_official, tmp_path, monkeypatch):
    """Training from ComfyUI's all-in-one XL file (no official folder): the previews' text encoder, condition
    encoder, silence latent and VAE come from that file (trainer.source), and its LoRA-off clip is what the official
    XL folder renders for the same prompt and seed; `sample` reads the same file."""
    from acestep_lora import native
    from acestep_lora.__main__ import main
    from acestep_lora.source import Folders, ModelSource

    from conftest import SILENCE_PROBE

    derive = native.derive_silence_latent  # as long as the official fixture's file, with the short probe
    monkeypatch.setattr(native, "derive_silence_latent", lambda vae: derive(vae, 300, SILENCE_PROBE))
    aio = os.path.join(comfy_models, "checkpoints", "ace_step_1.5_xl_turbo_aio.safetensors")
    folders = Folders(tokenizer_dirs=[os.path.join(comfy_models, "qwen25_tokenizer")])
    tensors = str(tmp_path / "tensors")
    prepare_dataset([item(n, 1.0) for n in "ab"], tensors, PrepareSettings("", aio, device="cpu"), folders=folders)
    train_lora(TrainConfig(tensors, "", str(tmp_path / "run"), config_path=aio, lora_rank=4, lora_alpha=8,
                           train_epochs=1, device="cpu", preview_seconds=SECONDS, preview_count=1,
                           preview_seed=3), folders=folders)
    sets = previews.saved_previews(str(tmp_path / "run"))
    assert [(s["epoch"], s["base"]) for s in sets] == [(0, True), (1, False)]
    base, rate = read(sets[0]["files"][0])
    p = json.load(open(tmp_path / "run" / "previews" / "prompts.json"))["prompts"][0]
    prompt = Prompt(p["caption"], p["lyrics"], SECONDS, p["bpm"], p["keyscale"], p["timesignature"], p["language"])
    official = generate(ModelSource.official(comfy_official, "acestep-v15-xl-turbo"), prompt, seed=3, device="cpu")
    assert rate == 48000 and base.shape == official.waveform.shape
    assert torch.allclose(base, official.waveform, atol=1e-4)
    # the command line, with ComfyUI's models folder as --checkpoint-dir (the tokenizer: the install's own)
    root = tmp_path / "ComfyUI"
    shutil.copytree(os.path.join(comfy_models, "checkpoints"), root / "models" / "checkpoints")
    shutil.copytree(os.path.join(comfy_models, "qwen25_tokenizer"),
                    root / "comfy" / "text_encoders" / "qwen25_tokenizer")
    out = str(tmp_path / "sampled.flac")
    assert main(["sample", "--checkpoint-dir", str(root / "models"), "--config-path",
                 "checkpoints/" + os.path.basename(aio), "--caption", p["caption"], "--lyrics", p["lyrics"],
                 "--bpm", str(p["bpm"]), "--keyscale", p["keyscale"], "--timesignature", p["timesignature"],
                 "--language", p["language"], "--duration", str(SECONDS), "--seed", "3", "--device", "cpu",
                 "-o", out]) == 0
    sampled, _ = read(out)
    assert torch.allclose(sampled, base, atol=2 ** -21)
