"""Tests for acestep_lora.bpm.detect_bpm (tempo detection) and the synthetic-music helper."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from acestep_lora.bpm import MIN_SECONDS, detect_bpm  # noqa: E402
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
