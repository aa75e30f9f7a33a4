"""Prepare: the .pt format, conditioning built as inference builds it, the cache, long audio (segments / crop),
decode-once, silence and tempo detection, the table of what will be trained on, and bad inputs."""
import math
import os
import re
import struct
import subprocess
import sys

import pytest
import soundfile as sf
import torch

from acestep_lora import load_dit, load_silence_latent, load_text_encoder
from acestep_lora import prepare as prep
from acestep_lora.manifest import Manifest
from acestep_lora.prepare import PrepareItem, PrepareSettings, prepare_dataset
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

    manifest = Manifest.load(out)
    assert manifest.samples == result.files and len(manifest.samples_info) == 1
    assert manifest.config_path == "acestep-v15-turbo" and manifest.checkpoint["variant"] == "turbo"


def test_cache_encodes_only_new_or_changed(settings, tmp_path, monkeypatch):
    out = str(tmp_path / "t")
    calls = []
    original = prep._Models.encode
    monkeypatch.setattr(prep._Models, "encode",
                        lambda self, piece, *a: calls.append(piece.source.item.name) or original(self, piece, *a))
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
    assert len(Manifest.load(out).samples_info) == 3


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
    settings.max_duration, settings.long_audio = 2.0, "crop"
    mono_44k = PrepareItem(name="m", caption="c", waveform=tone(5.0, rate=44100, channels=1), sample_rate=44100)
    result = prepare_dataset([mono_44k], str(tmp_path / "t"), settings)
    data = torch.load(os.path.join(result.tensor_dir, result.files[0]), weights_only=True)
    assert data["target_latents"].shape[0] == 50  # 2 s at 25 frames/s
    assert data["metadata"]["duration"] == 2.0 and "- duration: 2 seconds" in data["metadata"]["text_prompt"]
    info = result.samples_info[0]
    assert (info.duration_used, info.duration_total, info.segments) == (2.0, 5.0, 1)
    assert "cropped 5 s → 2 s (long_audio = crop)" in info.notes
    assert "cropped 5 s → 2 s" in _row(result.table, "m") and "2 s / 5 s" in _row(result.table, "m")
    assert any("cropped to the first 2 s" in w and "m (5 s)" in w for w in result.warnings)


def test_file_paths_and_metadata(settings, tmp_path):
    path = str(tmp_path / "song.flac")
    sf.write(path, tone(1.5, rate=32000).T.numpy(), 32000)
    result = prepare_dataset([PrepareItem(name=path, path=path, caption="x")], str(tmp_path / "t"), settings)
    meta = torch.load(os.path.join(result.tensor_dir, result.files[0]), weights_only=True)["metadata"]
    assert meta["audio_path"] == path and meta["filename"] == "song.flac" and meta["frames"] == 37


def _no_outputs(directory):
    return not os.path.exists(directory) or not [f for f in os.listdir(directory) if not f.startswith(".write")]


@pytest.mark.parametrize("case", ["missing", "corrupt", "empty", "nan", "short", "silent", "no_caption"])
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
    elif case == "silent":  # in memory: refused up front, before anything is written
        bad = PrepareItem(name="bad.wav", waveform=tone(2) * 1e-4, sample_rate=48000, caption="x")
        pattern = r"silent \(peak -\d+ dBFS, below -60 dBFS\)"
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
    monkeypatch.setattr(prep.audio_io, "load_audio_file", lambda p, *a: decoded.append(p) or original(p, *a))
    again = prepare_dataset([PrepareItem(name=path, path=path, caption="x")], out, settings)
    assert again.reused == 1 and decoded == []  # only hashed, never decoded or encoded


# ----------------------------------------------------------------------------------------------------- new behaviour

def _row(table, name):
    """The table lines of the row whose file column is ``name`` (the row and its indented lines)."""
    lines = table.splitlines()
    for i, line in enumerate(lines):
        cells = line.split()
        if len(cells) > 1 and cells[0].isdigit() and line.split("  ")[1].strip() == name:
            end = i + 1
            while end < len(lines) and lines[end].startswith(" "):
                end += 1
            return "\n".join(lines[i:end])
    raise AssertionError(f"no row for {name!r} in\n{table}")


def write(path, wave, rate=48000):
    sf.write(str(path), wave.T.numpy(), rate)
    return str(path)


def test_segments_split_a_long_clip_into_equal_samples(settings, tmp_path):
    settings.max_duration = 1.0  # the clip is 2.5 x max_duration -> 3 equal pieces of 0.833 s, no short tail
    path = write(tmp_path / "long song.wav", tone(2.5, rate=44100), 44100)
    result = prepare_dataset([PrepareItem(name=path, path=path, caption="dark synthwave, arpeggios", bpm=100,
                                          keyscale="Am", language="instrumental")], str(tmp_path / "t"), settings)
    manifest = Manifest.load(result.tensor_dir)
    assert result.encoded == 3 and len(manifest.samples) == 3
    infos = manifest.samples_info
    assert [i.segment for i in infos] == [0, 1, 2] and all(i.segments == 3 for i in infos)
    assert [i.offset for i in infos] == [0.0, pytest.approx(0.833, abs=1e-3), pytest.approx(1.667, abs=1e-3)]
    assert len({i.cache_key for i in infos}) == 3 and [i.file for i in infos] == manifest.samples
    for info, name in zip(infos, manifest.samples):
        meta = torch.load(os.path.join(result.tensor_dir, name), weights_only=True)["metadata"]
        assert meta["caption"] == info.caption == "dark synthwave, arpeggios"
        assert (meta["bpm"], meta["keyscale"]) == (100, "A minor")
        assert meta["duration"] == info.duration_used == pytest.approx(2.5 / 3, abs=1e-3)
        assert "- duration: 0 seconds" in meta["text_prompt"]  # the piece's length, as int() writes it
        assert info.duration_total == 2.5 and "split into 3 × 0.8 s (long_audio = segments)" in info.notes
    row = _row(result.table, "long song.wav")
    assert "3 × 0.8 s / 2.5 s" in row and "100 (typed)" in row and "A minor" in row
    assert any("split into equal segments" in w and "long song.wav (2.5 s → 3 × 0.8 s)" in w
               for w in result.warnings)


def test_each_new_sample_is_decoded_once_and_cached_ones_never(settings, tmp_path, monkeypatch):
    """One soundfile.read per new training sample (a segment counts as one), none in validation or for cache."""
    settings.max_duration = 1.0
    import soundfile

    files = [write(tmp_path / "a.wav", tone(1.0)), write(tmp_path / "b.flac", tone(1.8, seed=1))]  # b: 2 pieces
    reads = []
    real_read = soundfile.read
    monkeypatch.setattr(soundfile, "read", lambda *a, **k: reads.append((a[0], k.get("start"), k.get("frames")))
                        or real_read(*a, **k))
    items = [PrepareItem(name=f, path=f, caption="c", bpm=90) for f in files]
    out = str(tmp_path / "t")
    first = prepare_dataset(items, out, settings)
    assert first.encoded == 3 and len(reads) == 3
    assert sorted(reads) == sorted([(files[0], 0, 48000), (files[1], 0, 43200), (files[1], 43200, 43200)])
    reads.clear()
    assert prepare_dataset(items, out, settings).encoded == 0 and reads == []
    items.append(PrepareItem(name="c", path=write(tmp_path / "c.wav", tone(0.5, seed=2)), caption="c", bpm=90))
    assert prepare_dataset(items, out, settings).encoded == 1 and len(reads) == 1


def test_silent_file_refused_by_name_and_earlier_samples_stay_cached(settings, tmp_path):
    good = write(tmp_path / "good.wav", tone(1.0))
    silent = write(tmp_path / "silent.wav", torch.zeros(2, 48000))
    later = write(tmp_path / "later.wav", tone(1.0, seed=3))
    items = [PrepareItem(name=p, path=p, caption="c", bpm=90) for p in (good, silent, later)]
    out = str(tmp_path / "t")
    with pytest.raises(ValueError) as e:
        prepare_dataset(items, out, settings)
    message = str(e.value)
    assert f"sample '{silent}'" in message and "digital silence" in message and "below -60 dBFS" in message
    assert "The sample encoded before it in this run is cached" in message
    assert "running Prepare again encodes only the samples that are not cached yet" in message
    assert len([f for f in os.listdir(out) if f.endswith(".pt")]) == 1 and not os.path.exists(
        os.path.join(out, "manifest.json"))
    again = prepare_dataset([items[0], items[2]], out, settings)
    assert (again.encoded, again.reused) == (1, 1)


def test_very_short_clip_is_accepted_with_a_note(settings, tmp_path):
    result = prepare_dataset([item("tiny", 0.5), item("ten", prep.VERY_SHORT_SECONDS)], str(tmp_path / "t"),
                             settings)
    assert "very short (0.5 s)" in result.samples_info[0].notes and "very short" in _row(result.table, "tiny")
    assert not any("very short" in n for n in result.samples_info[1].notes)
    assert any("1 clip shorter than 10 s" in w and "tiny (0.5 s)" in w for w in result.warnings)


def test_detected_tempo_is_shown_stored_and_used_in_the_prompt(settings, tmp_path, monkeypatch):
    from synthetic_music import make_clip

    groove = PrepareItem(name="groove", caption="rock groove", waveform=make_clip(120, 8.0, seed=3),
                         sample_rate=48000)
    short = item("short", 2.0, bpm=0)  # too short to measure: unknown, N/A in the prompt
    out = str(tmp_path / "t")
    result = prepare_dataset([groove, short], out, settings)
    infos = result.samples_info
    assert infos[0].bpm_source == "detected" and abs(infos[0].bpm - 120) <= 2
    assert (infos[1].bpm, infos[1].bpm_source) == (None, "unknown")
    metas = [torch.load(os.path.join(out, f), weights_only=True)["metadata"] for f in result.files]
    assert f"- bpm: {infos[0].bpm}\n" in metas[0]["text_prompt"] and metas[0]["bpm"] == infos[0].bpm
    assert "- bpm: N/A\n" in metas[1]["text_prompt"]
    assert f"{infos[0].bpm} (detected)" in _row(result.table, "groove") and "unknown" in _row(result.table, "short")

    # Cached: the detected tempo comes from the tensor file, nothing is decoded or detected again.
    monkeypatch.setattr("acestep_lora.bpm.detect_bpm", lambda w, r: pytest.fail("detected again"))
    again = prepare_dataset([groove, short], out, settings)
    assert again.reused == 2 and again.samples_info == infos

    # detect_bpm off: a different training prompt, so a different sample; unknown stays unknown.
    settings.detect_bpm = False
    off = prepare_dataset([groove], str(tmp_path / "off"), settings)
    assert off.samples_info[0].bpm is None and off.samples_info[0].cache_key != infos[0].cache_key


def test_tempo_detector_gets_the_decoded_window_and_its_failure_means_unknown(settings, tmp_path, monkeypatch):
    calls = []

    def no_beat(waveform, rate):
        calls.append((tuple(waveform.shape), rate))
        raise ValueError("no steady beat")

    monkeypatch.setattr("acestep_lora.bpm.detect_bpm", no_beat)
    path = write(tmp_path / "drone.wav", tone(1.5, rate=32000), 32000)
    result = prepare_dataset([PrepareItem(name=path, path=path, caption="drone")], str(tmp_path / "t"), settings)
    assert calls == [((2, 48000), 32000)]  # the audio as decoded, at its own rate
    assert (result.samples_info[0].bpm, result.samples_info[0].bpm_source) == (None, "unknown")
    # The table says why, also when the tensors are reused (the reason is kept in the tensor file).
    assert "no steady beat" in _row(result.table, "drone.wav")
    again = prepare_dataset([PrepareItem(name=path, path=path, caption="drone")], str(tmp_path / "t"), settings)
    assert again.reused == 1 and "no steady beat" in _row(again.table, "drone.wav")
    assert len(calls) == 1  # read back from the tensor file, not detected again


def test_table_and_manifest_show_what_will_be_trained_on(settings, tmp_path):
    """A small mixed folder: a file-name caption, a caption-like .txt read as lyrics, a JSON sidecar with a
    _caption.txt that wins, a tempo Create detected; the table and the manifest say the same."""
    from acestep_lora.samples import collect_samples, create_sample

    songs = tmp_path / "songs"
    songs.mkdir()
    write(songs / "01 - Track 1.wav", tone(1.0))
    write(songs / "tags.wav", tone(1.2, seed=1))
    (songs / "tags.txt").write_text("lofi, vinyl crackle, mellow piano")
    write(songs / "ballad.wav", tone(1.4, seed=2))
    (songs / "ballad.json").write_text('{"caption": "json caption", "bpm": 72, "keyscale": "F#m", "language": "en"}')
    (songs / "ballad_caption.txt").write_text("slow piano ballad, soft female vocals, strings, melancholic")
    (songs / "ballad_lyrics.txt").write_text("[Verse]\nUnder the quiet lamp\n[Chorus]\nla la")
    from synthetic_music import make_clip

    made = create_sample(make_clip(120, 5.0, seed=3), 48000, "made by create", str(songs), bpm=0)
    assert made["bpm_source"] == "detected"

    found = collect_samples(str(songs))
    result = prepare_dataset(prep.items_from_samples(found), str(tmp_path / "t"), settings)
    by_name = {os.path.basename(i.name): i for i in result.samples_info}

    track = by_name["01 - Track 1.wav"]
    assert (track.caption, track.caption_source) == ("01 - Track 1", "file name")
    assert (track.lyrics, track.lyrics_source, track.instrumental) == (
        "[Instrumental]", "none → [Instrumental]", True)
    assert "caption from file name" in track.notes
    row = _row(result.table, "01 - Track 1.wav")
    assert '"01 - Track 1"  (from the file name)' in row and "[Instrumental]  (none given)" in row
    assert "caption from file name" in row and "1 s" in row.splitlines()[0]

    tags = by_name["tags.wav"]
    assert (tags.lyrics, tags.lyrics_source) == ("lofi, vinyl crackle, mellow piano", "tags.txt")
    note = "tags.txt is read as LYRICS (official convention); if it is a caption, rename it tags_caption.txt"
    assert note in tags.notes and note in result.warnings and note in _row(result.table, "tags.wav")
    assert '"lofi, vinyl crackle, mellow piano"  (from tags.txt)' in _row(result.table, "tags.wav")

    ballad = by_name["ballad.wav"]
    assert (ballad.caption_source, ballad.lyrics_source) == ("ballad_caption.txt", "ballad_lyrics.txt")
    assert (ballad.bpm, ballad.bpm_source, ballad.keyscale, ballad.language) == (72, "typed", "F# minor",
                                                                                              "en")
    assert ballad.notes == ["very short (1.4 s)"] and not ballad.instrumental
    row = _row(result.table, "ballad.wav")
    assert '"slow piano ballad, soft female vocals,…"  (from ballad_caption.txt)' in row  # 40 characters
    assert '"[Verse] / Under the quiet lamp / [Choru…"  (from ballad_lyrics.txt)' in row
    assert "72 (typed)" in row and "F# minor" in row and " en" in row.splitlines()[0]

    made_info = by_name[os.path.basename(made["audio_path"])]
    assert made_info.caption_source == os.path.basename(made["sidecar_path"])
    assert (made_info.bpm, made_info.bpm_source) == (made["bpm"], "detected (Create)")
    assert f"{made['bpm']} (detected by Create)" in _row(result.table, os.path.basename(made["audio_path"]))

    assert ("2 files have no caption and will train on their file names as caption: 01 - Track 1.wav, tags.wav. "
            "Write the caption into <name>_caption.txt") in result.warnings[0]
    assert result.status.startswith(result.header) and result.status.endswith(result.table)
    assert result.status.index("Check before training:") < result.status.index(result.table)
    manifest = Manifest.load(result.tensor_dir)
    assert manifest.samples_info == result.samples_info and manifest.warnings == result.warnings

    # The same files typed without sources (the node path): Prepare credits the sidecars itself.
    typed = [PrepareItem(name=s.audio_path, path=s.audio_path, caption=s.caption, lyrics=s.lyrics, bpm=s.bpm,
                         keyscale=s.keyscale, language=s.language) for s in found]
    again = prepare_dataset(typed, str(tmp_path / "t"), settings)
    assert again.reused == 4 and again.samples_info == result.samples_info and again.table == result.table
    # ... and a caption typed over the sidecar's is credited to the typing.
    typed[0].caption = "my own words"
    changed = prepare_dataset(typed, str(tmp_path / "t"), settings)
    notes = changed.samples_info[0].notes
    assert changed.samples_info[0].caption_source == "typed" and notes[0] == "very short (1 s)"
    assert len(notes) == 2 and "too short to measure its tempo" in notes[1]  # why its tempo is unknown


def test_header_counts_and_no_silly_ratio(settings, tmp_path):
    out = str(tmp_path / "t")
    first = prepare_dataset([item("a")], out, settings)
    assert first.header.startswith("Prepared 1 sample (1 encoded, 0 cached): 2 s of audio; encoded 2 s in ")
    assert not re.search(r"(?<![\d.])0(\.0*)?× real time", first.header)
    for elapsed in (0.3, 2.0, 50.0, 700.0):  # a blink (no ratio), fast, slow, very slow (2 s in 700 s: 0.0029×)
        header = prep._header(1, [prep._resolve_source(item("a"), settings)], 1, 2.0, 2.0, elapsed, "cpu", "out")
        assert not re.search(r"(?<![\d.])0(\.0*)?×", header) and ("real time" in header) == (elapsed >= 1), header
    again = prepare_dataset([item("a")], out, settings)
    assert again.header.startswith("Prepared 1 sample (0 encoded, 1 cached): 2 s of audio, all from the cache (")
    assert "real time" not in again.header
    two = prepare_dataset([item("a"), item("b")], out, settings)
    assert two.header.startswith("Prepared 2 samples (1 encoded, 1 cached)")


# ----------------------------------------------------------------------------------------------------- memory

def _crc_table(poly, bits):
    top, mask = 1 << (bits - 1), (1 << bits) - 1
    table = []
    for byte in range(256):
        crc = byte << (bits - 8)
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & mask if crc & top else (crc << 1) & mask
        table.append(crc)
    return table


_CRC8, _CRC16 = _crc_table(0x07, 8), _crc_table(0x8005, 16)


def _utf8_number(n):
    """A FLAC frame number ("UTF-8"-style coded, RFC 9639 section 9.1.5)."""
    if n < 0x80:
        return bytes([n])
    length = next(k for k, limit in ((2, 0x800), (3, 0x10000), (4, 0x200000), (5, 0x4000000)) if n < limit)
    tail = []
    for _ in range(length - 1):
        tail.append(0x80 | (n & 0x3F))
        n >>= 6
    return bytes([((0xFF << (8 - length)) & 0xFF) | n] + tail[::-1])


def write_square_flac(path, seconds, level=328):
    """A valid 48 kHz 16-bit stereo FLAC (RFC 9639) of a -40 dBFS square wave (one 4096-sample block up, one
    down), written directly as CONSTANT subframes: a 2-hour file in ~1 s where libFLAC's encoder takes ~20 s."""
    rate, block, total = 48000, 4096, int(seconds * 48000)
    info = struct.pack(">HH", block, block) + bytes(6)  # block sizes; frame sizes unknown
    info += ((rate << 44) | (1 << 41) | (15 << 36) | total).to_bytes(8, "big") + bytes(16)  # 2 ch, 16 bit; no MD5
    with open(path, "wb") as f:
        f.write(b"fLaC" + bytes([0x80, 0, 0, 34]) + info)  # the last (only) metadata block: STREAMINFO
        for number, start in enumerate(range(0, total, block)):
            size = min(block, total - start)
            code = 0xC if size == block else 0x7  # 4096, or "16-bit size - 1 follows"
            header = bytes([0xFF, 0xF8, (code << 4) | 0xA, 0x18]) + _utf8_number(number)  # 48 kHz; L/R; 16 bit
            header += struct.pack(">H", size - 1) if code == 0x7 else b""
            crc = 0
            for b in header:
                crc = _CRC8[crc ^ b]
            frame = header + bytes([crc]) + (b"\0" + struct.pack(">h", level if number % 2 == 0 else -level)) * 2
            crc = 0
            for b in frame:
                crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ b]
            f.write(frame + struct.pack(">H", crc))


@pytest.fixture(scope="session")
def two_hour_flac(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("long") / "two_hours.flac")
    write_square_flac(path, 2 * 3600)
    return path


_PREPARE_AND_REPORT_PEAK_RSS = """
import resource, sys
import torch
torch.set_num_threads(1)
from acestep_lora.prepare import PrepareItem, PrepareSettings, prepare_dataset
path, ckpt, out = sys.argv[1:4]
settings = PrepareSettings(ckpt, device="cpu", max_duration=30, long_audio="crop")
result = prepare_dataset([PrepareItem(name=path, path=path, caption="square wave", bpm=120)], out, settings)
assert result.encoded == 1 and result.samples_info[0].duration_used == 30.0, result.status
print("PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss_kib(runs, ckpt):
    """Prepare each (audio path, output folder) in its own fresh Python process, side by side; the peak resident
    memory of each (KiB, Linux ru_maxrss)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", _PREPARE_AND_REPORT_PEAK_RSS, path, ckpt, out], cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for path, out in runs]
    peaks = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        peaks.append(int(stdout.split("PEAK_RSS_KIB")[-1].split()[0]))
    return peaks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux only")
def test_two_hour_file_costs_no_more_memory_than_its_window(tiny_ckpt, two_hour_flac, tmp_path):
    """A 2-hour 48 kHz stereo FLAC cropped to 30 s peaks within 2x the memory of a 30 s file (decoding it whole
    took +5.2 GB): only the window used is decoded."""
    short = str(tmp_path / "thirty_seconds.flac")
    write_square_flac(short, 30)
    rss_short, rss_long = _peak_rss_kib([(short, str(tmp_path / "t_short")), (two_hour_flac, str(tmp_path / "t_long"))],
                                        tiny_ckpt)
    assert rss_long < 2 * rss_short, f"2-hour file peaked at {rss_long / 2**20:.2f} GiB, 30 s file at " \
                                     f"{rss_short / 2**20:.2f} GiB"


def test_a_file_listed_twice_is_pointed_out(settings, tmp_path):
    path = write(tmp_path / "song.wav", tone(1.0))
    copy = PrepareItem(name=path, path=path, caption="c", bpm=90)
    result = prepare_dataset([copy, PrepareItem(name=path, path=path, caption="c", bpm=90), item("other")],
                             str(tmp_path / "t"), settings)
    assert (result.encoded, result.reused) == (2, 1) and result.files[0] == result.files[1]  # one file, twice
    assert [w for w in result.warnings if "listed 2 times" in w] == [
        "the same audio with the same metadata is listed 2 times (song.wav, song.wav): it is trained on 2 times as "
        "often as the other samples; remove the copies unless you mean it."]
