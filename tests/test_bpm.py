"""Tests for acestep_lora.bpm (tempo detection: detect_bpm, estimate_tempo, confidence and "unknown", the
learned octave decision on hard grooves) and the synthetic-music helper."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from acestep_lora import bpm as bpm_module  # noqa: E402
from acestep_lora.bpm import (CONFIDENCE_THRESHOLD, MIN_SECONDS, TempoEstimate,  # noqa: E402
                              detect_bpm, estimate_tempo)
from synthetic_music import STYLES, make_clip  # noqa: E402

TOL = 0.02  # +-2 %


def _assert_close(est: float, true: float) -> None:
    assert abs(est - true) <= TOL * true, f"detected {est} BPM, expected {true} +-2 %"


# A spread over 60-180 BPM and all styles, incl. non-integer tempos, swing and noise.
CASES = [
    # bpm,  style,      swing, noise, seed
    (62.0, "rock", 0.0, 0.0, 1),
    (75.5, "sparse", 0.0, 0.3, 2),
    (88.0, "waltz", 0.3, 0.0, 3),
    (97.3, "rock", 0.33, 0.0, 4),
    (118.0, "house", 0.0, 0.4, 5),
    (128.0, "house", 0.2, 0.0, 6),
    (141.7, "halftime", 0.0, 0.0, 7),
    (155.0, "rock", 0.25, 0.3, 8),
    (172.0, "sparse", 0.0, 0.0, 9),
    (180.0, "waltz", 0.0, 0.5, 10),
]


@pytest.mark.parametrize("bpm,style,swing,noise,seed", CASES)
def test_detects_tempo_within_2_percent(bpm, style, swing, noise, seed):
    clip = make_clip(bpm, 15.0, 48000, seed=seed, swing=swing, noise=noise, style=style)
    est = detect_bpm(clip, 48000)
    assert isinstance(est, float)
    _assert_close(est, bpm)


@pytest.mark.parametrize("sr", [44100, 48000, 22050, 16000])
def test_sample_rates(sr):
    clip = make_clip(104.5, 12.0, sr, seed=11, style="rock")
    _assert_close(detect_bpm(clip, sr), 104.5)


def test_mono_and_channel_layouts():
    clip = make_clip(133.0, 12.0, 44100, seed=12, style="house")
    mono = clip.mean(0)
    _assert_close(detect_bpm(mono, 44100), 133.0)  # [N]
    _assert_close(detect_bpm(mono[None], 44100), 133.0)  # [1, N]
    _assert_close(detect_bpm(torch.cat([clip, clip[:1]]), 44100), 133.0)  # 3 channels
    with pytest.raises(ValueError, match="channels, samples"):
        detect_bpm(clip.T.contiguous(), 44100)  # [N, C] by mistake


def test_result_respects_range():
    clip = make_clip(90.0, 12.0, 48000, seed=13, style="rock")
    est = detect_bpm(clip, 48000, min_bpm=120.0, max_bpm=200.0)
    assert 120.0 <= est <= 200.0
    _assert_close(est, 180.0)  # the only metrical level of 90 BPM inside the range


def test_too_short_raises():
    clip = make_clip(120.0, MIN_SECONDS - 1.0, 48000, seed=14)
    with pytest.raises(ValueError, match="too short") as ei:
        detect_bpm(clip, 48000)
    assert "BPM manually" in str(ei.value)


def test_silent_raises():
    with pytest.raises(ValueError, match="silent"):
        detect_bpm(torch.zeros(2, 48000 * 10), 48000)


def test_nan_raises():
    clip = make_clip(120.0, 10.0, 48000, seed=15)
    clip[0, 1000] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        detect_bpm(clip, 48000)


def test_steady_tone_raises():
    t = torch.arange(48000 * 8) / 48000
    with pytest.raises(ValueError, match="no rhythmic onsets"):
        detect_bpm(0.5 * torch.sin(2 * torch.pi * 440.0 * t), 48000)


def test_make_clip_contract():
    a = make_clip(100.0, 3.0, 22050, seed=3, swing=0.2, noise=0.1, style="waltz")
    b = make_clip(100.0, 3.0, 22050, seed=3, swing=0.2, noise=0.1, style="waltz")
    c = make_clip(100.0, 3.0, 22050, seed=4, swing=0.2, noise=0.1, style="waltz")
    assert a.shape == (2, 3 * 22050) and a.dtype == torch.float32
    assert torch.equal(a, b)  # deterministic per seed
    assert not torch.equal(a, c)
    assert abs(float(a.abs().max()) - 0.8) < 1e-4  # peak-normalised
    assert not torch.allclose(a[0], a[1])  # stereo, not dual mono
    for style in STYLES:
        assert make_clip(120.0, 2.0, 16000, style=style).shape == (2, 32000)
    with pytest.raises(ValueError):
        make_clip(120.0, 2.0, style="polka")


# ----------------------------------------------------------------------------- confidence


def _sine_pad(seconds=20.0, sr=44100):
    """A chord of sines whose loudness swells slowly (no onsets, no beat)."""
    t = torch.arange(int(seconds * sr)) / sr
    x = sum(torch.sin(2 * torch.pi * f * t) * (1 + 0.3 * torch.sin(2 * torch.pi * 0.07 * k * t))
            for k, f in enumerate((220.0, 277.2, 329.6, 440.0), 1))
    return 0.2 * x


def _held_chord(seconds=20.0, sr=44100):
    """A sustained piano-like chord: one attack, then decaying harmonics."""
    import numpy as np
    from synthetic_music import _hz, _tone

    x = sum(_tone(sr, _hz(p), seconds, attack=0.01, decay=6.0, harmonics=6, bright=0.6)
            for p in (48, 55, 60, 64, 67))
    return torch.from_numpy(np.stack([x, x]).astype("float32")) * 0.2


BEATLESS = {
    "sine pad": _sine_pad,
    "white noise": lambda: 0.1 * torch.randn(2, 44100 * 20,
                                             generator=torch.Generator().manual_seed(0)),
    "sustained chord": _held_chord,
}


@pytest.mark.parametrize("kind", list(BEATLESS))
def test_beatless_audio_is_unknown(kind):
    wave = BEATLESS[kind]()
    est = estimate_tempo(wave, 44100)
    assert est.bpm is None and est.confidence < CONFIDENCE_THRESHOLD and est.reason
    with pytest.raises(ValueError, match="no steady beat|no rhythmic onsets") as ei:
        detect_bpm(wave, 44100)
    assert "tempo" in str(ei.value).lower() or "BPM" in str(ei.value)


def test_no_steady_beat_message_names_confidence():
    est = estimate_tempo(BEATLESS["white noise"](), 44100)
    assert est.reason.startswith("no steady beat found (confidence ")
    assert f"< {CONFIDENCE_THRESHOLD:.2f}), so the tempo is unknown; enter the BPM manually" in est.reason


@pytest.mark.parametrize("bpm,style,seed", [(96.0, "rock", 21), (124.0, "house", 22),
                                            (150.0, "waltz", 23)])
def test_confidence_high_on_clear_music(bpm, style, seed):
    est = estimate_tempo(make_clip(bpm, 15.0, 44100, seed=seed, style=style), 44100)
    assert isinstance(est, TempoEstimate)
    assert est.confidence >= 0.9 and est.reason is None
    _assert_close(est.bpm, bpm)
    assert 0.0 < est.share <= 1.0
    assert all(abs(alt / bpm - 1.0) > 0.02 for alt, _ in est.alternatives)


def test_detect_bpm_wraps_estimate_tempo():
    clip = make_clip(111.0, 12.0, 48000, seed=24, style="rock")
    assert detect_bpm(clip, 48000) == estimate_tempo(clip, 48000).bpm


def test_learned_block_is_consistent():
    names = bpm_module.all_cue_names()
    n = len(bpm_module.FEATURES)
    assert n > 0 and set(bpm_module.FEATURES) <= set(names)
    assert len(bpm_module._WEIGHTS) == len(bpm_module._FEATURE_MEAN) == n
    assert len(bpm_module._FEATURE_SCALE) == n and min(bpm_module._FEATURE_SCALE) > 0
    assert 0.0 < CONFIDENCE_THRESHOLD < 1.0


# ----------------------------------------------------------------------------- hard grooves


def _groove(bpm, seconds=16.0, sr=44100, *, kick="", snare="", hats="", rim="", stabs="",
            bass="", seed=0):
    """A drum/bass/chord loop from 16th-step patterns ('x' = hit) at ``bpm``."""
    import numpy as np
    from synthetic_music import _hat, _hz, _kick, _snare, _tone

    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    out = np.zeros(n)
    sounds = {"kick": _kick(sr, rng), "snare": _snare(sr, rng), "hats": _hat(sr, rng, False),
              "rim": _hat(sr, rng, True)[: sr // 20] * 0.5}
    step = 60.0 / bpm / 4
    levels = {"kick": 0.9, "snare": 0.6, "hats": 0.15, "rim": 0.4}
    for bar in range(int(seconds / (16 * step)) + 1):
        chord = (0, 5, 7, 3)[bar % 4]
        for s in range(16):
            t = (bar * 16 + s) * step + rng.normal(0, 0.003)
            i = int(max(t, 0) * sr)
            if i >= n:
                break
            for name, pat in (("kick", kick), ("snare", snare), ("hats", hats), ("rim", rim)):
                if pat and pat[s] == "x":
                    buf = sounds[name]
                    out[i:i + len(buf)] += levels[name] * buf[: n - i]
            if stabs and stabs[s] == "x":
                buf = sum(_tone(sr, _hz(60 + chord + iv), 0.15, attack=0.003, decay=0.1,
                                harmonics=5) for iv in (0, 4, 7))
                out[i:i + len(buf)] += 0.15 * buf[: n - i]
            if bass and bass[s] == "x":
                buf = _tone(sr, _hz(36 + chord), step * 3.5, attack=0.005, decay=0.4,
                            harmonics=4)
                out[i:i + len(buf)] += 0.3 * buf[: n - i]
    out *= 0.8 / np.abs(out).max()
    return torch.from_numpy(np.stack([out, out]).astype("float32"))


HARD = {
    # Trap at its notated tempo: snare on 3, 16th hats, 808-ish kick (not read at 70).  (With
    # 8th hats it is drum-for-drum a 70 BPM backbeat with 16th hats: truly ambiguous.)
    "half-time trap 140": (140.0, dict(kick="x.........x.....", snare="........x.......",
                                       hats="xxxxxxxxxxxxxxxx", bass="x.........x.....")),
    # A slow backbeat with busy 16th hats (not read at double tempo).
    "slow groove 16th hats 72": (72.0, dict(kick="x.......x.x.....", snare="....x.......x...",
                                            hats="xxxxxxxxxxxxxxxx", bass="x.......x.x.....")),
    # Reggae one-drop: kick + rim on 3, skank on 2 and 4, hats in 8ths.
    "one-drop 76": (76.0, dict(kick="........x.......", rim="........x.......",
                               hats="x.x.x.x.x.x.x.x.", stabs="....x.......x...",
                               bass="....x.x.....x.x.")),
    # No drums: walking bass on every beat under chord stabs on 2 and 4.
    "walking bass 108": (108.0, dict(bass="x...x...x...x...", stabs="....x.......x...")),
}


@pytest.mark.parametrize("case", list(HARD))
def test_musically_hard_grooves(case):
    bpm, patterns = HARD[case]
    est = estimate_tempo(_groove(bpm, **patterns), 44100)
    assert est.bpm is not None, est.reason
    _assert_close(est.bpm, bpm)
