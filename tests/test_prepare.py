"""Prepare: the .pt format, conditioning built as inference builds it, the cache, cropping, and bad inputs."""
import math
import os

import pytest
import soundfile as sf
import torch

from acestep_lora import load_dit, load_silence_latent, load_text_encoder
from acestep_lora import prepare as prep
from acestep_lora.prepare import PrepareItem, PrepareSettings, load_manifest, prepare_dataset
from acestep_lora.prompts import caption_prompt, lyrics_prompt


def tone(seconds, rate=48000, channels=2, freq=220.0, seed=0):
    t = torch.arange(int(seconds * rate)) / rate
    g = torch.Generator().manual_seed(seed)
    wave = 0.3 * torch.sin(2 * math.pi * freq * t) + 0.05 * torch.randn(t.shape, generator=g)
    return wave.expand(channels, -1).clone()


def item(name="a", seconds=2.0, **kw):
    meta = dict(caption=f"caption {name}", lyrics="", bpm=120, keyscale="Am", language="en")
    meta.update(kw)
    return PrepareItem(name=name, waveform=tone(seconds, seed=hash(name) % 100), sample_rate=48000, **meta)


@pytest.fixture()
def settings(tiny_ckpt):
    return PrepareSettings(checkpoint_dir=tiny_ckpt, config_path="acestep-v15-turbo", device="cpu")


def test_pt_format_and_conditioning(tiny_ckpt, settings, tmp_path):
    out = str(tmp_path / "t")
    lyrics = "[Verse]\nhello, world\nagain"
    result = prepare_dataset([item("a", 2.0, lyrics=lyrics, timesignature="3/4")], out, settings)
    data = torch.load(os.path.join(out, result.files[0]), map_location="cpu", weights_only=True)
    frames = 2 * 48000 // 1920
    assert data["target_latents"].shape == (frames, 64) and data["target_latents"].dtype == torch.float32
    assert data["attention_mask"].shape == (frames,) and bool((data["attention_mask"] == 1).all())
    assert data["context_latents"].shape == (frames, 128)
    silence = load_silence_latent(tiny_ckpt, "acestep-v15-turbo")
    assert torch.equal(data["context_latents"][:, :64], silence[0, :frames])
    assert bool((data["context_latents"][:, 64:] == 1).all())
    assert data["encoder_attention_mask"].dtype == torch.bool and bool(data["encoder_attention_mask"].all())
    meta = data["metadata"]
    assert meta["keyscale"] == "A minor" and meta["timesignature"] == "3" and meta["duration"] == 2.0
    assert meta["text_prompt"] == caption_prompt("caption a", 120, "3", "A minor", 2.0)

    # The stored condition is exactly the condition encoder applied to the inference-style prompts.
    text = load_text_encoder(tiny_ckpt)
    model = load_dit(tiny_ckpt, "acestep-v15-turbo", components=("encoder",))
    cap, cap_mask = text.encode_caption(meta["text_prompt"])
    lyr, lyr_mask = text.embed_lyrics(lyrics_prompt(lyrics, "en"))
    with torch.no_grad():
        states, mask = model.encoder(cap, cap_mask, lyr, lyr_mask, silence[:, :750], torch.zeros(1, dtype=torch.long))
    assert torch.allclose(data["encoder_hidden_states"], states[0], atol=1e-6)
    assert data["encoder_hidden_states"].shape[0] == cap.shape[1] + lyr.shape[1] + 1  # caption + lyrics + timbre

    manifest = load_manifest(out)
    assert manifest["samples"] == result.files and manifest["num_samples"] == 1
    assert manifest["checkpoint"]["config_path"] == "acestep-v15-turbo" and manifest["checkpoint"]["variant"] == "turbo"


def test_cache_encodes_only_new_or_changed(settings, tmp_path, monkeypatch):
    out = str(tmp_path / "t")
    calls = []
    original = prep._Models.encode
    monkeypatch.setattr(prep._Models, "encode", lambda self, r: calls.append(r.item.name) or original(self, r))
    first = prepare_dataset([item("a"), item("b")], out, settings)
    assert first.encoded == 2 and sorted(calls) == ["a", "b"]
    calls.clear()
    again = prepare_dataset([item("a"), item("b")], out, settings)
    assert again.encoded == 0 and again.reused == 2 and calls == []
    added = prepare_dataset([item("a"), item("b"), item("c")], out, settings)
    assert added.encoded == 1 and calls == ["c"]
    calls.clear()
    changed = prepare_dataset([item("a", caption="a new caption"), item("b"), item("c")], out, settings)
    assert changed.encoded == 1 and calls == ["a"]
    assert load_manifest(out)["num_samples"] == 3


def test_cached_tensor_that_is_damaged_is_reencoded(settings, tmp_path):
    out = str(tmp_path / "t")
    result = prepare_dataset([item("a")], out, settings)
    with open(os.path.join(out, result.files[0]), "wb") as f:
        f.write(b"garbage")
    assert prepare_dataset([item("a")], out, settings).encoded == 1


@pytest.mark.parametrize("position,expected", [("append", "caption a, tag"), ("prepend", "tag, caption a"),
                                               ("replace", "tag")])
def test_custom_tag(settings, tmp_path, position, expected):
    settings.custom_tag, settings.tag_position = "tag", position
    result = prepare_dataset([item("a")], str(tmp_path / "t"), settings)
    meta = torch.load(os.path.join(result.tensor_dir, result.files[0]), weights_only=True)["metadata"]
    assert meta["caption"] == expected and f"# Caption\n{expected}\n" in meta["text_prompt"]


def test_max_duration_crops_and_resampling(settings, tmp_path):
    settings.max_duration = 2.0
    mono_44k = PrepareItem(name="m", caption="c", waveform=tone(5.0, rate=44100, channels=1), sample_rate=44100)
    result = prepare_dataset([mono_44k], str(tmp_path / "t"), settings)
    data = torch.load(os.path.join(result.tensor_dir, result.files[0]), weights_only=True)
    assert data["target_latents"].shape[0] == 50  # 2 s at 25 frames/s
    assert data["metadata"]["duration"] == 2.0 and "- duration: 2 seconds" in data["metadata"]["text_prompt"]


def test_file_paths_and_metadata(settings, tmp_path):
    path = str(tmp_path / "song.flac")
    sf.write(path, tone(1.5, rate=32000).T.numpy(), 32000)
    result = prepare_dataset([PrepareItem(name=path, path=path, caption="x")], str(tmp_path / "t"), settings)
    meta = torch.load(os.path.join(result.tensor_dir, result.files[0]), weights_only=True)["metadata"]
    assert meta["audio_path"] == path and meta["filename"] == "song.flac" and meta["frames"] == 37


def _no_outputs(directory):
    return not os.path.exists(directory) or not [f for f in os.listdir(directory) if not f.startswith(".write")]


@pytest.mark.parametrize("case", ["missing", "corrupt", "empty", "nan", "short", "no_caption"])
def test_bad_sample_named_and_nothing_written(settings, tmp_path, case):
    bad_path = str(tmp_path / "bad.wav")
    if case == "missing":
        bad = PrepareItem(name=bad_path, path=bad_path, caption="x")
        pattern = "not found"
    elif case == "corrupt":
        open(bad_path, "wb").write(b"RIFF....not really audio" * 10)
        bad = PrepareItem(name=bad_path, path=bad_path, caption="x")
        pattern = "could not decode"
    elif case == "empty":
        bad = PrepareItem(name="bad.wav", waveform=torch.zeros(2, 0), sample_rate=48000, caption="x")
        pattern = "empty"
    elif case == "nan":
        bad = PrepareItem(name="bad.wav", waveform=torch.full((2, 48000), float("nan")), sample_rate=48000,
                          caption="x")
        pattern = "NaN"
    elif case == "short":
        bad = PrepareItem(name="bad.wav", waveform=torch.zeros(2, 100), sample_rate=48000, caption="x")
        pattern = "shorter than one latent frame"
    else:
        bad = PrepareItem(name="bad.wav", waveform=tone(1), sample_rate=48000, caption="  ")
        pattern = "caption is empty"
    out = str(tmp_path / "t")
    with pytest.raises((ValueError, FileNotFoundError), match=pattern) as e:
        prepare_dataset([item("good"), bad], out, settings)
    assert "bad.wav" in str(e.value)
    assert _no_outputs(out)  # validation happens before anything is encoded


def test_bad_metadata_named(settings, tmp_path):
    with pytest.raises(ValueError, match="sample 'a'.*keyscale 'Q major'"):
        prepare_dataset([item("a", keyscale="Q major")], str(tmp_path / "t"), settings)


def test_empty_dataset(settings, tmp_path):
    with pytest.raises(ValueError, match="dataset is empty"):
        prepare_dataset([], str(tmp_path / "t"), settings)


def test_unknown_config_path_and_missing_parts(tiny_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="acestep-v15-xl"):
        prepare_dataset([item()], str(tmp_path / "t"), PrepareSettings(tiny_ckpt, "acestep-v15-xl", device="cpu"))
    partial = tmp_path / "partial"
    partial.mkdir()
    os.symlink(os.path.join(tiny_ckpt, "acestep-v15-turbo"), partial / "acestep-v15-turbo")
    with pytest.raises(FileNotFoundError, match="VAE folder not found"):
        prepare_dataset([item()], str(tmp_path / "t"), PrepareSettings(str(partial), device="cpu"))


def test_unwritable_output_dir(settings, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="output_dir .* is not writable"):
        prepare_dataset([item()], str(blocker / "sub"), settings)


def test_cancel_between_samples_leaves_valid_tensors(settings, tmp_path):
    out = str(tmp_path / "t")
    seen = []

    def cancel_after_first():
        if len(seen) == 1:
            raise KeyboardInterrupt
        seen.append(1)

    with pytest.raises(KeyboardInterrupt):
        prepare_dataset([item("a"), item("b")], out, settings, check_cancel=cancel_after_first)
    files = os.listdir(out)
    assert len([f for f in files if f.endswith(".pt")]) == 1 and not any(f.endswith(".tmp") for f in files)
    data = torch.load(os.path.join(out, [f for f in files if f.endswith(".pt")][0]), weights_only=True)
    assert data["target_latents"].shape == (50, 64)
    assert prepare_dataset([item("a"), item("b")], out, settings).encoded == 1  # the rest is finished later


def test_progress_reports_every_sample(settings, tmp_path):
    events = []
    prepare_dataset([item("a"), item("b")], str(tmp_path / "t"), settings,
                    progress=lambda done, total, msg: events.append((done, total)))
    assert (2, 2) in events and all(total == 2 for _, total in events)


def test_cached_files_are_not_decoded_again(settings, tmp_path, monkeypatch):
    path = str(tmp_path / "song.wav")
    sf.write(path, tone(1.0).T.numpy(), 48000)
    out = str(tmp_path / "t")
    prepare_dataset([PrepareItem(name=path, path=path, caption="x")], out, settings)
    decoded = []
    original = prep.audio_io.load_audio_file
    monkeypatch.setattr(prep.audio_io, "load_audio_file", lambda p: decoded.append(p) or original(p))
    again = prepare_dataset([PrepareItem(name=path, path=path, caption="x")], out, settings)
    assert again.reused == 1 and decoded == []  # only hashed, never decoded or encoded
