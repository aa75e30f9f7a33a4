"""Realistic music for the tempo benchmark: MIDI written here, rendered with sampled instruments.

Each clip is a short arrangement written as a Standard MIDI File by this module (no MIDI
library) and rendered by FluidSynth with the General MIDI sound font FluidR3_GM (Debian:
``apt-get install fluidsynth fluid-soundfont-gm``; ``lame`` for the MP3 round trip).  Real
sampled drums, basses, pianos, guitars, strings, horns and pads, played with humanised timing
and velocity, a slight tempo drift on "played" styles, the sound font's own reverb, and on
some clips extra room reverb, background noise or an MP3 round trip.

``make_set("tune" | "report", n)`` lists the songs of a set; ``render(song)`` returns
``(waveform [2, N] float32, sample_rate)`` (cached under ``cache_dir``); ``make_beatless_set``
lists audio without a steady beat (pads, drones, noise, wind chimes at random times, rain)
that a tempo detector should call "unknown".  Everything is deterministic per seed.

Two separate sets
-----------------
The *tuning* set (seeds from ``TUNE_SEED``) is what the detector's learned weights and its
confidence threshold were fitted on (bench/bpm_tune.py).  The *report* set (seeds from
``REPORT_SEED``) is only ever scored.  Both draw from the same style vocabulary, but every
song - tempo, key, progression, harmonic rhythm, pattern variants, instruments, mix, effects -
is drawn from its own seed, so no song of one set occurs in the other.  A third set, *check*
(seeds from ``CHECK_SEED``), was first drawn and scored only after the detector was finished:
unlike the report set, nobody looked at it while working on the detector.

Ground truth (what a musician would count)
------------------------------------------
The truth is the tempo of the notated beat - the quarter note of the style's usual chart,
DAW project or tempo tag - averaged over the clip (beats in the clip / clip length, so a
slight drift is accounted for).  Where musicians could count at two levels, the convention
is the one the genre itself uses when it states a tempo:

* trap (and half-time hip-hop): the producer's tempo, 130-165 BPM, with the snare/clap on
  beat 3 of each bar and hi-hats in 8ths/16ths/rolls of *that* tempo - i.e. "140", not the
  70 a listener might nod to.  That is how these beats are made, labelled and sold (and how
  the synthetic "halftime" style of tests/synthetic_music.py is labelled).
* drum and bass: 164-178 BPM with the snare on 2 and 4 of that tempo (not the 87 half-time).
* reggae one-drop: 64-86 BPM with the "drop" (kick + rim) on beat 3, the skank on 2 and 4
  and hats in 8ths; the tempo reggae musicians count (e.g. "One Love" at ~76).
* swing and shuffle: the quarter note (ride "ding ding-a ding", hi-hat on 2 and 4, walking
  bass), never the triplet grid.
* waltz: the quarter note, three per bar (also for fast waltzes felt "in one").
* 12/8-feel piano ballad: the dotted-quarter beat (three arpeggio notes per beat).
* everything else (rock, pop, house, techno, disco, funk, boom-bap hip-hop, R&B, punk,
  country, piano/guitar/strings without drums): the quarter note, snare on 2 and 4 where
  there is one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import tempfile

import numpy as np

GENERATOR_VERSION = 4  # bump when the generated music changes (invalidates the cache)
TUNE_SEED = 10_000
REPORT_SEED = 50_000
CHECK_SEED = 90_000  # a second held-out set, drawn after the detector was finished
BEATLESS_TUNE_SEED = 20_000
BEATLESS_REPORT_SEED = 70_000
BEATLESS_CHECK_SEED = 95_000
DEFAULT_CACHE = os.environ.get("BPM_BENCH_CACHE",
                               os.path.join(tempfile.gettempdir(), "acestep_bpm_bench"))
SOUNDFONTS = ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "/usr/share/sounds/sf2/default-GM.sf2",
              "/usr/share/soundfonts/FluidR3_GM.sf2", "/usr/share/soundfonts/default.sf2")

# Style -> (tempo range of the ground truth, beats per bar, has drums, weight in a set).
# Every range lies inside the detector's default output range, 60-200 BPM.
STYLES = {
    "rock": ((88, 160), 4, True, 2),
    "pop_ballad": ((62, 88), 4, True, 2),
    "house": ((118, 128), 4, True, 1),
    "techno": ((124, 140), 4, True, 1),
    "disco": ((108, 126), 4, True, 1),
    "hiphop": ((80, 98), 4, True, 2),
    "trap": ((130, 165), 4, True, 2),
    "funk": ((88, 116), 4, True, 2),
    "reggae": ((64, 86), 4, True, 2),
    "swing": ((110, 200), 4, True, 2),
    "shuffle": ((76, 128), 4, True, 1),
    "waltz": ((84, 180), 3, None, 2),  # None: with or without drums (per song)
    "dnb": ((164, 178), 4, True, 1),
    "punk": ((160, 200), 4, True, 1),
    "rnb": ((60, 78), 4, True, 1),
    "country": ((100, 150), 4, True, 1),
    "piano_ballad": ((60, 86), 4, False, 2),
    "piano_triplets": ((60, 80), 4, False, 1),
    "strings_walking": ((76, 132), 4, False, 1),
    "strummed_guitar": ((70, 140), 4, False, 2),
    "fingerpicked": ((78, 120), 4, False, 1),
    "stride_piano": ((90, 140), 4, False, 1),
}

MAJOR, MINOR = (0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10)
_QUALITY = {"maj": (0, 4, 7), "min": (0, 3, 7), "dom7": (0, 4, 7, 10), "min7": (0, 3, 7, 10),
            "maj7": (0, 4, 7, 11)}
_PROGRESSIONS = {
    "major": (((0, "maj"), (7, "maj"), (9, "min"), (5, "maj")),
              ((0, "maj"), (9, "min"), (5, "maj"), (7, "maj")),
              ((0, "maj"), (5, "maj"), (7, "maj"), (5, "maj")),
              ((9, "min"), (5, "maj"), (0, "maj"), (7, "maj")),
              ((0, "maj"), (5, "maj"), (9, "min"), (7, "maj")),
              ((0, "maj7"), (2, "min7"), (4, "min7"), (5, "maj7"))),
    "minor": (((0, "min"), (8, "maj"), (3, "maj"), (10, "maj")),
              ((0, "min"), (5, "min"), (7, "min"), (0, "min")),
              ((0, "min"), (10, "maj"), (8, "maj"), (10, "maj")),
              ((0, "min7"), (5, "min7"), (10, "dom7"), (3, "maj7"))),
    "jazz": (((2, "min7"), (7, "dom7"), (0, "maj7"), (9, "dom7")),
             ((0, "maj7"), (9, "min7"), (2, "min7"), (7, "dom7")),
             ((4, "min7"), (9, "dom7"), (2, "min7"), (7, "dom7"))),
    "blues": (((0, "dom7"),) * 4 + ((5, "dom7"),) * 2 + ((0, "dom7"),) * 2
              + ((7, "dom7"), (5, "dom7"), (0, "dom7"), (7, "dom7")),),
}

# General MIDI drum notes.
KICK, RIM, SNARE, CLAP, SNARE2, HAT, PEDAL, OPEN, CRASH, RIDE, BELL = (36, 37, 38, 39, 40, 42,
                                                                      44, 46, 49, 51, 53)
TOMS = (50, 48, 47, 45, 43, 41)
SHAKER, TAMB, COWBELL = 70, 54, 56
DRUM_CH = 9
KITS = {"standard": 0, "room": 8, "power": 16, "electronic": 24, "tr808": 25, "jazz": 32,
        "brush": 40}


class FluidSynthMissing(RuntimeError):
    pass


# ----------------------------------------------------------------------------- MIDI file

_TICKS_PER_QUARTER = 960
_MIDI_TEMPO_US = 500_000  # the file's own tempo is fixed (120); note times are absolute


def _vlq(n: int) -> bytes:
    """MIDI variable-length quantity."""
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    return bytes(reversed(out))


def write_midi(path: str, notes, channels: dict) -> None:
    """Write a format-0 Standard MIDI File.

    notes: iterable of (start_s, duration_s, channel, pitch, velocity).
    channels: channel -> dict(program=, volume=, pan=, reverb=, chorus=).
    """
    tick_s = _MIDI_TEMPO_US / 1e6 / _TICKS_PER_QUARTER
    events = []  # (tick, order, bytes): offs before ons at the same tick
    for ch, c in channels.items():
        events.append((0, 0, bytes([0xC0 | ch, c.get("program", 0) & 0x7F])))
        for cc, key in ((7, "volume"), (10, "pan"), (91, "reverb"), (93, "chorus")):
            if key in c:
                events.append((0, 0, bytes([0xB0 | ch, cc, int(np.clip(c[key], 0, 127))])))
    # A repeated pitch on one channel: end the earlier note where the next one starts.
    by_key: dict = {}
    for start, dur, ch, pitch, vel in sorted(notes):
        if start < 0 or not 0 <= pitch <= 127:
            continue
        by_key.setdefault((ch, pitch), []).append([start, dur, int(np.clip(vel, 1, 127))])
    for (ch, pitch), lst in by_key.items():
        for i, (start, dur, vel) in enumerate(lst):
            end = start + dur
            if i + 1 < len(lst):
                end = min(end, lst[i + 1][0])
            on = int(round(start / tick_s))
            off = max(on + 1, int(round(end / tick_s)))
            events.append((on, 2, bytes([0x90 | ch, pitch, vel])))
            events.append((off, 1, bytes([0x80 | ch, pitch, 0])))
    events.sort(key=lambda e: (e[0], e[1]))
    track = bytearray(b"\x00\xff\x51\x03" + _MIDI_TEMPO_US.to_bytes(3, "big"))
    last = 0
    for tick, _, data in events:
        track += _vlq(tick - last) + data
        last = tick
    track += b"\x00\xff\x2f\x00"
    with open(path, "wb") as f:
        f.write(b"MThd" + struct.pack(">IHHH", 6, 0, 1, _TICKS_PER_QUARTER))
        f.write(b"MTrk" + struct.pack(">I", len(track)) + bytes(track))


# ----------------------------------------------------------------------------- songs


@dataclasses.dataclass
class Song:
    """One clip's recipe; ``render`` turns it into audio."""
    name: str
    style: str
    seed: int
    bpm: float  # nominal tempo the song was written at
    seconds: float
    sample_rate: int
    effects: tuple  # subset of ("reverb", "noise", "mp3")
    beatless: bool = False

    def key(self) -> str:
        blob = json.dumps([GENERATOR_VERSION, dataclasses.asdict(self)], sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


class Arrangement:
    """Notes placed on a humanised, slightly drifting beat grid."""

    def __init__(self, rng: np.random.Generator, bpm: float, beats_per_bar: int, seconds: float,
                 played: bool):
        self.rng = rng
        self.bpm = bpm
        self.bpb = beats_per_bar
        self.seconds = seconds
        self.notes: list = []
        self.channels: dict = {}
        beat = 60.0 / bpm
        # The clip starts somewhere inside a bar (a pickup is cut off).
        self.offset = -rng.uniform(0.0, beats_per_bar) * beat
        # Played music breathes: a slow zero-mean wander (local tempo +-0.3-1.2 %) and a
        # gentle push or drag over the clip (up to +-1 % end to end).
        w = rng.uniform(0.003, 0.012) if played else 0.0
        self.w_period = rng.uniform(16.0, 48.0)
        self.w_amp = w * self.w_period / (2 * math.pi)
        self.w_phase = rng.uniform(0, 2 * math.pi)
        self.drift = rng.uniform(-0.01, 0.01) if played else 0.0
        self.total_beats = (seconds - self.offset) / beat + 2 * beats_per_bar
        self.n_bars = int(math.ceil(self.total_beats / beats_per_bar))

    def time(self, u: float) -> float:
        """Musical time (beats from the first bar line) -> seconds."""
        beat = 60.0 / self.bpm
        wander = self.w_amp * (math.sin(2 * math.pi * u / self.w_period + self.w_phase)
                               - math.sin(self.w_phase))
        push = -0.5 * self.drift * u * u / self.total_beats
        return self.offset + beat * (u + wander + push)

    def true_bpm(self) -> float:
        """Beats per minute over the clip [0, seconds]: count the beats it spans."""
        us = np.linspace(0, self.total_beats, 20001)
        ts = np.array([self.time(u) for u in us])
        u0, u1 = np.interp([0.0, self.seconds], ts, us)
        return 60.0 * (u1 - u0) / self.seconds

    def channel(self, ch: int, program: int, volume: int = 100, pan: int = 64,
                reverb: int | None = None, chorus: int = 0) -> None:
        rev = int(self.rng.integers(10, 60)) if reverb is None else reverb
        self.channels[ch] = dict(program=program, volume=volume, pan=pan, reverb=rev,
                                 chorus=chorus)

    def note(self, ch: int, pitch: int, u: float, dur: float, vel: float,
             jitter: float = 0.006, spread: float = 0.0) -> None:
        """A note at beat u lasting dur beats; jitter = timing std in seconds."""
        t0 = self.time(u) + self.rng.normal(0.0, jitter) + spread
        t1 = self.time(u + dur)
        if t1 <= 0 or t0 > self.seconds + 1.0:
            return
        v = vel * self.rng.uniform(0.88, 1.08)
        self.notes.append((max(t0, 0.0), max(t1 - max(t0, 0.0), 0.03), ch, int(pitch),
                           int(np.clip(round(v), 1, 127))))


class Harmony:
    """Key, progression and harmonic rhythm of a song."""

    def __init__(self, rng: np.random.Generator, kind: str, beats_per_chord: int):
        self.key = int(rng.integers(0, 12))
        self.kind = kind
        progs = _PROGRESSIONS[kind]
        self.prog = progs[int(rng.integers(len(progs)))]
        self.beats_per_chord = beats_per_chord
        self.scale = MINOR if kind == "minor" else MAJOR

    def chord_at(self, u: float):
        i = int(u // self.beats_per_chord) % len(self.prog)
        root, quality = self.prog[i]
        return (self.key + root) % 12, _QUALITY[quality]

    def bass_note(self, u: float, low: int = 33) -> int:
        root, _ = self.chord_at(u)
        return low + (root - low) % 12

    def voicing(self, u: float, centre: int = 62, n: int = 4) -> list[int]:
        root, q = self.chord_at(u)
        tones = sorted({(root + iv) % 12 for iv in q})
        out, p = [], centre - 7
        while len(out) < n:
            if p % 12 in tones:
                out.append(p)
            p += 1
        return out

    def scale_note(self, degree: int, base: int = 72) -> int:
        octave, d = divmod(degree, len(self.scale))
        return base + (self.key % 12) + 12 * octave + self.scale[d] - 12 * (self.key % 12 > 5)


def _drums(a: Arrangement, bars, patterns: dict, grid: int, *, swing: float = 0.0,
           jitter: float = 0.004, vel_scale: float = 1.0, crash_every: int = 0,
           fill_every: int = 0) -> None:
    """Play pattern strings (one char per grid step; X accent, x hit, o soft, g ghost)."""
    level = {"X": 118, "x": 96, "o": 68, "g": 38}
    for b in bars:
        fill = fill_every and b % fill_every == fill_every - 1
        if crash_every and b % crash_every == 0:
            a.note(DRUM_CH, CRASH, b * a.bpb, 1.0, 100 * vel_scale, jitter)
        for pitch, pat in patterns.items():
            steps = len(pat)
            for s, ch in enumerate(pat):
                if ch not in level:
                    continue
                pos = s / grid  # beats into the bar
                if fill and pos >= a.bpb - 1 and pitch in (SNARE, HAT, OPEN, RIDE, CLAP, RIM):
                    continue
                frac = pos % 1.0
                if swing and grid in (2, 4) and abs(frac - 0.5) < 1e-6:
                    pos += swing * 0.5
                elif swing and grid == 4 and frac in (0.25, 0.75):
                    pos += swing * 0.25
                a.note(DRUM_CH, pitch, b * a.bpb + pos, 0.25, level[ch] * vel_scale, jitter)
            del steps
        if fill:
            toms = list(TOMS)
            for k in range(4):
                pitch = toms[(k * 2) % len(toms)] if a.rng.random() < 0.6 else SNARE
                a.note(DRUM_CH, pitch, b * a.bpb + a.bpb - 1 + k * 0.25, 0.25,
                       100 * vel_scale, jitter)


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _melody(a: Arrangement, h: Harmony, ch: int, bars, durations, *, base=72, vel=80,
            rest_p=0.2, jitter=0.012, legato=0.95) -> None:
    """A stepwise melody over the bars, rhythm drawn from ``durations`` (beats)."""
    deg = int(a.rng.integers(0, 5))
    for b in bars:
        u = b * a.bpb
        end = u + a.bpb
        while u < end - 1e-6:
            d = min(_pick(a.rng, durations), end - u)
            if a.rng.random() >= rest_p:
                deg = int(np.clip(deg + _pick(a.rng, (-2, -1, -1, 0, 1, 1, 2, 3, -3)), -3, 9))
                a.note(ch, h.scale_note(deg, base), u, d * legato, vel, jitter)
            u += d


def _pad(a: Arrangement, h: Harmony, ch: int, bars, *, centre=62, vel=70, n=4) -> None:
    bpc = h.beats_per_chord
    start, stop = bars[0] * a.bpb, (bars[-1] + 1) * a.bpb
    u = start
    while u < stop:
        for p in h.voicing(u, centre, n):
            a.note(ch, p, u, bpc * 0.98, vel, 0.01)
        u += bpc


def _bass_line(a: Arrangement, h: Harmony, ch: int, bars, steps, *, grid=4, vel=96,
               jitter=0.006, fifths=0.2, octave=0.1, legato=0.9, low=33) -> None:
    """Bass notes on the given grid steps of each bar: chord root, sometimes fifth/octave."""
    steps = sorted(steps)
    for b in bars:
        for i, s in enumerate(steps):
            nxt = steps[i + 1] if i + 1 < len(steps) else a.bpb * grid
            u = b * a.bpb + s / grid
            p = h.bass_note(u, low)
            r = a.rng.random()
            if s and r < fifths:
                p += 7
            elif s and r < fifths + octave:
                p += 12
            a.note(ch, p, u, (nxt - s) / grid * legato, vel, jitter)


def _comp(a: Arrangement, h: Harmony, ch: int, bars, steps, *, grid=4, dur=0.2, vel=80,
          centre=64, n=4, jitter=0.008, strum=0.0, swing=0.0) -> None:
    """Chord hits on grid steps (``strum`` = seconds between strings)."""
    for b in bars:
        for s in steps:
            pos = s / grid
            if swing and abs(pos % 1.0 - 0.5) < 1e-6:
                pos += swing * 0.5
            u = b * a.bpb + pos
            for k, p in enumerate(h.voicing(u, centre, n)):
                a.note(ch, p, u, dur, vel, jitter, spread=k * strum)


def _strum(a: Arrangement, h: Harmony, ch: int, bars, pattern: str, grid: int, *, vel=90,
           centre=60, jitter=0.01) -> None:
    """Guitar strumming: 'D' down (low->high, strong), 'U' up (high->low, lighter)."""
    for b in bars:
        for s, c in enumerate(pattern):
            if c not in "DU":
                continue
            u = b * a.bpb + s / grid
            voice = h.voicing(u, centre, 6)
            gap = a.rng.uniform(0.006, 0.016)
            order = voice if c == "D" else voice[::-1]
            accent = 1.0 if (s % grid == 0) else 0.8
            v = vel * accent * (1.0 if c == "D" else 0.75)
            for k, p in enumerate(order):
                a.note(ch, p, u, 1.0 / grid * 1.8, v, jitter, spread=k * gap)


# --- styles: each fills an Arrangement (channels, notes); return the harmony kind used.

def _style_rock(a, rng):
    h = Harmony(rng, _pick(rng, ("major", "major", "minor")), _pick(rng, (4, 4, 8, 2)))
    bars = range(a.n_bars)
    a.channel(DRUM_CH, KITS[_pick(rng, ("standard", "room", "power"))])
    hats = _pick(rng, ("x.x.x.x.x.x.x.x.", "X.x.X.x.X.x.X.x.", "x...x...x...x...",
                       "xxxxxxxxxxxxxxxx" if a.bpm < 125 else "x.x.x.x.x.x.x.x."))
    ride = rng.random() < 0.25
    pats = {KICK: _pick(rng, ("x.......x.......", "x.......x.x.....", "x.....x.x.......",
                              "x.......x.....x.", "x.x.....x.x.....")),
            SNARE: "....X.......X...", (RIDE if ride else HAT): hats}
    _drums(a, bars, pats, 4, jitter=0.006, crash_every=_pick(rng, (4, 8)), fill_every=8)
    a.channel(0, _pick(rng, (33, 34)), 105)
    _bass_line(a, h, 0, bars, _pick(rng, ([0, 2, 4, 6, 8, 10, 12, 14], [0, 4, 8, 12],
                                          [0, 6, 8, 14], [0, 3, 8, 10])), fifths=0.15)
    gtr = _pick(rng, ("power8", "sustain", "piano", "strum"))
    if gtr == "power8":
        a.channel(1, _pick(rng, (29, 30)), 85)
        _comp(a, h, 1, bars, range(0, 16, 2), dur=0.4, centre=52, n=3, vel=85)
    elif gtr == "sustain":
        a.channel(1, _pick(rng, (29, 30, 18)), 80)
        _pad(a, h, 1, list(bars), centre=57, vel=80, n=3)
    elif gtr == "piano":
        a.channel(1, _pick(rng, (0, 1, 2)), 90)
        _comp(a, h, 1, bars, [0, 4, 8, 12], dur=0.9, centre=62, vel=80)
    else:
        a.channel(1, 25, 90)
        _strum(a, h, 1, bars, _pick(rng, ("D.D.DUDU", "D.DU.UDU", "D.D.D.D.")) * 2, 4)
    if rng.random() < 0.6:
        a.channel(2, _pick(rng, (29, 30, 65, 73, 81, 56)), 85)
        _melody(a, h, 2, bars, (0.5, 1.0, 1.0, 1.5, 2.0), base=67)


def _style_pop_ballad(a, rng):
    h = Harmony(rng, _pick(rng, ("major", "major", "minor")), _pick(rng, (4, 4, 8, 2)))
    bars = range(a.n_bars)
    a.channel(DRUM_CH, KITS[_pick(rng, ("standard", "room", "electronic"))])
    busy = _pick(rng, ("xxxxxxxxxxxxxxxx", "x.x.x.x.x.x.x.x.", "Xxxxxxxxxxxxxxxx",
                       "x.xxx.xxx.xxx.xx"))
    pats = {KICK: _pick(rng, ("x.......x.x.....", "x......x..x.....", "x.........x.....",
                              "x..x......x....."))}
    pats[_pick(rng, (SNARE, SNARE, CLAP, RIM))] = "....x.......x..."
    pats[_pick(rng, (HAT, HAT, SHAKER, RIDE))] = busy
    _drums(a, bars, pats, 4, jitter=0.006, crash_every=8, fill_every=8)
    a.channel(0, _pick(rng, (33, 35, 38)), 100)
    _bass_line(a, h, 0, bars, _pick(rng, ([0, 8], [0, 6, 8], [0, 10], [0])), legato=0.95)
    a.channel(1, _pick(rng, (0, 1, 4, 5)), 90)
    arp = _pick(rng, ("8ths", "16ths", "block"))
    figure = _pick(rng, ((0, 1, 2, 3, 2, 1, 2, 1), (0, 2, 1, 2), (0, 1, 2, 3)))
    for b in bars:
        for k in range({"8ths": 8, "16ths": 16, "block": 4}[arp]):
            step = {"8ths": 0.5, "16ths": 0.25, "block": 1.0}[arp]
            u = b * 4 + k * step
            voice = h.voicing(u, 64, 4)
            if arp == "block":
                for p in voice[:3]:
                    a.note(1, p, u, 0.9, 72, 0.01)
            else:
                a.note(1, voice[figure[k % len(figure)]], u,
                       step * 1.5, 64 + (10 if k % 4 == 0 else 0), 0.01)
    if rng.random() < 0.7:
        a.channel(3, _pick(rng, (48, 49, 89)), 70)
        _pad(a, h, 3, list(bars), centre=60, vel=60)
    a.channel(2, _pick(rng, (53, 73, 65, 40, 71)), 95)
    _melody(a, h, 2, bars, (0.5, 1.0, 1.0, 1.5, 2.0, 0.75), base=72, vel=85)


def _style_four_floor(a, rng, style):
    h = Harmony(rng, _pick(rng, ("minor", "minor", "major")),
                _pick(rng, (4, 8, 8, 16)) if style != "techno" else _pick(rng, (16, 32)))
    bars = range(a.n_bars)
    a.channel(DRUM_CH, KITS[_pick(rng, ("electronic", "tr808", "standard"))])
    pats = {KICK: "X...X...X...X..."}
    if style == "house":
        pats[CLAP] = "....x.......x..."
        pats[OPEN] = "..x...x...x...x."
        if rng.random() < 0.6:
            pats[HAT] = _pick(rng, ("xxxxxxxxxxxxxxxx", "o.x.o.x.o.x.o.x.", "x.xxx.xxx.xxx.xx"))
        if rng.random() < 0.4:
            pats[SHAKER] = "oxoxoxoxoxoxoxox"
    elif style == "techno":
        pats[OPEN] = "..x...x...x...x."
        pats[HAT] = _pick(rng, ("xxxxxxxxxxxxxxxx", "x.xxx.xxx.xxx.xx"))
        pats[RIM] = _pick(rng, ("...x..x....x..x.", "..x..x..x..x..x.", "......x.......x."))
        if rng.random() < 0.5:
            pats[CLAP] = "....x.......x..."
    else:  # disco
        pats[SNARE] = "....x.......x..."
        pats[OPEN] = "..x...x...x...x."
        pats[HAT] = "x.x.x.x.x.x.x.x." if rng.random() < 0.5 else "xxxxxxxxxxxxxxxx"
    _drums(a, bars, pats, 4, jitter=0.002 if style != "disco" else 0.005, crash_every=8)
    a.channel(0, _pick(rng, (38, 39)) if style != "disco" else _pick(rng, (33, 34, 38)), 105)
    if style == "disco":
        for b in bars:
            for k in range(8):
                u = b * 4 + k * 0.5
                a.note(0, h.bass_note(u, 33) + (12 if k % 2 else 0), u, 0.4, 100, 0.004)
    elif style == "techno":
        _bass_line(a, h, 0, bars, _pick(rng, (range(16), [2, 3, 6, 7, 10, 11, 14, 15],
                                              [0, 3, 6, 8, 11, 14])), legato=0.6, fifths=0.1,
                   octave=0.3, jitter=0.001)
    else:
        _bass_line(a, h, 0, bars, _pick(rng, ([2, 6, 10, 14], [0, 3, 6, 10, 14],
                                              [2, 3, 6, 10, 11, 14])), legato=0.7,
                   jitter=0.002)
    if style == "house":
        a.channel(1, _pick(rng, (0, 1, 16, 4, 90)), 85)
        _comp(a, h, 1, bars, _pick(rng, ([3, 6, 11, 14], [2, 6, 10, 14], [0, 3, 6, 10, 13])),
              dur=0.3, vel=85, jitter=0.002)
        if rng.random() < 0.5:
            a.channel(3, _pick(rng, (89, 88, 50)), 60)
            _pad(a, h, 3, list(bars), vel=55)
    elif style == "techno":
        a.channel(1, _pick(rng, (81, 90, 87)), 70)
        _comp(a, h, 1, bars, _pick(rng, ([3, 10], [6, 14], [2, 7, 12])), dur=0.2, vel=70,
              jitter=0.001, n=3)
    else:
        a.channel(1, 28, 80)
        _comp(a, h, 1, bars, [s for s in range(16) if rng.random() < 0.7], dur=0.1, vel=70,
              centre=66, n=3)
        a.channel(3, _pick(rng, (48, 49, 50)), 75)
        _pad(a, h, 3, list(bars), centre=67, vel=65)
        if rng.random() < 0.5:
            a.channel(2, _pick(rng, (61, 56, 48)), 90)
            _melody(a, h, 2, bars, (0.5, 0.5, 1.0, 0.25), base=72)


def _style_hiphop(a, rng):
    h = Harmony(rng, _pick(rng, ("minor", "jazz", "minor", "major")), _pick(rng, (4, 8, 8)))
    bars = range(a.n_bars)
    swing = rng.uniform(0.0, 0.35)
    a.channel(DRUM_CH, KITS[_pick(rng, ("standard", "room", "tr808", "electronic"))])
    pats = {KICK: _pick(rng, ("x.....x...x.....", "x..x......x..x..", "x.x.......x...x.",
                              "x......x.xx.....")),
            SNARE: "....X.......X...",
            HAT: _pick(rng, ("x.x.x.x.x.x.x.x.", "xxxxxxxxxxxxxxxx", "x.xxx.xxx.xxx.xx",
                             "X.x.X.x.X.x.X.xx"))}
    _drums(a, bars, pats, 4, swing=swing, jitter=0.005)
    a.channel(0, _pick(rng, (33, 35, 38, 32)), 105)
    _bass_line(a, h, 0, bars, _pick(rng, ([0, 6, 10], [0, 3, 10, 13], [0, 7, 10])),
               legato=0.8)
    a.channel(1, _pick(rng, (4, 5, 0, 11, 26)), 85)
    if rng.random() < 0.5:
        _pad(a, h, 1, list(bars), centre=62, vel=75)
    else:
        _comp(a, h, 1, bars, _pick(rng, ([0, 6, 10], [0, 3, 8, 14], [2, 10])), dur=0.6,
              vel=80, swing=swing)
    if rng.random() < 0.5:
        a.channel(2, _pick(rng, (65, 73, 56, 11, 0)), 85)
        _melody(a, h, 2, bars, (0.5, 0.5, 1.0, 0.75, 0.25), base=72, rest_p=0.35)


def _style_trap(a, rng):
    h = Harmony(rng, "minor", _pick(rng, (4, 8, 8)))
    bars = range(a.n_bars)
    a.channel(DRUM_CH, KITS[_pick(rng, ("tr808", "tr808", "electronic"))])
    kick = _pick(rng, ("x.........x.....", "x......x..x.....", "x.....x.....x...",
                       "x..x......x....x"))
    pats = {KICK: kick, CLAP if rng.random() < 0.5 else SNARE: "........X......."}
    if rng.random() < 0.5:
        pats[SNARE2 if CLAP in pats else CLAP] = "........x......."
    _drums(a, bars, pats, 4, jitter=0.001)
    # Hi-hats: 8ths or 16ths of the notated tempo, with rolls (32nds, 16th triplets).
    base = _pick(rng, (2, 4, 4))
    for b in bars:
        for beat in range(4):
            u0 = b * 4 + beat
            roll = rng.random() < 0.25
            if roll:
                div = _pick(rng, (8, 6, 3))
                for k in range(div):
                    a.note(DRUM_CH, HAT, u0 + k / div, 0.1, 60 + 30 * k / div, 0.001)
            else:
                for k in range(base):
                    a.note(DRUM_CH, HAT, u0 + k / base, 0.1, 90 if k == 0 else 70, 0.001)
        if rng.random() < 0.3:
            a.note(DRUM_CH, OPEN, b * 4 + _pick(rng, (1.5, 3.5, 2.75)), 0.5, 80, 0.001)
    # 808 bass follows the kick, holding the chord root.
    a.channel(0, _pick(rng, (38, 39, 87)), 110)
    steps = [i for i, c in enumerate(kick) if c == "x"]
    _bass_line(a, h, 0, bars, steps, legato=0.95, low=28, fifths=0.0, octave=0.15,
               jitter=0.001)
    a.channel(1, _pick(rng, (10, 8, 0, 88, 91, 73, 14)), 80)
    if rng.random() < 0.5:
        _melody(a, h, 1, bars, (0.5, 0.5, 0.25, 1.0, 1 / 3), base=72, rest_p=0.3,
                jitter=0.002)
    else:
        _pad(a, h, 1, list(bars), centre=62, vel=70, n=3)


def _style_funk(a, rng):
    h = Harmony(rng, _pick(rng, ("minor", "blues", "major")), _pick(rng, (4, 8, 16)))
    bars = range(a.n_bars)
    a.channel(DRUM_CH, KITS[_pick(rng, ("standard", "room"))])
    pats = {KICK: _pick(rng, ("x..x..x...x.....", "x.x....x..x..x..", "x......x.x....x.",
                              "x..x...x..x....x")),
            SNARE: _pick(rng, ("....X..g.g..X..g", "g...X.g.....X.g.", "....X.......X...")),
            HAT: _pick(rng, ("xxxxxxxxxxxxxxxx", "x.xxx.xxx.xxx.xx", "Xxxxxxx.xxxxXxx."))}
    _drums(a, bars, pats, 4, jitter=0.004, fill_every=8, crash_every=8)
    a.channel(0, _pick(rng, (36, 37, 33)), 110)
    _bass_line(a, h, 0, bars, _pick(rng, ([0, 3, 6, 7, 10, 13], [0, 2, 3, 7, 10, 11, 14],
                                          [0, 6, 7, 10, 12, 15])), legato=0.5, octave=0.3)
    a.channel(1, _pick(rng, (7, 28, 27)), 85)
    _comp(a, h, 1, bars, _pick(rng, ([1, 3, 6, 9, 11, 14], [2, 3, 6, 10, 11, 14],
                                     list(range(16)))), dur=0.12, vel=75, n=3, centre=66)
    if rng.random() < 0.5:
        a.channel(2, _pick(rng, (61, 56, 65)), 95)
        _comp(a, h, 2, [b for b in bars if b % 2], _pick(rng, ([3, 6], [14], [6, 7])),
              dur=0.3, vel=95, n=3, centre=70)


def _style_reggae(a, rng):
    h = Harmony(rng, _pick(rng, ("major", "minor")), _pick(rng, (4, 8, 8)))
    bars = range(a.n_bars)
    swing = _pick(rng, (0.0, 0.0, 0.2, 0.33))
    a.channel(DRUM_CH, KITS[_pick(rng, ("standard", "room"))])
    pats = {KICK: "........X.......", RIM: "........X.......",
            HAT: _pick(rng, ("x.x.x.x.x.x.x.x.", "x.o.x.o.x.o.x.o.", "xxx.x.x.xxx.x.x."))}
    _drums(a, bars, pats, 4, swing=swing, jitter=0.006, fill_every=8)
    a.channel(0, _pick(rng, (33, 34, 38)), 115)
    for b in bars:  # a melodic line that leaves beat 1 empty
        for pos in _pick(rng, ((1.0, 1.5, 2.0, 3.5), (0.5, 1.0, 2.0, 2.5, 3.0), (1.0, 2.0, 3.0),
                               (1.5, 2.0, 3.0, 3.5))):
            u = b * 4 + pos
            a.note(0, h.bass_note(u, 33) + _pick(rng, (0, 0, 7, 12, 3, 5)), u, 0.45, 100, 0.008)
    a.channel(1, _pick(rng, (27, 28)), 85)  # skank on 2 and 4
    _comp(a, h, 1, bars, [4, 12], dur=0.15, vel=85, n=3, centre=67, strum=0.004)
    a.channel(3, _pick(rng, (16, 17)), 75)
    if rng.random() < 0.5:  # organ "bubble"
        _comp(a, h, 3, bars, [2, 6, 10, 14], dur=0.2, vel=65, n=3, centre=60, swing=swing)
    else:
        _comp(a, h, 3, bars, [4, 12], dur=0.2, vel=70, n=3, centre=60)
    if rng.random() < 0.5:
        a.channel(2, _pick(rng, (56, 65, 66, 73)), 90)
        _melody(a, h, 2, bars, (0.5, 1.0, 1.0, 1.5, 2.0), base=67, rest_p=0.3)


def _style_swing(a, rng, shuffle=False):
    h = Harmony(rng, "blues" if shuffle else "jazz",
                4 if shuffle else _pick(rng, (2, 4, 4)))
    bars = range(a.n_bars)
    a.channel(DRUM_CH, KITS[_pick(rng, ("jazz", "brush", "room"))] if not shuffle else
              KITS[_pick(rng, ("standard", "room"))])
    if shuffle:
        pats = {KICK: "x.....x.....", SNARE: "...X.....X..",
                _pick(rng, (HAT, RIDE)): "x.xx.xx.xx.x"}
        _drums(a, bars, pats, 3, jitter=0.006, fill_every=12, crash_every=12)
    else:
        pats = {RIDE: "x..x.xx..x.x", PEDAL: "...x.....x..", KICK: "o..o..o..o.."}
        _drums(a, bars, pats, 3, jitter=0.007, vel_scale=0.85)
        for b in bars:  # snare comping: a few soft hits on the triplet grid
            for _ in range(int(rng.integers(0, 3))):
                a.note(DRUM_CH, SNARE, b * 4 + int(rng.integers(0, 12)) / 3, 0.2, 45, 0.008)
    a.channel(0, 32 if not shuffle else _pick(rng, (32, 33)), 115)
    if shuffle:
        for b in bars:
            for k in range(8):
                u = b * 4 + k // 2 + (2 / 3 if k % 2 else 0.0)
                a.note(0, h.bass_note(b * 4, 33) + (0, 0, 7, 7, 9, 9, 10, 9)[k], u, 0.3, 95,
                       0.006)
    else:
        for b in bars:  # walking bass: chord tones, approach notes into the next chord
            for k in range(4):
                u = b * 4 + k
                root, q = h.chord_at(u)
                nxt = h.bass_note(u + 1, 33)
                choice = (h.bass_note(u, 33) if k % h.beats_per_chord == 0 else
                          33 + (root + q[int(rng.integers(1, len(q)))] - 33) % 12)
                if (k + 1) % h.beats_per_chord == 0 and rng.random() < 0.5:
                    choice = nxt + _pick(rng, (-1, 1))
                a.note(0, choice, u, 0.9, 100, 0.008)
    a.channel(1, _pick(rng, (0, 26, 4)), 80)
    if shuffle:
        _comp(a, h, 1, bars, [1, 4, 7, 10], grid=3, dur=0.3, vel=70)
    else:
        for b in bars:  # Charleston-like comping on the swung grid
            for pos in _pick(rng, ((0.0, 1 + 2 / 3), (1 + 2 / 3, 3.0), (0.0, 2 + 2 / 3),
                                   (2 / 3, 2.0, 3 + 2 / 3))):
                u = b * 4 + pos
                for p in h.voicing(u, 62, 4):
                    a.note(1, p, u, 0.3, 70, 0.01)
    if rng.random() < 0.6:
        a.channel(2, _pick(rng, (65, 66, 56, 57, 73)), 90)
        _melody(a, h, 2, bars, (2 / 3, 1 / 3, 1.0, 1.0, 2.0, 1 + 1 / 3), base=70, rest_p=0.25)


def _style_waltz(a, rng, drums):
    h = Harmony(rng, _pick(rng, ("major", "minor")), _pick(rng, (3, 6, 6)))
    bars = range(a.n_bars)
    if drums:
        a.channel(DRUM_CH, KITS[_pick(rng, ("brush", "jazz", "standard"))])
        _drums(a, bars, {KICK: "x.....", _pick(rng, (HAT, RIDE, SNARE)): "..o.o."}, 2,
               jitter=0.008, vel_scale=0.8)
    a.channel(0, _pick(rng, (58, 32, 33, 0)), 110)
    for b in bars:
        u = b * 3
        a.note(0, h.bass_note(u, 33) + (7 if b % 2 and rng.random() < 0.6 else 0), u, 0.9, 100,
               0.01)
    a.channel(1, _pick(rng, (21, 0, 45, 24, 48)), 85)
    _comp(a, h, 1, bars, [1, 2], grid=1, dur=0.45, vel=72, n=3, centre=62)
    a.channel(2, _pick(rng, (40, 73, 21, 71, 68)), 95)
    _melody(a, h, 2, bars, (1.0, 1.0, 2.0, 3.0, 0.5), base=72, rest_p=0.1)


def _style_dnb(a, rng):
    h = Harmony(rng, "minor", _pick(rng, (8, 16)))
    bars = range(a.n_bars)
    a.channel(DRUM_CH, KITS[_pick(rng, ("standard", "electronic", "room"))])
    pats = {KICK: _pick(rng, ("x.........x.....", "x.........x..x..", "x.x.......x.....")),
            SNARE: _pick(rng, ("....X.......X...", "....X..g.g..X..g", "....X.g.....X.g.")),
            _pick(rng, (HAT, RIDE, SHAKER)): _pick(rng, ("x.x.x.x.x.x.x.x.", "xxxxxxxxxxxxxxxx",
                                                        "x.xxx.xxx.xxx.xx"))}
    _drums(a, bars, pats, 4, jitter=0.002, crash_every=8)
    a.channel(0, _pick(rng, (38, 39, 87)), 110)
    _bass_line(a, h, 0, bars, _pick(rng, ([0], [0, 10], [0, 6, 10])), legato=0.95, low=28,
               fifths=0.0, jitter=0.001)
    a.channel(3, _pick(rng, (89, 91, 94, 50)), 70)
    _pad(a, h, 3, list(bars), vel=60)
    if rng.random() < 0.4:
        a.channel(1, _pick(rng, (4, 0, 11)), 80)
        _comp(a, h, 1, [b for b in bars if b % 2 == 0], [0, 3, 6], dur=0.4, vel=70)


def _style_punk(a, rng):
    h = Harmony(rng, _pick(rng, ("major", "minor")), _pick(rng, (4, 4, 8)))
    bars = range(a.n_bars)
    a.channel(DRUM_CH, KITS[_pick(rng, ("standard", "power", "room"))])
    pats = {KICK: _pick(rng, ("x.......x.......", "x...x...x...x...", "x.x.....x.x.....")),
            SNARE: "....X.......X...",
            _pick(rng, (HAT, RIDE, CRASH)): "x.x.x.x.x.x.x.x."}
    _drums(a, bars, pats, 4, jitter=0.007, crash_every=4, fill_every=8)
    a.channel(0, _pick(rng, (34, 33)), 110)
    _bass_line(a, h, 0, bars, range(0, 16, 2), legato=0.8, fifths=0.0, octave=0.0)
    a.channel(1, 30, 90)
    _comp(a, h, 1, bars, range(0, 16, 2), dur=0.45, vel=95, n=3, centre=52)


def _style_rnb(a, rng):
    h = Harmony(rng, _pick(rng, ("jazz", "minor", "major")), _pick(rng, (4, 8, 2)))
    bars = range(a.n_bars)
    a.channel(DRUM_CH, KITS[_pick(rng, ("tr808", "electronic", "standard"))])
    pats = {KICK: _pick(rng, ("x......x..x.....", "x.x.......x..x..", "x..x......x.....")),
            _pick(rng, (CLAP, SNARE, RIM)): "....x.......x...",
            HAT: _pick(rng, ("xxxxxxxxxxxxxxxx", "x.xxx.xxx.xxx.xx", "x.x.x.x.x.x.x.x."))}
    _drums(a, bars, pats, 4, jitter=0.003, swing=_pick(rng, (0.0, 0.15, 0.3)))
    for b in bars:  # hi-hat triplet rolls now and then
        if rng.random() < 0.3:
            u0 = b * 4 + _pick(rng, (1, 3))
            for k in range(6):
                a.note(DRUM_CH, HAT, u0 + k / 6, 0.1, 55 + 5 * k, 0.002)
    a.channel(0, _pick(rng, (38, 33, 35)), 110)
    _bass_line(a, h, 0, bars, _pick(rng, ([0, 7, 10], [0, 10], [0, 3, 8, 11])), legato=0.9)
    a.channel(1, _pick(rng, (4, 5)), 85)
    _pad(a, h, 1, list(bars), centre=62, vel=72)
    a.channel(2, _pick(rng, (65, 53, 73, 81)), 90)
    _melody(a, h, 2, bars, (0.5, 0.25, 0.75, 1.0, 1.5), base=72, rest_p=0.3)


def _style_country(a, rng):
    h = Harmony(rng, "major", _pick(rng, (4, 8, 8)))
    bars = range(a.n_bars)
    a.channel(DRUM_CH, KITS[_pick(rng, ("standard", "room", "brush"))])
    pats = {KICK: "x.......x.......", _pick(rng, (SNARE, RIM)): "....x.......x...",
            _pick(rng, (HAT, SHAKER)): _pick(rng, ("x.x.x.x.x.x.x.x.", "xxxxxxxxxxxxxxxx"))}
    _drums(a, bars, pats, 4, jitter=0.006, fill_every=8)
    a.channel(0, _pick(rng, (32, 33)), 110)
    for b in bars:  # root-fifth "boom" on 1 and 3
        a.note(0, h.bass_note(b * 4, 33), b * 4, 0.9, 100, 0.006)
        a.note(0, h.bass_note(b * 4 + 2, 33) + 7, b * 4 + 2, 0.9, 95, 0.006)
    a.channel(1, 25, 90)
    _strum(a, h, 1, bars, _pick(rng, ("D.DUD.DU", "D.D.DUDU", "D.DU.UDU")) * 2, 4)
    a.channel(2, _pick(rng, (40, 22, 26, 27)), 95)
    _melody(a, h, 2, bars, (0.5, 0.5, 1.0, 0.25), base=72, rest_p=0.2)


def _style_piano_ballad(a, rng):
    h = Harmony(rng, _pick(rng, ("major", "minor", "major")), _pick(rng, (4, 4, 8, 2)))
    bars = range(a.n_bars)
    a.channel(0, _pick(rng, (0, 0, 1, 2, 4)), 110)
    lh = _pick(rng, ("whole", "halves", "octave_quarters"))
    rh = _pick(rng, ("8ths", "8ths", "block_quarters", "16ths"))
    figure = _pick(rng, ((0, 1, 2, 3, 2, 1, 2, 1), (0, 2, 1, 2), (0, 1, 2, 3), (0, 1, 2, 1)))
    for b in bars:
        u = b * 4
        bass = h.bass_note(u, 36)
        if lh == "whole":
            a.note(0, bass, u, 3.9, 80, 0.012)
        elif lh == "halves":
            a.note(0, bass, u, 1.9, 80, 0.012)
            a.note(0, h.bass_note(u + 2, 36) + 7, u + 2, 1.9, 70, 0.012)
        else:
            for k in range(4):
                a.note(0, bass + (12 if k % 2 else 0), u + k, 0.9, 72, 0.012)
        step = {"8ths": 0.5, "16ths": 0.25, "block_quarters": 1.0}[rh]
        for k in range(int(4 / step)):
            uu = u + k * step
            voice = h.voicing(uu, 62, 4)
            if rh == "block_quarters":
                for p in voice:
                    a.note(0, p, uu, 0.95, 60 + (8 if k == 0 else 0), 0.012)
            else:
                a.note(0, voice[figure[k % len(figure)]], uu, step * 2.5,
                       56 + (12 if (k * step) % 1 == 0 else 0), 0.012)
    _melody(a, h, 0, bars, (1.0, 1.0, 2.0, 0.5, 1.5), base=74, vel=90, rest_p=0.25)
    if rng.random() < 0.4:
        a.channel(3, _pick(rng, (48, 49, 42)), 70)
        _pad(a, h, 3, list(bars), centre=55, vel=55, n=3)


def _style_piano_triplets(a, rng):
    h = Harmony(rng, _pick(rng, ("major", "minor")), _pick(rng, (4, 8, 2)))
    bars = range(a.n_bars)
    a.channel(0, _pick(rng, (0, 1, 4)), 110)
    for b in bars:
        u = b * 4
        for half in (0, 2):
            a.note(0, h.bass_note(u + half, 36), u + half, 1.9, 80, 0.012)
        for k in range(12):  # triplet 8ths: three per beat
            uu = u + k / 3
            voice = h.voicing(uu, 62, 4)
            a.note(0, voice[(0, 1, 2, 3, 2, 1)[k % 6] if k % 3 else 0] + (12 if k % 3 == 1 else 0),
                   uu, 0.6, 52 + (14 if k % 3 == 0 else 0), 0.012)
    _melody(a, h, 0, bars, (1.0, 2.0, 1 + 2 / 3, 1 / 3, 2 / 3), base=74, vel=90, rest_p=0.2)


def _style_strings_walking(a, rng):
    h = Harmony(rng, _pick(rng, ("jazz", "major", "minor")), _pick(rng, (4, 4, 8)))
    bars = range(a.n_bars)
    a.channel(0, _pick(rng, (32, 45, 32)), 115)
    for b in bars:
        for k in range(4):
            u = b * 4 + k
            root, q = h.chord_at(u)
            p = (h.bass_note(u, 33) if k == 0 else
                 33 + (root + q[int(rng.integers(0, len(q)))] - 33) % 12 + _pick(rng, (0, 0, 12)))
            a.note(0, p, u, 0.85, 100, 0.01)
    a.channel(1, _pick(rng, (48, 49, 48, 52)), 80)
    _pad(a, h, 1, list(bars), centre=62, vel=70)
    if rng.random() < 0.7:
        a.channel(2, _pick(rng, (40, 42, 71, 68)), 95)
        _melody(a, h, 2, bars, (1.0, 2.0, 2.0, 1.5, 0.5), base=72, rest_p=0.15)


def _style_strummed(a, rng):
    h = Harmony(rng, _pick(rng, ("major", "major", "minor")), _pick(rng, (4, 8, 4, 2)))
    bars = range(a.n_bars)
    a.channel(1, _pick(rng, (25, 24, 25)), 110)
    grid = 4 if a.bpm < 110 else 2
    pattern = (_pick(rng, ("D.D.DUDU", "D.DU.UDU", "D.DUDUDU", "D..UD.DU", "D.DU.UDU"))
               if grid == 4 else _pick(rng, ("DDUUDU", "D.DU", "DDDU")))
    if grid == 4:
        pattern = pattern * 2
    else:
        pattern = (pattern * 8)[:8]
    _strum(a, h, 1, bars, pattern, grid, vel=95, centre=57)
    if rng.random() < 0.5:
        a.channel(0, _pick(rng, (32, 33)), 100)
        _bass_line(a, h, 0, bars, [0, 8], grid=4, legato=0.9)
    if rng.random() < 0.5:
        a.channel(2, _pick(rng, (73, 40, 22, 53)), 90)
        _melody(a, h, 2, bars, (1.0, 0.5, 2.0, 1.5), base=72, rest_p=0.2)


def _style_fingerpicked(a, rng):
    h = Harmony(rng, _pick(rng, ("major", "minor")), _pick(rng, (4, 8)))
    bars = range(a.n_bars)
    a.channel(1, _pick(rng, (24, 25)), 115)
    for b in bars:
        for k in range(8):
            u = b * 4 + k * 0.5
            voice = h.voicing(u, 60, 5)
            if k % 2 == 0:  # thumb: alternating bass on every beat
                p = h.bass_note(u, 40) + (7 if (k // 2) % 2 else 0)
                a.note(1, p, u, 0.9, 88, 0.01)
            else:
                a.note(1, voice[_pick(rng, (2, 3, 4))], u, 0.6, 66, 0.01)
    if rng.random() < 0.5:
        a.channel(2, _pick(rng, (73, 40, 71)), 85)
        _melody(a, h, 2, bars, (1.0, 1.0, 2.0, 0.5), base=74, rest_p=0.2)


def _style_stride(a, rng):
    h = Harmony(rng, _pick(rng, ("major", "jazz")), _pick(rng, (4, 8, 2)))
    bars = range(a.n_bars)
    a.channel(0, _pick(rng, (0, 1, 3)), 115)
    for b in bars:
        for k in range(4):
            u = b * 4 + k
            if k % 2 == 0:
                a.note(0, h.bass_note(u, 36) + (7 if k == 2 and rng.random() < 0.5 else 0),
                       u, 0.8, 92, 0.008)
            else:
                for p in h.voicing(u, 60, 3):
                    a.note(0, p, u, 0.5, 72, 0.008)
    _melody(a, h, 0, bars, (0.5, 0.5, 0.25, 0.75, 1.0), base=74, vel=90, rest_p=0.1)


_WRITERS = {
    "rock": _style_rock, "pop_ballad": _style_pop_ballad,
    "house": lambda a, r: _style_four_floor(a, r, "house"),
    "techno": lambda a, r: _style_four_floor(a, r, "techno"),
    "disco": lambda a, r: _style_four_floor(a, r, "disco"),
    "hiphop": _style_hiphop, "trap": _style_trap, "funk": _style_funk, "reggae": _style_reggae,
    "swing": _style_swing, "shuffle": lambda a, r: _style_swing(a, r, shuffle=True),
    "dnb": _style_dnb, "punk": _style_punk, "rnb": _style_rnb, "country": _style_country,
    "piano_ballad": _style_piano_ballad, "piano_triplets": _style_piano_triplets,
    "strings_walking": _style_strings_walking, "strummed_guitar": _style_strummed,
    "fingerpicked": _style_fingerpicked, "stride_piano": _style_stride,
}
_PROGRAMMED = {"house", "techno", "trap", "dnb"}  # on the grid: no tempo drift


def arrange(song: Song) -> Arrangement:
    """The notes of a song (also gives ``true_bpm``)."""
    rng = np.random.default_rng([song.seed, 1])
    (_, bpb, drums, _) = STYLES[song.style]
    a = Arrangement(rng, song.bpm, bpb, song.seconds, played=song.style not in _PROGRAMMED)
    if song.style == "waltz":
        _style_waltz(a, rng, drums=rng.random() < 0.5)
    else:
        _WRITERS[song.style](a, rng)
    return a


def make_set(which: str, n: int) -> list[Song]:
    """``n`` songs of the "tune", "report" or "check" set, styles in proportion to their
    weights."""
    base = {"tune": TUNE_SEED, "report": REPORT_SEED, "check": CHECK_SEED}[which]
    rng = np.random.default_rng(base)
    pool = [s for s, (_, _, _, w) in STYLES.items() for _ in range(w)]
    songs = []
    order = []
    while len(order) < n:
        order.extend(rng.permutation(pool).tolist())
    for i, style in enumerate(order[:n]):
        (lo, hi), _, _, _ = STYLES[style]
        bpm = float(rng.uniform(lo, hi))
        bpm = round(bpm) if rng.random() < 0.5 else round(bpm, 1)  # integer or not
        effects = tuple(e for e, p in (("reverb", 0.2), ("noise", 0.2), ("mp3", 0.25))
                        if rng.random() < p)
        songs.append(Song(name=f"{which}{i:03d}_{style}", style=style, seed=base + 1 + i,
                          bpm=float(bpm), seconds=round(float(rng.uniform(25, 40)), 1),
                          sample_rate=int(_pick(rng, (44100, 44100, 48000, 32000))),
                          effects=effects))
    return songs


BEATLESS_KINDS = ("sine_pad", "white_noise", "pink_noise", "brown_noise", "held_chord",
                  "slow_pads", "drone_wind", "waves", "wind_chimes", "rain", "vinyl_room",
                  "glide")


def make_beatless_set(which: str, n: int) -> list[Song]:
    base = {"tune": BEATLESS_TUNE_SEED, "report": BEATLESS_REPORT_SEED,
            "check": BEATLESS_CHECK_SEED}[which]
    rng = np.random.default_rng(base)
    songs = []
    for i in range(n):
        kind = BEATLESS_KINDS[i % len(BEATLESS_KINDS)]
        effects = tuple(e for e, p in (("reverb", 0.2), ("mp3", 0.25)) if rng.random() < p)
        songs.append(Song(name=f"{which}_beatless{i:03d}_{kind}", style=kind, seed=base + 1 + i,
                          bpm=0.0, seconds=round(float(rng.uniform(20, 40)), 1),
                          sample_rate=int(_pick(rng, (44100, 48000, 32000))), effects=effects,
                          beatless=True))
    return songs


# ----------------------------------------------------------------------------- rendering


def soundfont() -> str | None:
    for path in SOUNDFONTS:
        if os.path.exists(path):
            return path
    return None


def check_tools() -> str | None:
    """None if rendering works here, else a sentence saying what to install."""
    if shutil.which("fluidsynth") is None:
        return ("fluidsynth is not installed (Debian/Ubuntu: apt-get install fluidsynth "
                "fluid-soundfont-gm)")
    if soundfont() is None:
        return ("no General MIDI sound font found (Debian/Ubuntu: apt-get install "
                "fluid-soundfont-gm); looked in " + ", ".join(SOUNDFONTS))
    return None


def _fluidsynth(notes, channels, seconds: float, sr: int, tmp: str, gain: float) -> np.ndarray:
    import soundfile as sf

    mid, wav = os.path.join(tmp, "song.mid"), os.path.join(tmp, "song.wav")
    write_midi(mid, notes, channels)
    subprocess.run(["fluidsynth", "-ni", "-q", "-g", f"{gain:.2f}", "-r", str(sr), "-O", "float",
                    "-T", "wav", "-F", wav, soundfont(), mid], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    x, got_sr = sf.read(wav, dtype="float32", always_2d=True)
    assert got_sr == sr, (got_sr, sr)
    x = x.T
    n = int(round(seconds * sr))
    if x.shape[1] < n:
        x = np.pad(x, ((0, 0), (0, n - x.shape[1])))
    return x[:, :n]


def _pink(rng, shape, sr) -> np.ndarray:
    m = shape[-1]
    spec = np.fft.rfft(rng.standard_normal(shape), axis=-1)
    f = np.fft.rfftfreq(m, 1.0 / sr)
    return np.fft.irfft(spec / np.sqrt(np.maximum(f, 20.0)), n=m, axis=-1)


def _reverb(x: np.ndarray, sr: int, rng) -> np.ndarray:
    rt60 = rng.uniform(0.8, 2.5)
    n = int(rt60 * sr)
    t = np.arange(n) / sr
    out = np.empty_like(x)
    wet = rng.uniform(0.3, 0.6)
    for ch in range(x.shape[0]):
        ir = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
        ir[: int(0.02 * sr)] = 0.0
        ir /= np.sqrt((ir ** 2).sum())
        m = 1 << int(np.ceil(np.log2(x.shape[1] + n)))
        y = np.fft.irfft(np.fft.rfft(x[ch], m) * np.fft.rfft(ir, m), m)[: x.shape[1]]
        out[ch] = x[ch] + wet * y * np.sqrt(np.mean(x[ch] ** 2) / (np.mean(y ** 2) + 1e-20))
    return out


def _mp3_round_trip(x: np.ndarray, sr: int, tmp: str, rng) -> np.ndarray:
    import soundfile as sf

    if shutil.which("lame") is None:
        return x
    wav, mp3, back = (os.path.join(tmp, f) for f in ("in.wav", "c.mp3", "out.wav"))
    sf.write(wav, (x.T / max(1.0, np.abs(x).max())).astype(np.float32), sr, subtype="PCM_16")
    kbps = str(_pick(rng, (96, 128, 192)))
    # --resample keeps the rate: at low bit rates LAME would otherwise pick a lower one.
    subprocess.run(["lame", "--quiet", "-b", kbps, "--resample", f"{sr / 1000:g}", wav, mp3],
                   check=True)
    subprocess.run(["lame", "--quiet", "--decode", mp3, back], check=True)
    y, back_sr = sf.read(back, dtype="float32", always_2d=True)
    if back_sr != sr:
        raise RuntimeError(f"MP3 round trip changed the sample rate ({sr} -> {back_sr})")
    y = y.T
    n = x.shape[1]
    return np.pad(y, ((0, 0), (0, max(0, n - y.shape[1]))))[:, :n]


def _post(x: np.ndarray, song: Song, tmp: str, rng) -> np.ndarray:
    if "reverb" in song.effects:
        x = _reverb(x, song.sample_rate, rng)
    if "noise" in song.effects:
        rms = np.sqrt(np.mean(x ** 2)) + 1e-12
        snr_db = rng.uniform(6, 20)
        noise = _pink(rng, x.shape, song.sample_rate) if rng.random() < 0.6 else \
            rng.standard_normal(x.shape)
        x = x + noise * rms / (np.sqrt(np.mean(noise ** 2)) + 1e-12) * 10 ** (-snr_db / 20)
    x = x * (10 ** (-rng.uniform(1, 6) / 20) / (np.abs(x).max() + 1e-12))
    if "mp3" in song.effects:
        x = _mp3_round_trip(x, song.sample_rate, tmp, rng)
    return x.astype(np.float32)


def _beatless_audio(song: Song, tmp: str, rng) -> np.ndarray:
    sr, n = song.sample_rate, int(round(song.seconds * song.sample_rate))
    t = np.arange(n) / sr
    kind = song.style
    if kind == "sine_pad":
        root = rng.uniform(110, 330)
        x = sum(np.sin(2 * np.pi * root * r * t + rng.uniform(0, 6)) *
                (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.03, 0.2) * t))
                for r in (1, 1.25, 1.5, 2.0)[: int(rng.integers(2, 5))])
        return np.stack([x, np.roll(x, 40)])
    if kind == "white_noise":
        return rng.standard_normal((2, n))
    if kind == "pink_noise":
        return _pink(rng, (2, n), sr)
    if kind == "brown_noise":
        return np.cumsum(rng.standard_normal((2, n)), axis=1) * 0.01 + _pink(rng, (2, n), sr) * 0.1
    if kind == "waves":  # surf: noise swelling at irregular 5-12 s intervals
        env = np.zeros(n)
        pos = 0.0
        while pos < song.seconds:
            length = rng.uniform(5, 12)
            seg = (t >= pos) & (t < pos + length)
            env[seg] += np.sin(np.pi * (t[seg] - pos) / length) ** 2
            pos += length * rng.uniform(0.6, 1.0)
        return _pink(rng, (2, n), sr) * (0.2 + env)
    if kind == "rain":  # many drops at random (Poisson) times over a noise bed
        x = _pink(rng, (2, n), sr) * 0.3
        x /= np.abs(x).max()
        for _ in range(int(song.seconds * rng.uniform(10, 80))):
            i = int(rng.integers(0, n - 400))
            drop = rng.standard_normal(400) * np.exp(-np.arange(400) / rng.uniform(20, 80))
            x[int(rng.integers(0, 2)), i:i + 400] += rng.uniform(0.2, 1.0) * drop
        return x
    if kind == "vinyl_room":
        x = _pink(rng, (2, n), sr) * 0.05 + rng.standard_normal((2, n)) * 0.01
        for _ in range(int(song.seconds * rng.uniform(2, 15))):
            i = int(rng.integers(0, n - 50))
            x[:, i:i + 50] += rng.uniform(0.05, 0.4) * rng.standard_normal(50)
        return x
    if kind == "glide":  # a slowly gliding tone with vibrato
        f = rng.uniform(200, 500) * np.exp(np.cumsum(rng.standard_normal(n)) * 2e-5)
        f *= 1 + 0.01 * np.sin(2 * np.pi * rng.uniform(4, 6) * t)
        x = np.sin(2 * np.pi * np.cumsum(f) / sr) + 0.3 * np.sin(4 * np.pi * np.cumsum(f) / sr)
        return np.stack([x, x])
    if kind == "drone_wind":
        x = sum(np.sin(2 * np.pi * f0 * t) for f0 in (rng.uniform(50, 80) * k for k in (1, 1.5, 2)))
        wind = _pink(rng, (2, n), sr)
        env = 1 + 0.8 * np.sin(2 * np.pi * rng.uniform(0.05, 0.15) * t + rng.uniform(0, 6))
        return 0.2 * x[None] / 3 + wind * env / (np.abs(wind).max() + 1e-9)
    # Sound-font beatless material: a held chord, slow pads changing at irregular times,
    # wind chimes struck at random (Poisson) times.
    key = int(rng.integers(0, 12))
    notes = []
    channels = {}
    if kind == "held_chord":
        prog = _pick(rng, (48, 49, 52, 19, 89, 91, 16, 21))
        channels[0] = dict(program=prog, volume=110, reverb=60)
        for iv in _pick(rng, ((0, 4, 7, 12), (0, 3, 7, 10), (0, 7, 12, 16))):
            notes.append((0.0, song.seconds + 1, 0, 48 + key + iv, 80))
    elif kind == "slow_pads":
        prog = _pick(rng, (49, 89, 91, 94, 95, 92, 88))
        channels[0] = dict(program=prog, volume=110, reverb=80)
        pos = 0.0
        while pos < song.seconds:
            length = rng.uniform(4.0, 9.0)
            root = key + _pick(rng, (0, 5, 7, 9, 2))
            for iv in (0, 4, 7) if rng.random() < 0.5 else (0, 3, 7):
                notes.append((pos, length + 1.5, 0, 48 + root % 12 + iv, 75))
            pos += length
    else:  # wind_chimes
        prog = _pick(rng, (8, 9, 10, 11, 14, 112))
        channels[0] = dict(program=prog, volume=100, reverb=90)
        rate = rng.uniform(0.7, 3.0)
        pos = rng.exponential(1 / rate)
        while pos < song.seconds:
            notes.append((pos, 2.5, 0, 72 + key + _pick(rng, (0, 2, 4, 7, 9, 12, 14, 16)),
                          int(rng.integers(40, 110))))
            pos += rng.exponential(1 / rate)
    return _fluidsynth(notes, channels, song.seconds, sr, tmp, 0.5).astype(np.float64)


def render(song: Song, cache_dir: str = DEFAULT_CACHE):
    """(waveform float32 [2, N], sample_rate) of a song; rendered once, then cached."""
    import soundfile as sf
    import torch

    path = os.path.join(cache_dir, f"{song.name}_{song.key()}.flac")
    if os.path.exists(path):
        x, sr = sf.read(path, dtype="float32", always_2d=True)
        return torch.from_numpy(np.ascontiguousarray(x.T)), sr
    problem = check_tools()
    if problem:
        raise FluidSynthMissing(problem)
    os.makedirs(cache_dir, exist_ok=True)
    rng = np.random.default_rng([song.seed, 2])
    with tempfile.TemporaryDirectory() as tmp:
        if song.beatless:
            x = _beatless_audio(song, tmp, rng)
        else:
            a = arrange(song)
            x = _fluidsynth(a.notes, a.channels, song.seconds, song.sample_rate, tmp, 0.4)
        x = _post(x.astype(np.float64), song, tmp, rng)
    sf.write(path + ".part.flac", x.T, song.sample_rate, subtype="PCM_24")
    os.replace(path + ".part.flac", path)
    return torch.from_numpy(np.ascontiguousarray(x)), song.sample_rate


def true_bpm(song: Song) -> float | None:
    """The ground truth (None for beatless audio)."""
    return None if song.beatless else arrange(song).true_bpm()
