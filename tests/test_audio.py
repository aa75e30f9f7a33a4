"""acestep_lora/audio.py: header-only file info, window decoding (soundfile and the PyAV fallback), long-audio
windows, and the checks on decoded audio."""
import math

import pytest
import soundfile as sf
import torch

from acestep_lora import audio


def wave(seconds=1.0, rate=44100, channels=2):
    t = torch.arange(int(seconds * rate)) / rate
    return torch.stack([0.3 * torch.sin(2 * math.pi * (220 + 110 * c) * t) for c in range(channels)])


@pytest.fixture()
def flac(tmp_path):
    path = str(tmp_path / "song.flac")
    sf.write(path, wave(2.0).T.numpy(), 44100, subtype="PCM_24")
    return path


def test_audio_info_reads_the_header_without_decoding(flac, monkeypatch):
    monkeypatch.setattr(sf, "read", lambda *a, **k: pytest.fail("audio_info decoded the file"))
    info = audio.audio_info(flac)
    assert (info.frames, info.sample_rate, info.channels, info.duration) == (88200, 44100, 2, 2.0)


def test_load_audio_file_decodes_only_the_window(flac):
    whole, rate = audio.load_audio_file(flac)
    part, part_rate = audio.load_audio_file(flac, start=30000, frames=1000)
    assert rate == part_rate == 44100 and whole.shape == (2, 88200) and part.shape == (2, 1000)
    assert torch.equal(part, whole[:, 30000:31000])
    tail, _ = audio.load_audio_file(flac, start=88000)
    assert torch.equal(tail, whole[:, 88000:])


def test_missing_and_undecodable_files_are_named(tmp_path):
    missing = str(tmp_path / "nope.wav")
    for read in (audio.audio_info, audio.load_audio_file):
        with pytest.raises(FileNotFoundError, match="audio file not found: '.*nope.wav'"):
            read(missing)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF....not really audio" * 10)
    for read in (audio.audio_info, audio.load_audio_file):
        with pytest.raises(ValueError, match=r"could not decode audio file '.*junk.wav'.*convert it to WAV or FLAC"):
            read(str(junk))


def test_pyav_fallback_decodes_the_same_window(flac, monkeypatch):
    """Formats libsndfile cannot read go through PyAV (ComfyUI's decoder), streaming up to the window's end."""
    pytest.importorskip("av")
    whole, _ = audio.load_audio_file(flac)
    part, rate = audio._load_with_av(flac, 30000, 1000)
    assert rate == 44100 and torch.allclose(part, whole[:, 30000:31000], atol=2.0 ** -22)
    info = audio._info_with_av(flac)
    assert (info.frames, info.sample_rate, info.channels) == (88200, 44100, 2)
    # and load_audio_file uses it when soundfile fails
    monkeypatch.setattr(sf, "read", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("unsupported")))
    via_av, _ = audio.load_audio_file(flac, 30000, 1000)
    assert torch.allclose(via_av, part)


def test_windows_cover_the_clip_in_equal_pieces():
    pieces = audio.windows(600 * 48000 + 5, 48000, 240, "segments")
    assert len(pieces) == 3 and pieces[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(pieces, pieces[1:]))  # contiguous, nothing lost
    assert sum(n for _, n in pieces) == 600 * 48000 + 5 and max(n for _, n in pieces) - min(n for _, n in pieces) <= 1
    assert all(n <= 240 * 48000 for _, n in pieces)
    assert len(audio.windows(480 * 48000 + 1, 48000, 240, "segments")) == 3  # just over 2 x max: 3 pieces
    assert audio.windows(600 * 48000, 48000, 240, "crop") == [(0, 240 * 48000)]
    assert audio.windows(100, 48000, 240, "segments") == [(0, 100)]
    with pytest.raises(ValueError, match="long_audio 'loop'.*segments, crop"):
        audio.windows(100, 48000, 240, "loop")


def test_peak_and_silence_threshold():
    assert audio.peak(torch.zeros(2, 10)) == 0.0 and audio.peak(torch.tensor([[0.1, -0.5]])) == 0.5
    assert audio.SILENCE_PEAK == pytest.approx(0.001)  # -60 dBFS


def test_to_stereo_48k_resamples_and_duplicates_mono():
    out = audio.to_stereo_48k(wave(1.0, rate=44100, channels=1), 44100)
    assert out.shape == (2, 48000) and torch.equal(out[0], out[1])
    assert audio.to_stereo_48k(wave(1.0, rate=48000, channels=3), 48000).shape == (2, 48000)
