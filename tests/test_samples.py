"""acestep_lora/samples.py: create (files, identity, bpm, float fallback) and collect (our sidecars, plain folders)."""
import json
import math
import os

import pytest
import soundfile as sf
import torch

from acestep_lora import samples
from acestep_lora.samples import Sample, collect_samples, create_sample, folder_fingerprint

SR = 44100


def tone(seconds=1.0, sr=SR, channels=2, freq=220.0, amp=0.5):
    t = torch.arange(int(seconds * sr)) / sr
    wave = amp * torch.sin(2 * math.pi * freq * t)
    return torch.stack([wave * (1 - 0.1 * c) for c in range(channels)])  # [C, N], channels differ


@pytest.fixture()
def fake_bpm(monkeypatch):
    """Deterministic detector: records its calls, returns 123.4."""
    calls = []

    def detect(waveform, sample_rate):
        calls.append((tuple(waveform.shape), sample_rate))
        return 123.4

    monkeypatch.setattr("acestep_lora.bpm.detect_bpm", detect)
    return calls


def snapshot(folder):
    return {name: (os.stat(os.path.join(folder, name)).st_mtime_ns, open(os.path.join(folder, name), "rb").read())
            for name in sorted(os.listdir(folder))}


# ----------------------------------------------------------------------------------------------------- create

def test_create_writes_flac_and_sidecar(tmp_path):
    wave = tone(1.0, channels=2)
    info = create_sample(wave, SR, "  Upbeat pop, synth leads!  ", str(tmp_path), lyrics="[Verse]\nla la, la",
                         bpm=128, keyscale="C Major", language="EN", timesignature="4/4")
    assert info["status"] == "created"
    assert len(info["id"]) == 12 and int(info["id"], 16) >= 0
    base = f"upbeat_pop_synth_leads_{info['id']}"
    assert info["audio_path"] == str(tmp_path / f"{base}.flac")
    assert info["sidecar_path"] == str(tmp_path / f"{base}.json")
    assert sorted(os.listdir(tmp_path)) == [f"{base}.flac", f"{base}.json"]

    data, rate = sf.read(info["audio_path"], dtype="float32", always_2d=True)
    assert rate == SR and data.shape == (SR, 2)
    assert sf.info(info["audio_path"]).subtype == "PCM_24"
    assert torch.allclose(torch.from_numpy(data.T), wave, atol=2.0 ** -22)  # 24-bit quantisation

    with open(info["sidecar_path"], encoding="utf-8") as f:
        sidecar = json.load(f)
    assert sidecar == {k: v for k, v in info.items() if k not in ("audio_path", "sidecar_path", "status")}
    assert sidecar["format"] == "acestep-lora-sample" and sidecar["format_version"] == 1
    assert sidecar["audio_file"] == f"{base}.flac"
    assert (sidecar["caption"], sidecar["lyrics"]) == ("Upbeat pop, synth leads!", "[Verse]\nla la, la")
    assert (sidecar["bpm"], sidecar["bpm_source"]) == (128, "user")
    assert (sidecar["keyscale"], sidecar["language"], sidecar["timesignature"]) == ("C major", "en", "4")
    assert sidecar["duration"] == pytest.approx(1.0) and sidecar["sample_rate"] == SR and sidecar["channels"] == 2
    assert sidecar["created_at"].endswith("+00:00")


def test_mono_1d_input_and_defaults(tmp_path, fake_bpm):
    info = create_sample(tone(1.0, channels=1)[0], 22050, "drone", str(tmp_path), lyrics="", keyscale="Am")
    assert info["channels"] == 1 and info["sample_rate"] == 22050
    assert sf.info(info["audio_path"]).channels == 1
    assert info["lyrics"] == "[Instrumental]" and info["language"] == "instrumental"
    assert info["keyscale"] == "A minor" and info["timesignature"] == ""


def test_same_sample_twice_exists_and_writes_nothing(tmp_path, fake_bpm):
    wave = tone(1.0)
    first = create_sample(wave, SR, "calm piano", str(tmp_path))
    before = snapshot(tmp_path)
    second = create_sample(wave.clone(), SR, "calm piano", str(tmp_path), keyscale="", lyrics="[Instrumental]")
    assert second["status"] == "exists" and second["id"] == first["id"]
    assert second["audio_path"] == first["audio_path"] and second["bpm"] == first["bpm"] == 123
    assert snapshot(tmp_path) == before
    assert len(fake_bpm) == 1  # an existing sample is not analysed again


@pytest.mark.parametrize("change", [
    dict(caption="calm piano, rain"),
    dict(waveform=tone(1.0, freq=221.0)),
    dict(lyrics="[Verse]\nhello"),
    dict(bpm=90),
    dict(keyscale="D minor"),
    dict(language="en"),
    dict(timesignature="3/4"),
    dict(sample_rate=48000),
])
def test_any_difference_is_a_new_sample_and_old_files_untouched(tmp_path, change):
    args = dict(waveform=tone(1.0), sample_rate=SR, caption="calm piano", output_dir=str(tmp_path), bpm=100)
    first = create_sample(**args)
    before = snapshot(tmp_path)
    second = create_sample(**{**args, **change})
    assert second["status"] == "created" and second["id"] != first["id"]
    after = snapshot(tmp_path)
    assert {k: after[k] for k in before} == before  # old files: same bytes, same mtime
    assert len(after) == 4


def test_id_is_deterministic_and_shape_aware():
    fields = dict(caption="x", lyrics="[Instrumental]", bpm=None, keyscale="", language="instrumental",
                  timesignature="")
    assert samples.sample_id(tone(0.1), SR, fields) == samples.sample_id(tone(0.1), SR, dict(fields))
    # same bytes, different shape -> different id
    flat = tone(0.1).reshape(1, -1)
    assert samples.sample_id(flat, SR, fields) != samples.sample_id(tone(0.1), SR, fields)


def test_bpm_autodetect_uses_detector(tmp_path, fake_bpm):
    info = create_sample(tone(1.0), SR, "groove", str(tmp_path), bpm=0)
    assert (info["bpm"], info["bpm_source"]) == (123, "detected")
    assert fake_bpm == [((2, SR), SR)]
    assert "note" not in info
    assert json.load(open(info["sidecar_path"]))["bpm"] == 123


def test_bpm_unknown_when_detector_fails(tmp_path, monkeypatch):
    def fail(waveform, sample_rate):
        raise ValueError("clip too short to measure a tempo")

    monkeypatch.setattr("acestep_lora.bpm.detect_bpm", fail)
    info = create_sample(tone(1.0), SR, "groove", str(tmp_path))
    assert info["bpm"] is None and info["bpm_source"] == "unknown"
    assert "too short" in info["note"] and "bpm input" in info["note"]
    sidecar = json.load(open(info["sidecar_path"]))
    assert sidecar["bpm"] is None and "note" not in sidecar
    assert collect_samples(str(tmp_path))[0].bpm is None


def test_bpm_unknown_when_detected_value_out_of_range(tmp_path, monkeypatch):
    monkeypatch.setattr("acestep_lora.bpm.detect_bpm", lambda waveform, sample_rate: float("nan"))
    info = create_sample(tone(0.5), SR, "groove", str(tmp_path))
    assert info["bpm"] is None and info["bpm_source"] == "unknown" and "outside" in info["note"]


def test_bpm_detection_with_real_detector(tmp_path):
    try:
        from synthetic_music import make_clip
    except ImportError:
        pytest.skip("tests/synthetic_music.py (make_clip) is not available yet")
    clip = make_clip(120, 8.0, sample_rate=48000, seed=3)
    info = create_sample(clip, 48000, "synthetic rock groove", str(tmp_path))
    assert info["bpm_source"] == "detected", info.get("note")
    assert abs(info["bpm"] - 120) <= 2


def test_beatless_audio_stored_as_unknown_and_said(tmp_path):
    """Noise has onsets but no steady beat: the real detector's confidence is low, so the tempo is stored as
    unknown (never a made-up number) and the note the node shows says why and what to do."""
    noise = 0.1 * torch.randn(2, SR * 8, generator=torch.Generator().manual_seed(5))
    info = create_sample(noise, SR, "rain on a window", str(tmp_path))
    assert info["bpm"] is None and info["bpm_source"] == "unknown"
    assert "no steady beat" in info["note"] and "confidence" in info["note"] and "bpm input" in info["note"]
    assert json.load(open(info["sidecar_path"]))["bpm"] is None


def test_peak_above_one_saved_as_float_wav(tmp_path):
    wave = tone(0.5, amp=1.7)
    info = create_sample(wave, SR, "loud synth", str(tmp_path), bpm=120)
    assert info["audio_path"].endswith(f"loud_synth_{info['id']}.wav") and info["audio_file"].endswith(".wav")
    assert sf.info(info["audio_path"]).subtype == "FLOAT"
    data, rate = sf.read(info["audio_path"], dtype="float32", always_2d=True)
    assert rate == SR and torch.equal(torch.from_numpy(data.T), wave)  # bit-exact, not clipped
    assert create_sample(wave, SR, "loud synth", str(tmp_path), bpm=120)["status"] == "exists"


@pytest.mark.parametrize("kwargs,match", [
    (dict(caption="   "), "caption is empty"),
    (dict(keyscale="H major"), "keyscale 'H major'.*F# minor"),
    (dict(language="klingon"), "language 'klingon'"),
    (dict(timesignature="5/4"), "timesignature '5/4'"),
    (dict(bpm=500), "bpm 500 is outside"),
    (dict(waveform=torch.zeros(2, 0)), "empty"),
    (dict(waveform=torch.full((2, 100), float("nan"))), "NaN"),
])
def test_invalid_inputs_rejected_before_writing(tmp_path, kwargs, match):
    args = dict(waveform=tone(0.2), sample_rate=SR, caption="ok", output_dir=str(tmp_path / "out"), bpm=100)
    with pytest.raises(ValueError, match=match):
        create_sample(**{**args, **kwargs})
    assert not (tmp_path / "out").exists()


def test_corrupt_sidecar_is_not_overwritten(tmp_path):
    args = dict(waveform=tone(0.3), sample_rate=SR, caption="calm piano", output_dir=str(tmp_path), bpm=100)
    info = create_sample(**args)
    with open(info["sidecar_path"], "w") as f:
        f.write("{not json")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="cannot be read.*not overwritten"):
        create_sample(**args)
    assert snapshot(tmp_path) == before


def test_missing_audio_is_rewritten_from_same_content(tmp_path):
    args = dict(waveform=tone(0.3), sample_rate=SR, caption="calm piano", output_dir=str(tmp_path), bpm=100)
    info = create_sample(**args)
    sidecar = open(info["sidecar_path"], "rb").read()
    os.remove(info["audio_path"])
    again = create_sample(**args)
    assert again["status"] == "created" and os.path.isfile(info["audio_path"])
    assert open(info["sidecar_path"], "rb").read() == sidecar


# ----------------------------------------------------------------------------------------------------- collect

def write_audio(path, seconds=0.2, sr=SR):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, tone(seconds, sr=sr).T.numpy(), sr)


def test_collect_reads_create_output(tmp_path):
    a = create_sample(tone(0.3), SR, "calm piano, rain", str(tmp_path), lyrics="[Verse]\none, two\nthree",
                      bpm=72, keyscale="F#m", language="en", timesignature="3/4")
    b = create_sample(tone(0.3, amp=1.5), SR, "loud synth", str(tmp_path), bpm=140)
    found = collect_samples(str(tmp_path))
    by_id = {s.sample_id: s for s in found}
    assert [s.audio_path for s in found] == sorted(s.audio_path for s in found)
    sidecar = os.path.basename(a["sidecar_path"])
    assert by_id[a["id"]] == Sample(a["audio_path"], "calm piano, rain", "[Verse]\none, two\nthree", 72, "F# minor",
                                    "en", "3", a["id"], caption_source=sidecar, lyrics_source=sidecar,
                                    bpm_source="typed", notes=[])
    assert by_id[b["id"]] == Sample(b["audio_path"], "loud synth", "[Instrumental]", 140, "", "instrumental", "",
                                    b["id"], caption_source=os.path.basename(b["sidecar_path"]),
                                    lyrics_source=os.path.basename(b["sidecar_path"]), bpm_source="typed", notes=[])


def test_collect_plain_folder_sidecar_conventions(tmp_path):
    root = tmp_path / "songs"
    write_audio(str(root / "a_song.wav"))
    (root / "a_song.txt").write_text("[Verse]\nhello, world\nagain", encoding="utf-8")
    (root / "a_song_prompt.txt").write_text("rock, loud guitars, drums\n", encoding="utf-8")
    write_audio(str(root / "b.flac"))
    (root / "b.json").write_text(json.dumps({"prompt": "jazz, brushes", "key": "Bbm", "time_signature": "6/8",
                                             "vocal_language": "FR", "tempo": "96", "lyrics": "json lyrics"}))
    (root / "b.txt").write_text("txt lyrics")
    (root / "b_lyrics.txt").write_text("explicit lyrics, with commas\nand lines")
    write_audio(str(root / "c.ogg"))
    (root / "c.json").write_text(json.dumps({"tags": ["ambient", "pads"], "lyrics": "la\nla"}))
    write_audio(str(root / "d_no_meta.wav"))
    (root / ".hidden.wav").write_bytes(b"junk")
    (root / ".d_no_meta.wav.abc.tmp").write_bytes(b"junk")
    (root / "notes.md").write_text("not audio")

    found = collect_samples(str(root))
    assert [os.path.basename(s.audio_path) for s in found] == ["a_song.wav", "b.flac", "c.ogg", "d_no_meta.wav"]
    a, b, c, d = found
    assert (a.caption, a.lyrics, a.language) == ("rock, loud guitars, drums", "[Verse]\nhello, world\nagain",
                                                 "unknown")
    assert (b.caption, b.lyrics) == ("jazz, brushes", "explicit lyrics, with commas\nand lines")
    assert (b.bpm, b.keyscale, b.timesignature, b.language) == (96, "Bb minor", "6", "fr")
    assert (c.caption, c.lyrics, c.bpm, c.keyscale) == ("ambient, pads", "la\nla", None, "")
    assert (d.caption, d.lyrics, d.language, d.sample_id) == ("d no meta", "[Instrumental]", "instrumental", "")
    assert all(os.path.isabs(s.audio_path) for s in found)
    # where each text came from
    assert (a.caption_source, a.lyrics_source, a.notes) == ("a_song_prompt.txt", "a_song.txt", [])
    assert (b.caption_source, b.lyrics_source, b.bpm_source) == ("b.json", "b_lyrics.txt", "typed")
    assert (c.caption_source, c.lyrics_source, c.bpm_source) == ("c.json", "c.json", "")
    assert (d.caption_source, d.lyrics_source, d.notes) == ("file name", "none → [Instrumental]",
                                                            ["caption from file name"])


def test_collect_caption_precedence_and_sources(tmp_path):
    write_audio(str(tmp_path / "s.wav"))
    (tmp_path / "s.json").write_text(json.dumps({"caption": "from json"}))
    assert (collect_samples(str(tmp_path))[0].caption, collect_samples(str(tmp_path))[0].caption_source) == (
        "from json", "s.json")
    (tmp_path / "s_prompt.txt").write_text("from prompt txt")
    assert collect_samples(str(tmp_path))[0].caption == "from prompt txt"
    (tmp_path / "s_caption.txt").write_text("  from caption txt, wins\n")
    found = collect_samples(str(tmp_path))[0]
    assert (found.caption, found.caption_source, found.notes) == ("from caption txt, wins", "s_caption.txt", [])
    (tmp_path / "s_caption.txt").write_text("   ")  # blank: falls through to the next source
    assert collect_samples(str(tmp_path))[0].caption_source == "s_prompt.txt"


def test_collect_flags_file_name_caption(tmp_path):
    write_audio(str(tmp_path / "01 - Track 1.flac"))
    (tmp_path / "01 - Track 1.json").write_text(json.dumps({"bpm": 120}))  # metadata, but no caption
    found = collect_samples(str(tmp_path))[0]
    assert (found.caption, found.caption_source) == ("01 - Track 1", samples.FROM_FILE_NAME)
    assert found.notes == [samples.NOTE_FILE_NAME_CAPTION] == ["caption from file name"]
    assert (found.bpm, found.bpm_source) == (120, "typed")


@pytest.mark.parametrize("text,flagged", [
    ("rock, loud guitars, drums", True),           # a caption saved under the lyrics name
    ("ambient piano", True),                       # one line, no section tags
    ("[Verse]\nhello, world\nagain", False),       # lyrics: line breaks and section tags
    ("la la la\nla la", False),                    # several lines
    ("[Instrumental]", False),                     # a section tag
])
def test_collect_txt_is_lyrics_and_flagged_when_it_looks_like_a_caption(tmp_path, text, flagged):
    write_audio(str(tmp_path / "song.wav"))
    (tmp_path / "song.txt").write_text(text)
    found = collect_samples(str(tmp_path))[0]
    assert found.lyrics == text and found.lyrics_source == "song.txt"  # the official convention: lyrics
    note = "song.txt is read as LYRICS (official convention); if it is a caption, rename it song_caption.txt"
    assert (note in found.notes) == flagged
    assert found.caption_source == "file name"  # the .txt never becomes the caption


def test_collect_bpm_detected_by_create_is_labelled(tmp_path, fake_bpm):
    info = create_sample(tone(1.0), SR, "groove", str(tmp_path), bpm=0)
    typed = create_sample(tone(1.0, freq=300.0), SR, "typed groove", str(tmp_path), bpm=97)
    by_id = {s.sample_id: s for s in collect_samples(str(tmp_path))}
    assert (by_id[info["id"]].bpm, by_id[info["id"]].bpm_source) == (123, "detected (Create)")
    assert (by_id[typed["id"]].bpm, by_id[typed["id"]].bpm_source) == (97, "typed")


def test_collect_lyrics_precedence_txt_over_json(tmp_path):
    write_audio(str(tmp_path / "s.wav"))
    (tmp_path / "s.json").write_text(json.dumps({"caption": "c", "lyrics": "from json"}))
    assert collect_samples(str(tmp_path))[0].lyrics == "from json"
    (tmp_path / "s.txt").write_text("from txt")
    assert collect_samples(str(tmp_path))[0].lyrics == "from txt"
    (tmp_path / "s_lyrics.txt").write_text("from lyrics txt")
    assert collect_samples(str(tmp_path))[0].lyrics == "from lyrics txt"


def test_collect_nested_folders_sorted(tmp_path):
    for rel in ("z.wav", "sub/b/y.flac", "sub/a.wav", "a/x.wav", ".git/hidden.wav"):
        write_audio(str(tmp_path / rel))
    found = collect_samples(str(tmp_path))
    rels = [os.path.relpath(s.audio_path, tmp_path).replace(os.sep, "/") for s in found]
    assert rels == ["a/x.wav", "sub/a.wav", "sub/b/y.flac", "z.wav"]


def test_collect_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="samples_dir 'nope' does not exist") as e:
        collect_samples("nope")
    assert os.path.abspath("nope") in str(e.value)


def test_collect_empty_folder_lists_extensions(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="contains no audio files") as e:
        collect_samples(str(tmp_path))
    assert str(tmp_path) in str(e.value) and all(ext in str(e.value) for ext in (".wav", ".flac", ".mp3", ".ogg",
                                                                                 ".opus"))


def test_collect_bad_json_names_file(tmp_path):
    write_audio(str(tmp_path / "s.wav"))
    (tmp_path / "s.json").write_text("{caption: oops")
    with pytest.raises(ValueError, match="not valid JSON") as e:
        collect_samples(str(tmp_path))
    assert str(tmp_path / "s.json") in str(e.value)


def test_collect_bad_keyscale_names_file_and_field(tmp_path):
    write_audio(str(tmp_path / "s.wav"))
    (tmp_path / "s.json").write_text(json.dumps({"caption": "c", "keyscale": "H major"}))
    with pytest.raises(ValueError, match="field 'keyscale': keyscale 'H major'") as e:
        collect_samples(str(tmp_path))
    assert str(tmp_path / "s.json") in str(e.value)


def test_folder_fingerprint_tracks_files(tmp_path):
    assert folder_fingerprint(str(tmp_path / "missing")).startswith("missing:")
    write_audio(str(tmp_path / "a.wav"))
    first = folder_fingerprint(str(tmp_path))
    assert folder_fingerprint(str(tmp_path)) == first
    (tmp_path / "a.txt").write_text("lyrics")
    second = folder_fingerprint(str(tmp_path))
    assert second != first
    (tmp_path / ".a.wav.tmp").write_text("in progress")  # hidden temporary files do not count
    assert folder_fingerprint(str(tmp_path)) == second


def test_chain_helpers(tmp_path):
    assert samples.parse_sample_info("", "previous") is None
    with pytest.raises(ValueError, match="previous: expected the sample_info output"):
        samples.parse_sample_info("hello", "previous")
    infos = [{"id": "a" * 12, "sidecar_path": str(tmp_path / "x" / "s.json")},
             {"id": "b" * 12, "sidecar_path": str(tmp_path / "y" / "s.json")}]
    ids, dirs = samples.extend_chain({"chain": ["c" * 12, "a" * 12], "chain_dirs": [str(tmp_path / "x")]}, infos)
    assert ids == ["c" * 12, "a" * 12, "b" * 12]
    assert dirs == [str(tmp_path / "x"), str(tmp_path / "y")]
