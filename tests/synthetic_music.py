"""Synthetic rhythmic music with a known tempo, for tests, benchmarks and demos.

``make_clip(bpm, seconds, ...)`` renders a short stereo "song": a synthesised drum
kit (pitch-swept sine kick, noise+tone snare, high-passed noise hi-hats, claps,
crashes, fills, ghost notes), a bass line and chord pads that change on bar
boundaries, optional keyboard stabs and a lead melody, a little room reverb and
optional background noise.  Everything is deterministic for a given
``(bpm, seconds, sample_rate, seed, swing, noise, style)``.

The musical details (drum pattern variant, hat subdivision or no hats at all,
bass rhythm incl. syncopated ones, instrumentation, mix levels, start phase,
humanisation, a slight tempo wander of the "played" styles) are drawn from
``seed`` so that a batch of seeds gives varied, not-trivially-easy material
(e.g. some rock/house clips have no hi-hats, many have syncopated bass lines).
As real players do, 16th-note hats are only used up to 130 BPM.  Styles:

* ``rock``     4/4, kick on 1 and 3 (plus pickups), snare on 2 and 4, ghost notes, fills
* ``waltz``    3/4, kick on 1, light hits on 2 and 3, "oom-pah-pah" keys
* ``house``    4/4 four-on-the-floor, clap on 2 and 4, open hats on the off-beats
* ``halftime`` 4/4 at ``bpm``, drums in half time (snare on 3 only) while hats and
               bass keep driving 8ths at ``bpm``
* ``sparse``   no hi-hats, few drum hits, syncopated bass; the pulse is implied

rock, waltz and sparse are "played" (timing jitter plus a slow tempo wander of up to
+-1 % around ``bpm``); house and halftime are "programmed" (jitter only).

Only numpy and torch are needed; the module is importable on its own
(``sys.path.insert(0, "tests"); from synthetic_music import make_clip``).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

__all__ = ["make_clip", "STYLES"]

STYLES = ("rock", "waltz", "house", "halftime", "sparse")

_STEPS_PER_BEAT = 4  # patterns are written on a 16th-note grid

# Chord progressions as (semitones above the key root, is_minor) per chord.
_PROGRESSIONS = (
    ((0, False), (7, False), (9, True), (5, False)),  # I V vi IV
    ((0, False), (5, False), (7, False), (5, False)),  # I IV V IV
    ((9, True), (5, False), (0, False), (7, False)),  # vi IV I V
    ((0, False), (9, True), (5, False), (7, False)),  # I vi IV V
    ((0, True), (8, False), (3, False), (10, False)),  # i VI III VII
    ((0, True), (5, True), (7, True), (0, True)),  # i iv v i
)
_PENTATONIC = (0, 2, 4, 7, 9)


def _hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69.0) / 12.0)


# ----------------------------------------------------------------------------- instruments


def _highpass(x: np.ndarray, sr: int, cutoff: float, top: float | None = None) -> np.ndarray:
    """Brick-wall FFT filter; fine for the short one-shot buffers used here."""
    spec = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(len(x), 1.0 / sr)
    keep = freqs >= cutoff
    if top is not None:
        keep &= freqs <= top
    return np.fft.irfft(spec * keep, n=len(x))


def _kick(sr: int, rng: np.random.Generator) -> np.ndarray:
    n = int(0.45 * sr)
    t = np.arange(n) / sr
    f_hi, f_lo = rng.uniform(110, 180), rng.uniform(42, 60)
    freq = f_lo + (f_hi - f_lo) * np.exp(-t / rng.uniform(0.02, 0.05))
    body = np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.exp(-t / rng.uniform(0.1, 0.25))
    click = rng.standard_normal(n) * np.exp(-t / 0.002) * rng.uniform(0.05, 0.3)
    x = body + click
    x[: int(0.001 * sr)] *= np.linspace(0, 1, int(0.001 * sr))
    return x


def _snare(sr: int, rng: np.random.Generator) -> np.ndarray:
    n = int(0.35 * sr)
    t = np.arange(n) / sr
    tone = np.sin(2 * np.pi * rng.uniform(160, 240) * t) * np.exp(-t / rng.uniform(0.03, 0.07))
    noise = _highpass(rng.standard_normal(n), sr, rng.uniform(800, 2000))
    noise *= np.exp(-t / rng.uniform(0.05, 0.14))
    return 0.6 * tone + 0.8 * noise / (np.abs(noise).max() + 1e-9)


def _hat(sr: int, rng: np.random.Generator, open_: bool) -> np.ndarray:
    n = int((0.35 if open_ else 0.08) * sr)
    t = np.arange(n) / sr
    x = _highpass(rng.standard_normal(n), sr, rng.uniform(6000, 8500))
    tau = rng.uniform(0.08, 0.16) if open_ else rng.uniform(0.008, 0.02)
    x *= np.exp(-t / tau)
    return x / (np.abs(x).max() + 1e-9)


def _clap(sr: int, rng: np.random.Generator) -> np.ndarray:
    n = int(0.3 * sr)
    t = np.arange(n) / sr
    env = np.exp(-t / 0.06)
    for k in range(3):  # a clap is a few quick bursts
        d = 0.009 * (k + 1)
        env += np.where(t < d, np.exp(-np.abs(t - d + 0.009) / 0.002), 0.0)
    x = _highpass(rng.standard_normal(n), sr, 900, 3500) * env
    return x / (np.abs(x).max() + 1e-9)


def _crash(sr: int, rng: np.random.Generator) -> np.ndarray:
    n = int(1.6 * sr)
    t = np.arange(n) / sr
    x = _highpass(rng.standard_normal(n), sr, 3500) * np.exp(-t / rng.uniform(0.4, 0.8))
    return x / (np.abs(x).max() + 1e-9)


def _tom(sr: int, rng: np.random.Generator, pitch: float) -> np.ndarray:
    n = int(0.3 * sr)
    t = np.arange(n) / sr
    freq = pitch * (1 + 0.5 * np.exp(-t / 0.02))
    return np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.exp(-t / 0.12)


_TABLE_LEN = 4096


def _tone(sr: int, freq: float, dur: float, *, attack: float, decay: float,
          harmonics: int = 3, bright: float = 0.5, detune_cents: float = 0.0) -> np.ndarray:
    """A note: a few harmonics (wavetable lookup, cheap), attack, decay, short release."""
    n = max(int(dur * sr), 8)
    f = freq * 2.0 ** (detune_cents / 1200.0)
    ph = np.arange(_TABLE_LEN) * (2 * np.pi / _TABLE_LEN)
    table = np.zeros(_TABLE_LEN)
    for h in range(1, harmonics + 1):
        if f * h > sr * 0.45:
            break
        table += (bright ** (h - 1)) / h * np.sin(h * ph + h)
    idx = (np.arange(n) * (f * _TABLE_LEN / sr)).astype(np.int64) % _TABLE_LEN
    x = table[idx]
    env = np.exp(np.arange(n) * (-1.0 / (decay * sr)))
    na = max(int(attack * sr), 1)
    env[:na] *= np.linspace(0, 1, na)
    nr = min(int(0.03 * sr), n)
    env[-nr:] *= np.linspace(1, 0, nr)
    return x * env


def _fft_convolve(x: np.ndarray, ir: np.ndarray) -> np.ndarray:
    """Linear convolution truncated to len(x) (torch FFT: much faster than numpy's here)."""
    m = 1 << int(np.ceil(np.log2(len(x) + len(ir))))  # power of two: fast FFT
    xt, it = torch.from_numpy(x).float(), torch.from_numpy(ir).float()
    y = torch.fft.irfft(torch.fft.rfft(xt, m) * torch.fft.rfft(it, m), m)[: len(x)]
    return y.double().numpy()


# ----------------------------------------------------------------------------- arrangement


def _style_patterns(style: str, rng: np.random.Generator, bpm: float) -> dict:
    """Per-style drum/bass patterns on a 16th grid (steps within one bar)."""
    pat = _style_patterns_raw(style, rng)
    if pat["hats"] == 1 and bpm > 130:
        pat["hats"] = 2  # drummers (and producers) do not play 16th hats at 170 BPM
    return pat


def _style_patterns_raw(style: str, rng: np.random.Generator) -> dict:
    if style == "rock":
        kick = [[0, 8], [0, 8, 10], [0, 6, 8], [0, 7, 8, 14], [0, 2, 8, 10]][rng.integers(5)]
        return dict(beats=4, kick=kick, snare=[4, 12], clap=[],
                    hats=[None, 4, 2, 2, 2, 1][rng.integers(6)], open_hats=[],
                    bass=[[0, 2, 4, 6, 8, 10, 12, 14], [0, 4, 8, 12], [0, 3, 6, 10, 12],
                          [0, 6, 8, 11, 14]][rng.integers(4)],
                    keys=[[], [], [2, 6, 10, 14], [0, 6, 12]][rng.integers(4)])
    if style == "house":
        return dict(beats=4, kick=[0, 4, 8, 12], snare=[], clap=[4, 12],
                    hats=[None, 1, 4][rng.integers(3)], open_hats=[2, 6, 10, 14],
                    bass=[[2, 6, 10, 14], [0, 3, 6, 10, 14],
                          [2, 3, 6, 10, 11, 14]][rng.integers(3)],
                    keys=[[], [2, 6, 10, 14], [3, 6, 11, 14]][rng.integers(3)])
    if style == "waltz":
        return dict(beats=3, kick=[0], snare=[4, 8] if rng.random() < 0.5 else [],
                    clap=[], hats=[None, 4, 2][rng.integers(3)], open_hats=[],
                    bass=[[0], [0, 8], [0, 6]][rng.integers(3)],
                    keys=[4, 8])
    if style == "halftime":
        kick = [[0], [0, 10], [0, 3, 10], [0, 14]][rng.integers(4)]
        return dict(beats=4, kick=kick, snare=[8], clap=[],
                    hats=[2, 2, 1, 2][rng.integers(4)], open_hats=[],
                    # the band keeps driving 8ths at full tempo while the drums play half time
                    bass=[0, 2, 4, 6, 8, 10, 12, 14],
                    keys=[[0, 4, 8, 12], [2, 6, 10, 14], [4, 12]][rng.integers(3)])
    if style == "sparse":
        kick = [[0], [0, 10], [0, 8], [0, 11]][rng.integers(4)]
        return dict(beats=4, kick=kick, snare=[4, 12],
                    clap=[], hats=None, open_hats=[],
                    bass=[[0, 3, 6, 10, 12], [0, 6, 8, 11, 14], [0, 3, 10],
                          [3, 6, 11, 14]][rng.integers(4)],
                    keys=[[], [6, 14], [2, 10], [0, 6, 10]][rng.integers(4)])
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


def make_clip(bpm: float, seconds: float, sample_rate: int = 48000, *, seed: int = 0,
              swing: float = 0.0, noise: float = 0.0, style: str = "rock") -> torch.Tensor:
    """Render ``seconds`` of stereo music at tempo ``bpm``; returns float32 ``[2, N]``.

    swing: delay of the off-beat 8ths as a fraction of an 8th note (0 = straight,
        1/3 = triplet shuffle); the 16ths in between are moved proportionally.
    noise: RMS of added (pinkish, per-channel) background noise relative to the
        music RMS; 0.5 is roughly 6 dB SNR.
    style: one of ``STYLES``.
    """
    if bpm <= 0 or seconds <= 0 or sample_rate <= 0:
        raise ValueError("bpm, seconds and sample_rate must be positive")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    sr = int(sample_rate)
    # A stable per-style salt (str hash() is randomised per process).
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(style.encode())])
    n = int(round(seconds * sr))
    out = np.zeros((2, n))
    beat = 60.0 / float(bpm)
    pat = _style_patterns(style, rng, float(bpm))
    bpb = pat["beats"]
    steps = bpb * _STEPS_PER_BEAT
    bar = bpb * beat
    t0 = -rng.uniform(0, bar)  # the clip starts somewhere inside a bar
    n_bars = int(np.ceil((seconds - t0) / bar)) + 1
    jitter = rng.uniform(0.002, 0.008)  # humanised timing, seconds (std)
    # "Played" styles breathe: the local tempo wanders sinusoidally by up to +-1 % around
    # ``bpm`` (zero mean), "programmed" ones (house, halftime) are on the grid.  Separate
    # generator so the rest of the arrangement does not depend on it.
    drng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(style.encode()), 1])
    wander = drng.uniform(0.0, 0.01) if style in ("rock", "waltz", "sparse") else 0.0
    w_period = drng.uniform(12.0, 32.0)  # beats
    w_amp = wander * w_period / (2 * np.pi)  # beats; d(time)/d(beat) = 1 +- wander
    w_phase = drng.uniform(0, 2 * np.pi)

    def warp(u: float) -> float:
        """Musical time (beats) -> seconds."""
        return t0 + (u + w_amp * np.sin(2 * np.pi * u / w_period + w_phase)) * beat

    def step_time(b: int, s: float) -> float:
        q, r = divmod(s, _STEPS_PER_BEAT)
        frac = r / _STEPS_PER_BEAT  # 0, .25, .5, .75
        off8 = 0.5 + 0.5 * swing
        frac = frac / 0.5 * off8 if frac <= 0.5 else off8 + (frac - 0.5) / 0.5 * (1 - off8)
        return warp(b * bpb + q + frac) + rng.normal(0.0, jitter)

    def place(buf: np.ndarray, t: float, gain: float, pan: float = 0.0, delay: int = 0) -> None:
        i = int(round(t * sr))
        gl, gr = np.cos((pan + 1) * np.pi / 4), np.sin((pan + 1) * np.pi / 4)
        bufs = (buf, buf) if buf.ndim == 1 else (buf[0], buf[1])
        for ch, (g, x, d) in enumerate(((gl, bufs[0], 0), (gr, bufs[1], delay))):
            j = i + d
            a, b = max(j, 0), min(j + len(x), n)
            if b > a:
                out[ch, a:b] += gain * g * 1.41 * x[a - j:b - j]

    # Kit: a few variants per instrument so repeated hits are not identical.
    kicks = [_kick(sr, rng) for _ in range(2)]
    snares = [_snare(sr, rng) for _ in range(3)]
    hats = [_hat(sr, rng, False) for _ in range(4)]
    ohats = [_hat(sr, rng, True) for _ in range(2)]
    clap = _clap(sr, rng)
    crash = _crash(sr, rng)
    toms = [_tom(sr, rng, p) for p in (rng.uniform(90, 120), rng.uniform(140, 180))]
    pick = lambda bank: bank[rng.integers(len(bank))]  # noqa: E731
    vel = lambda base: base * rng.uniform(0.8, 1.1)  # noqa: E731

    lv = dict(kick=rng.uniform(0.7, 1.0), snare=rng.uniform(0.45, 0.75),
              hat=rng.uniform(0.12, 0.3), bass=rng.uniform(0.25, 0.45),
              pad=rng.uniform(0.05, 0.12), keys=rng.uniform(0.12, 0.25),
              lead=rng.uniform(0.1, 0.2))
    hat_pan, keys_pan = rng.uniform(-0.6, 0.6), rng.uniform(-0.5, 0.5)
    ghost_p = rng.uniform(0.0, 0.25) if style in ("rock", "halftime") else 0.0
    phrase = 4 if rng.random() < 0.5 else 8
    chord_bars = 1 if rng.random() < 0.6 else 2  # chords change every 1 or 2 bars
    prog = _PROGRESSIONS[rng.integers(len(_PROGRESSIONS))]
    key = 40 + int(rng.integers(0, 8))  # bass register, E2..B2
    with_lead = rng.random() < 0.5
    lead_pool = list(range(0, steps, 2)) + [3, 7, 11] if bpb == 4 else list(range(0, steps, 2))
    pad_attack = rng.uniform(0.03, 0.3)

    for b in range(n_bars):
        bar_start = warp(b * bpb)
        if bar_start > seconds:
            break
        ci = (b // chord_bars) % len(prog)
        root, minor = prog[ci]
        triad = (0, 3 if minor else 4, 7)
        last_in_phrase = (b % phrase) == phrase - 1
        # drums
        if b % phrase == 0 and style != "sparse":
            place(crash, step_time(b, 0), vel(0.35), -0.3)
        for s in pat["kick"]:
            place(pick(kicks), step_time(b, s), vel(lv["kick"]), 0.0)
        fill = last_in_phrase and style in ("rock", "halftime") and rng.random() < 0.7
        for s in pat["snare"]:
            if fill and s >= steps - 4:
                continue
            place(pick(snares), step_time(b, s), vel(lv["snare"]), 0.1)
        for s in pat["clap"]:
            place(clap, step_time(b, s), vel(lv["snare"]), 0.05)
        if fill:
            for k, s in enumerate(range(steps - 4, steps)):
                buf = toms[k % 2] if rng.random() < 0.5 else pick(snares)
                place(buf, step_time(b, s), vel(lv["snare"] * 0.8), -0.4 + 0.3 * k)
        if ghost_p > 0:
            for s in range(1, steps, 2):
                if rng.random() < ghost_p:
                    place(pick(snares), step_time(b, s), vel(lv["snare"] * 0.2), 0.1)
        if pat["hats"] is not None:
            for s in range(0, steps, pat["hats"]):
                accent = 1.0 if s % _STEPS_PER_BEAT == 0 else 0.7
                place(pick(hats), step_time(b, s), vel(lv["hat"] * accent), hat_pan, delay=8)
        for s in pat["open_hats"]:
            place(pick(ohats), step_time(b, s), vel(lv["hat"] * 0.9), -hat_pan, delay=8)
        # bass: root mostly, sometimes the fifth or the octave
        bsteps = pat["bass"] + [steps]
        for s, s_next in zip(bsteps[:-1], bsteps[1:]):
            t = step_time(b, s)
            dur = (s_next - s) * beat / _STEPS_PER_BEAT * 0.95
            interval = [0, 0, 0, 7, 12][rng.integers(5)] if s != 0 else 0
            note = _tone(sr, _hz(key + root + interval), dur, attack=0.005,
                         decay=rng.uniform(0.25, 0.6), harmonics=4, bright=0.45)
            place(note, t, vel(lv["bass"]), 0.0)
        # pad: sustained chord across the bar(s), slightly detuned per channel
        if b % chord_bars == 0:
            dur = chord_bars * bar + 0.1
            left = sum(_tone(sr, _hz(key + 12 + root + iv), dur, attack=pad_attack, decay=8.0,
                          harmonics=8, bright=0.8, detune_cents=-4) for iv in triad)
            r = sum(_tone(sr, _hz(key + 12 + root + iv), dur, attack=pad_attack, decay=8.0,
                          harmonics=8, bright=0.8, detune_cents=+4) for iv in triad)
            place(np.stack([left, r]), bar_start, lv["pad"], 0.0)
        # keyboard stabs (short chords)
        for s in pat["keys"]:
            dur = rng.uniform(0.12, 0.3)
            chord = sum(_tone(sr, _hz(key + 24 + root + iv), dur, attack=0.003, decay=0.12,
                              harmonics=5, bright=0.6) for iv in triad)
            place(chord, step_time(b, s), vel(lv["keys"]), keys_pan)
        # lead: a random melody with syncopations and rests
        if with_lead:
            k = int(rng.integers(2, 6))
            chosen = sorted(rng.choice(lead_pool, size=min(k, len(lead_pool)), replace=False))
            for s, s_next in zip(chosen, list(chosen[1:]) + [steps]):
                if rng.random() < 0.2:
                    continue  # rest
                dur = (s_next - s) * beat / _STEPS_PER_BEAT
                pitch = key + 36 + root % 12 + _PENTATONIC[rng.integers(len(_PENTATONIC))]
                note = _tone(sr, _hz(pitch), dur, attack=rng.uniform(0.01, 0.05), decay=0.6,
                             harmonics=3, bright=0.3)
                place(note, step_time(b, s), vel(lv["lead"]), 0.3)

    # Small room: exponentially decaying noise IR, different per channel.
    ir_n = int(rng.uniform(0.3, 0.8) * sr)
    wet = rng.uniform(0.05, 0.2)
    t_ir = np.arange(ir_n) / sr
    for ch in range(2):
        ir = rng.standard_normal(ir_n) * np.exp(-t_ir / (ir_n / sr / 5))
        ir[: int(0.01 * sr)] = 0.0  # pre-delay
        ir *= wet / (np.sqrt((ir ** 2).sum()) + 1e-12)
        out[ch] += _fft_convolve(out[ch], ir)

    if noise > 0:
        rms = np.sqrt(np.mean(out ** 2)) + 1e-12
        m = 1 << int(np.ceil(np.log2(n)))
        white = torch.from_numpy(rng.standard_normal((2, m), dtype=np.float32))
        f = torch.fft.rfftfreq(m, 1.0 / sr)
        spec = torch.fft.rfft(white, dim=1) / torch.sqrt(torch.clamp(f, min=20.0))[None]
        nz = torch.fft.irfft(spec, n=m, dim=1)[:, :n].double().numpy()  # pink-ish noise
        nz *= noise * rms / (np.sqrt(np.mean(nz ** 2)) + 1e-12)
        out += nz

    out *= 0.8 / (np.abs(out).max() + 1e-12)
    return torch.from_numpy(out.astype(np.float32))
