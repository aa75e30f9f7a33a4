"""Tempo (BPM) estimation for music clips, in plain PyTorch (no ComfyUI, no librosa).

``estimate_tempo(waveform, sample_rate)`` returns a ``TempoEstimate``: the tempo in BPM (or
``None`` = unknown), a confidence in [0, 1] that the clip has a steady beat at all, the
reason when it is unknown, and the runner-up metrical levels.  ``detect_bpm`` wraps it and
returns the tempo as a float, raising ``ValueError`` with a musician-facing message when the
tempo is unknown (too short, silent, no onsets, or no steady beat) so the caller can ask for
the tempo instead.

Method
------
1. Onset strength.  Mono mix of (at most) the middle ``MAX_SECONDS``, box-filter decimated
   to 16-24 kHz, 1024-point STFT with a ~10 ms hop, 64 mel bands, compression
   ``log1p(10 * power / band mean)``, half-wave-rectified spectral flux averaged in four
   regions - kick/bass < 200 Hz, low-mid, 1-5 kHz ("snare"), > 5 kHz ("hats") - each
   normalised to unit variance.  A chroma (pitch-class) vector every 50 ms gives a
   harmonic-change curve (where the chords change).
2. Periodicity.  FFT autocorrelations of the summed onset curve, of each region and of the
   harmonic-change curve, and the kick-to-snare cross-correlation.  The salience of a tempo
   is a comb ``sum_k AC(k * beat) / sqrt(k)`` over beat multiples up to 4 s.
3. Candidates.  The three most salient tempi and their metrical relatives (x2, /2, x3, /3,
   x3/2, x2/3, x4, /4) inside ``[min_bpm, max_bpm]``, each moved to the salience peak
   within +-2 %.
4. Octave decision.  Every candidate is described by the cues musicians use - where the
   backbeat falls (kick-to-snare one and two beats apart, snare once per beat / per two /
   per four beats), the kick-and-bass and hi-hat periodicities at 1/2, 1, 2 and 4 beats,
   the harmonic rhythm (chord changes every 1, 2, 4 or 8 beats), the density of onsets
   per beat - plus its comb salience and its tempo.  A linear score over these cues picks
   the candidate.  Its weights, including the tempo prior (terms in log-tempo, also
   crossed with song-level descriptors such as onset rate and how drum-like the clip is,
   i.e. a prior per style family), were *learned* on a tuning set by
   ``bench/bpm_tune.py`` (softmax ranking, L2-regularised) - they are not hand-set.
5. Refinement.  +-2.5 % search on a 0.02 % grid maximising the mean raw autocorrelation
   over all beat multiples up to half the clip, then parabolic interpolation.
6. Confidence.  How clearly a steady pulse stands out: the comb of the autocorrelation of
   the (detrended) onset curve at the best tempo, compared with what random onsets of the
   same clip length give.  Below ``CONFIDENCE_THRESHOLD`` the tempo is "unknown": pads,
   drones, noise, rain and wind chimes have onsets but no steady beat.

Ground truth and measured accuracy
----------------------------------
The tempo is the notated beat a musician would count; for half-time styles the convention
the genre itself states (trap 130-165 with the snare on 3, drum and bass 164-178 with the
snare on 2 and 4, reggae one-drop 64-86, swing/shuffle the quarter note, 12/8 ballads the
dotted quarter) - written out in bench/realistic_music.py.  On its held-out report set
(120 FluidSynth-rendered clips, 22 styles; ``python bench/bpm_accuracy.py --realistic``):
95.8 % within +-2 %, 99.2 % within +-2 % of the tempo or its half/double/third/triple, no
music called unknown, 48/48 beatless clips unknown, ~36 ms per clip on one CPU thread.
Synthetic clips (tests/synthetic_music.py, seed 0): 98 %.  Details: bench/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
import torchaudio.functional as AF

__all__ = ["TempoEstimate", "estimate_tempo", "detect_bpm", "MIN_SECONDS",
           "MAX_SECONDS", "CONFIDENCE_THRESHOLD"]

MIN_SECONDS = 4.0  # shorter clips hold too few beats for a reliable estimate
MAX_SECONDS = 24.0  # longer clips: only the middle MAX_SECONDS are analysed (bounded time)
_FPS = 100.0  # onset-curve frame rate (Hz): a 10 ms hop
_JITTER_S = 0.02  # autocorrelations are max-pooled over +-20 ms (timing jitter, swing)
_N_FFT = 1024  # onset analysis: ~46 ms windows at 16-24 kHz
_N_MELS = 64
_CHROMA_N_FFT = 1024  # pitch analysis: ~0.2 s windows at a quarter of the rate (~5 Hz bins)
_FMIN = 30.0
_REGIONS = (30.0, 200.0, 1000.0, 5000.0, 11000.0)  # kick/bass, low-mid, snare, hats
_KICK, _SNARE = 0, 2  # rows of the region onset envelope (kick/bass, low-mid, snare, hats)
_MIN_FLUX = 3e-3  # mean onset strength below which a clip counts as having no onsets
_CHROMA_HOP_S = 0.05
_CHROMA_BAND = (130.0, 2000.0)
_COMB_MAX_LAG_S = 4.0
_FAMILY = (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0, 1.5, 2.0 / 3.0, 4.0, 0.25)
_N_SEEDS = 3  # salience peaks whose metrical relatives are candidates


@dataclasses.dataclass(frozen=True)
class TempoEstimate:
    """Result of ``estimate_tempo``.

    bpm: the tempo in BPM (rounded to 0.1), or None when unknown.
    confidence: 0-1, how clearly the clip has a steady beat (``CONFIDENCE_THRESHOLD`` and
        above: the tempo is reported).
    reason: why the tempo is unknown (musician-facing), else None.
    alternatives: other metrical levels worth offering, as (bpm, share) with the share of
        the octave decision each got (the chosen tempo's share is ``share``).
    """
    bpm: float | None
    confidence: float
    reason: str | None = None
    share: float = 0.0
    alternatives: tuple = ()


# ----------------------------------------------------------------------------- learned
# Everything between BEGIN/END LEARNED is written by bench/bpm_tune.py from the tuning set.
CONFIDENCE_THRESHOLD = 0.5  # confidence below this: "unknown" (see confidence_from_clarity)

# BEGIN LEARNED
# bench/bpm_tune.py: 540 labelled tuning clips (realistic tune set 240, synthetic seeds [10, 11, 12])
# L2 0.003, 5-fold CV octave accuracy 98.5 %
# confidence from 540 music and 48 beatless tuning clips
FEATURES = (
    'salience',
    'log_tempo',
    'log_tempo_sq',
    'log_tempo_x_onset_rate',
    'log_tempo_x_drums',
    'backbeat_0.5',
    'backbeat_1',
    'backbeat_2',
    'harm_1',
    'harm_2',
    'harm_4',
    'harm_8',
    'all_1/4',
    'all_1/3',
    'all_1/2',
    'all_2/3',
    'all_1',
    'all_3/2',
    'all_3',
    'kick_1/4',
    'kick_1/2',
    'kick_1',
    'kick_2',
    'kick_4',
    'lowmid_1/4',
    'lowmid_1/2',
    'lowmid_1',
    'lowmid_2',
    'lowmid_4',
    'snare_1/4',
    'snare_1/2',
    'snare_1',
    'snare_2',
    'snare_4',
    'hats_1/4',
    'hats_1/2',
    'hats_1',
    'hats_2',
    'hats_4',
    'log_tempo_x_backbeat_0.5',
    'log_tempo_x_backbeat_1',
    'log_tempo_x_backbeat_2',
    'log_tempo_x_kick_1/2',
    'log_tempo_x_kick_1',
    'log_tempo_x_snare_1',
    'log_tempo_x_snare_2',
    'log_tempo_x_snare_4',
    'log_tempo_x_hats_1/2',
    'log_tempo_x_hats_1/4',
    'log_tempo_x_all_1/3',
    'log_tempo_x_all_1/4',
    'log_tempo_x_harm_4',
    'log_tempo_x_harm_2',
)
_FEATURE_MEAN = (
    -0.342834, 0.124731, 0.272356, 0.270385, 0.0501632, 0.0640407, 0.129139, 0.176569,
    -0.00467008, 0.022161, 0.0914709, 0.131885, 0.0150578, 0.0371633, 0.0854238, 0.144867,
    0.197129, 0.219061, 0.318382, -0.00764932, 0.0290634, 0.0939731, 0.174256, 0.213801,
    -0.0156644, 0.0422308, 0.125497, 0.213253, 0.248432, 0.000852382, 0.0525162, 0.138172,
    0.236083, 0.272634, 0.0232555, 0.0702544, 0.155576, 0.247474, 0.274299, -0.0142749,
    0.000871571, 0.0136988, -0.0146918, -0.00596737, -0.00926366, 0.00630215, 0.0258457,
    -0.0163917, -0.0157638, -0.0083731, -0.0245019, -0.00522845, -0.019107,
)
_FEATURE_SCALE = (
    1.09281, 0.506753, 0.270488, 1.14603, 0.385971, 0.151973, 0.192738, 0.184361, 0.13301,
    0.186419, 0.226125, 0.230379, 0.156086, 0.177333, 0.22253, 0.239108, 0.282499, 0.288523,
    0.269528, 0.0813517, 0.13323, 0.185504, 0.22704, 0.236841, 0.0907077, 0.157696, 0.221741,
    0.248781, 0.243421, 0.112597, 0.164016, 0.229679, 0.257848, 0.250617, 0.162803, 0.205019,
    0.260211, 0.277003, 0.255819, 0.0797861, 0.111607, 0.134804, 0.0674638, 0.103407, 0.133186,
    0.173461, 0.18941, 0.105701, 0.0833715, 0.0793198, 0.0773111, 0.123212, 0.0906638,
)
_WEIGHTS = (
    0.913363, -0.830348, 0.0887562, 0.290193, -0.581755, 0.568683, 1.39362, -0.241152,
    -0.00719182, -0.365883, 0.325487, 0.334885, -0.164773, -0.0974051, -0.090817, -0.488096,
    0.742635, -0.623916, 0.179542, 0.00722856, 0.244266, -0.150621, -0.2759, 1.08469, 0.260631,
    -0.245659, 0.459283, 0.49632, 0.52757, 0.485943, 0.391467, 0.357986, 0.434473, 0.293083,
    0.659602, -0.0353947, -0.156094, 0.742306, -0.202988, 0.715503, -0.0747368, -0.319745,
    -0.170111, 0.522882, 0.144086, 0.656842, 0.741495, 0.266597, 0.415306, 0.660948, 0.627591,
    -0.270935, -0.240808,
)
_CONFIDENCE_CENTRE = 0.441312
_CONFIDENCE_SLOPE = 1.89404
# END LEARNED


# ----------------------------------------------------------------------------- front end


def _analysis_rate(sr: int) -> tuple[int, int]:
    """(decimation factor, rate): a rate in 16-24 kHz reachable by an integer factor."""
    for k in (1, 2, 3, 4, 5, 6):
        if sr % k == 0 and 16000 <= sr // k <= 24000:
            return k, sr // k
    return 0, 22050  # no integer factor: resample


@functools.lru_cache(maxsize=8)
def _mel_matrix(n_freqs: int, sr: int, fmax: float) -> torch.Tensor:
    fb = AF.melscale_fbanks(n_freqs, _FMIN, fmax, _N_MELS, sr, norm=None, mel_scale="htk")
    return fb.contiguous()  # [F, M]


@functools.lru_cache(maxsize=8)
def _region_matrix(fmax: float) -> torch.Tensor:
    """[M, R] averaging matrix from mel bands to the frequency regions."""
    to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    mels = torch.linspace(to_mel(_FMIN), to_mel(fmax), _N_MELS + 2)[1:-1]
    centres = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    cols = []
    for lo, hi in zip(_REGIONS[:-1], _REGIONS[1:]):
        sel = ((centres >= lo) & (centres < hi)).float()
        cols.append(sel / sel.sum().clamp_min(1.0))  # empty above Nyquist at low rates
    return torch.stack(cols, 1)


@functools.lru_cache(maxsize=8)
def _chroma_matrix(n_freqs: int, sr: int) -> torch.Tensor:
    """[F, 12] soft assignment of STFT bins to pitch classes (0.5-semitone Gaussian)."""
    freqs = torch.linspace(0, sr / 2.0, n_freqs, dtype=torch.float64)
    use = (freqs >= _CHROMA_BAND[0]) & (freqs <= _CHROMA_BAND[1])
    pitch = 12.0 * torch.log2(freqs.clamp_min(1.0) / 440.0) + 69.0
    d = (pitch[:, None] - torch.arange(12, dtype=torch.float64)[None]) % 12.0
    d = torch.minimum(d, 12.0 - d)
    w = torch.exp(-0.5 * (d / 0.5) ** 2) * use[:, None]
    return w.float().contiguous()


_HANN = {}


def _window(n: int) -> torch.Tensor:
    if n not in _HANN:
        _HANN[n] = torch.hann_window(n)
    return _HANN[n]


def _halve(x: torch.Tensor) -> torch.Tensor:
    """Half the sample rate by averaging sample pairs (for the pitch analysis)."""
    n = x.shape[0] // 2 * 2
    return (x[0:n:2] + x[1:n:2]) * 0.5


def _power_frames(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """Power spectrogram [T, n_fft // 2 + 1], Hann windows (frame t starts at t * hop: a
    constant offset does not matter for periodicities)."""
    if x.shape[0] < n_fft:
        x = F.pad(x, (0, n_fft - x.shape[0]))
    spec = torch.fft.rfft(x.unfold(0, n_fft, hop) * _window(n_fft))
    return torch.addcmul(spec.real.square(), spec.imag, spec.imag)


def _spectra(x: torch.Tensor, rate: int) -> dict:
    """Onset spectrogram (~_FPS frames/s) and pitch spectrogram (one frame per 50 ms) of
    the mono signal at the analysis rate."""
    hop = max(1, round(rate / _FPS))
    low = _halve(_halve(x))  # pitches below 2 kHz need no more than 4-6 kHz
    low_rate = rate // 4
    low_hop = round(low_rate * _CHROMA_HOP_S)
    return dict(power=_power_frames(x, _N_FFT, hop), rate=rate, fps=rate / hop,
                pitch=_power_frames(low, _CHROMA_N_FFT, low_hop), pitch_rate=low_rate,
                pitch_fps=low_rate / low_hop)


def _onset_flux(power: torch.Tensor, rate: int) -> torch.Tensor:
    """Raw regional spectral flux [4, T - 1] from a power spectrogram [T, F]."""
    fmax = min(11000.0, rate / 2.0)
    mel = power @ _mel_matrix(power.shape[1], rate, fmax)  # [T, M]
    # Compression relative to each band's mean level, so quiet bands (cymbals) count as much
    # as loud ones; bands more than 60 dB below the loudest band are treated as empty
    # rather than having their leakage / rounding noise amplified.
    band = mel.mean(0, keepdim=True)
    ref = band.clamp_min(float(band.max()) * 1e-6 + 1e-20)
    # 30 ms smoothing: fast beating between held partials must not become "onsets" (its
    # rectified harmonics alias into tempo-like periodicities at 100 frames/s).
    smooth = mel.clone()
    smooth[1:-1] += mel[:-2] + mel[2:]
    smooth[1:-1] *= 1.0 / 3.0
    # Each band is compared with the loudest of itself and its two neighbours one frame
    # earlier, so energy sliding between bands (vibrato, glides) is no onset; a note or hit
    # raises energy where its neighbours were quiet too.
    prev = smooth[:-1].clone()
    prev[:, 1:] = torch.maximum(prev[:, 1:], smooth[:-1, :-1])
    prev[:, :-1] = torch.maximum(prev[:, :-1], smooth[:-1, 1:])
    scale = 10.0 / ref
    flux = (torch.log1p(smooth[1:] * scale) - torch.log1p(prev * scale)).clamp_min(0.0)
    return (flux @ _region_matrix(fmax)).T.contiguous()


# ----------------------------------------------------------------------------- helpers


def _autocorr(x: torch.Tensor) -> torch.Tensor:
    """Autocorrelation of each row (mean removed), normalised to 1 at lag 0."""
    x = x - x.mean(-1, keepdim=True)
    n = x.shape[-1]
    size = 1 << int(math.ceil(math.log2(2 * n)))
    ac = torch.fft.irfft(torch.fft.rfft(x, size).abs().pow(2), size)[..., :n]
    return ac / ac[..., :1].clamp_min(1e-12)


def _xcorr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalised cross-correlation r[k] = sum a[t] b[t+k], k = -(n-1)..(n-1), centred at n-1."""
    a = a - a.mean()
    b = b - b.mean()
    n = a.shape[-1]
    m = 1 << int(math.ceil(math.log2(2 * n)))
    r = torch.fft.irfft(torch.fft.rfft(a, m).conj() * torch.fft.rfft(b, m), m)
    r = torch.cat([r[m - n + 1:], r[:n]])
    return r / (a.norm() * b.norm() + 1e-12)


def _moving_average(x: torch.Tensor, k: int) -> torch.Tensor:
    """Centred moving average over k (odd) frames of each row, edges replicated."""
    padded = F.pad(x[:, None], (k // 2, k // 2), mode="replicate")[:, 0]
    c = F.pad(padded.cumsum(1), (1, 0))
    return (c[:, k:] - c[:, :-k]) / k


def _pool(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Max over +-radius frames (tolerance to timing jitter and swing)."""
    shape = x.shape
    y = F.max_pool1d(x.reshape(-1, 1, shape[-1]), 2 * radius + 1, 1, radius)
    return y.reshape(shape)


def _interp(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of 1-D signal(s) [..., n] at fractional positions (clamped)."""
    pos = pos.clamp(0, x.shape[-1] - 1.001)
    lo = pos.floor().long()
    fr = pos - lo
    return x[..., lo] * (1 - fr) + x[..., lo + 1] * fr


def _check(waveform, sample_rate) -> torch.Tensor:
    """Validate the input; returns it as [channels, samples] float32 (CPU) of at most
    MAX_SECONDS (the middle part of longer clips)."""
    if not isinstance(waveform, torch.Tensor):
        waveform = torch.as_tensor(waveform)
    if waveform.dim() not in (1, 2) or waveform.numel() == 0:
        raise ValueError(f"detect_bpm: expected a waveform of shape [channels, samples] or "
                         f"[samples], got shape {tuple(waveform.shape)}")
    if waveform.dim() == 2 and waveform.shape[0] > 16 and waveform.shape[1] <= 16:
        raise ValueError(f"detect_bpm: waveform shape {tuple(waveform.shape)} looks like "
                         f"[samples, channels]; pass it as [channels, samples] (waveform.T)")
    if not sample_rate or sample_rate <= 0:
        raise ValueError(f"detect_bpm: sample_rate must be positive, got {sample_rate!r}")
    x = waveform.detach()
    x = x[None] if x.dim() == 1 else x
    # Long files: the middle MAX_SECONDS are plenty and keep time/memory bounded.
    max_n = int(MAX_SECONDS * sample_rate)
    if x.shape[-1] > max_n:
        off = (x.shape[-1] - max_n) // 2
        x = x[:, off:off + max_n]
    return x.to("cpu", torch.float32)


def _mix_down(x: torch.Tensor, sample_rate: int) -> tuple[torch.Tensor, int]:
    """Mono signal at the analysis rate and that rate: the channels and k neighbouring
    samples are averaged in one pass (box-filter decimation: cheap, and its aliasing - high
    hats folding into the 5-11 kHz region - does not matter for onset timing)."""
    k, rate = _analysis_rate(int(sample_rate))
    if k == 0:
        mono = AF.resample(x.mean(0), int(sample_rate), rate)
    else:
        total = x[0] if x.shape[0] == 1 else x.sum(0)
        n = total.shape[0] // k * k
        mono = total[0:n:k] if k == 1 else total[0:n:k] + total[1:n:k]
        for i in range(2, k):
            mono += total[i:n:k]
        mono = mono * (1.0 / (x.shape[0] * k))
    # A NaN/inf anywhere makes the sum non-finite: cheaper than testing each sample.
    if not math.isfinite(float(mono.sum())):
        raise ValueError("detect_bpm: the audio contains NaN or infinite samples; fix the "
                         "file/decoder or enter the BPM manually")
    return mono, rate


class _Unknown(Exception):
    """Internal: the clip has no measurable tempo (message is musician-facing)."""


def _prepare(waveform, sample_rate) -> tuple[torch.Tensor, int]:
    """Validated mono signal at the analysis rate; raises ValueError (invalid input) or
    _Unknown (too short, silent)."""
    x = _check(waveform, sample_rate)
    mono, rate = _mix_down(x, sample_rate)
    seconds = x.shape[1] / float(sample_rate)
    if seconds < MIN_SECONDS:
        raise _Unknown(f"the audio is too short to measure its tempo ({seconds:.2f} s < "
                       f"{MIN_SECONDS:g} s); use a longer clip or enter the BPM manually")
    lo, hi = torch.aminmax(mono)
    if max(-float(lo), float(hi)) < 1e-5:
        raise _Unknown("the audio is silent (peak below -100 dBFS), so there is no tempo to "
                       "measure; check the file or enter the BPM manually")
    return mono, rate


# ----------------------------------------------------------------------------- analysis


def _analyse(mono: torch.Tensor, rate: int) -> dict:
    """Everything the decision needs (autocorrelations, cross-correlation, song descriptors)
    from the mono signal at the analysis rate."""
    sp = _spectra(mono, rate)
    fps = sp["fps"]
    raw = _onset_flux(sp["power"], sp["rate"])
    chroma = (sp["pitch"] @ _chroma_matrix(sp["pitch"].shape[1], sp["pitch_rate"])).T
    # A steady tone, a sine pad or a gliding tone (or a file that is silent apart from a
    # click) has essentially no flux once the edges are ignored (< 2e-3); music 0.01-0.1.
    if raw.shape[1] < 20 or float(raw[:, 5:-5].mean()) < _MIN_FLUX:
        raise _Unknown("the audio has no rhythmic onsets (a steady tone?), so there is no "
                       "tempo to measure; enter the BPM manually")
    # Each region to unit variance, so quiet cymbals count as much as a loud kick - but a
    # region with next to no onsets (no cymbals at all, a tone's leakage) is not blown up
    # into a full-strength curve of rounding noise.
    spread = raw.std(1, keepdim=True)
    regions = raw / spread.clamp_min(0.05 * float(spread.max()) + 1e-8)
    env = regions.sum(0)
    n = env.shape[0]
    ac = _autocorr(torch.cat([env[None], regions]))  # [5, n]: total, then the regions
    jitter = max(1, round(_JITTER_S * fps))  # frames
    acp = _pool(ac, jitter)
    xcp = _pool(_xcorr(regions[_KICK], regions[_SNARE]), jitter)
    # Harmonic change: cosine distance between the mean chroma of the 0.3 s before and
    # after each 50 ms frame; chord changes stand out, a held chord or a drum hit does not.
    c = torch.log1p(100.0 * chroma / chroma.mean().clamp_min(1e-20))
    c = c / (c.norm(dim=0, keepdim=True) + 1e-6)
    w = 6
    cs = F.pad(c.cumsum(1), (1, 0))
    before = cs[:, w:-w] - cs[:, :-2 * w]
    after = cs[:, 2 * w:] - cs[:, w:-w]
    cos = (before * after).sum(0) / (before.norm(dim=0) * after.norm(dim=0) + 1e-9)
    harm = F.pad(1.0 - cos, (w, w))
    hfps = sp["pitch_fps"]
    hac = _pool(_autocorr(harm[None])[0], 1) if harm.shape[0] > 8 else torch.zeros(8)
    # Detrended onset curve (1 s moving average removed): slow swells (waves, pad fades)
    # must not look like periodicity to the confidence measure.
    curves = torch.cat([env[None], regions])
    acd = _pool(_autocorr(curves - _moving_average(curves, int(fps) | 1)), jitter)  # [5, n]
    # Song-level descriptors: onsets per second (local maxima clearly above the median) and
    # how drum-like the clip is (onset strength above 1 kHz relative to below).
    local_max = env == _pool(env, max(1, round(0.03 * fps)))
    peaks = local_max & (env > env.median() + 0.5 * env.std())
    onset_rate = float(peaks.sum()) / (n / fps)
    drums = float(raw[_SNARE:].mean() / (raw[:_SNARE].mean() + 1e-9))
    return dict(ac=ac[0], acp=acp, xcp=xcp, hac=hac, hfps=hfps, acd=acd, fps=fps, n=n,
                onset_rate=onset_rate, drums=drums)


def _comb(acp: torch.Tensor, fps: float, bpms: torch.Tensor, n: int) -> torch.Tensor:
    """Comb salience sum_k AC(k L)/sqrt(k) over beat multiples up to _COMB_MAX_LAG_S."""
    lags = 60.0 * fps / bpms
    max_lag = min(_COMB_MAX_LAG_S * fps, n - 2)
    k = torch.arange(1, max(2, int(max_lag / float(lags.min())) + 1), dtype=torch.float32)
    pos = lags[:, None] * k[None]
    use = (pos <= max_lag) | (k[None] == 1)
    return ((_interp(acp, pos.flatten()).view(pos.shape) * use) / k.sqrt()).sum(1)


def _grid(lo: float, hi: float, step: float = 0.001) -> torch.Tensor:
    return torch.exp(torch.arange(math.log(lo), math.log(hi) + 1e-9, step,
                                  dtype=torch.float64)).float()


def _candidates(an: dict, min_bpm: float, max_bpm: float) -> list[float]:
    """Salience peaks and their metrical relatives inside the range (snapped to peaks)."""
    grid = _grid(min_bpm, max_bpm)
    sal = _comb(an["acp"][0], an["fps"], grid, an["n"])
    score = torch.log(sal.clamp_min(1e-3))
    # Seeds: the most salient local maxima, at least 3 % apart (a flat top counts once).
    is_peak = (score >= _pool(score, 20)) & (sal > 0)
    order = torch.nonzero(is_peak).flatten()
    seeds: list[int] = []
    for j in order[score[order].argsort(descending=True)].tolist():
        if all(abs(float(grid[j] / grid[i]) - 1.0) > 0.03 for i in seeds):
            seeds.append(j)
        if len(seeds) == _N_SEEDS:
            break
    out: list[float] = []
    for j in seeds or [int(score.argmax())]:
        for ratio in _FAMILY:
            t = float(grid[j]) * ratio
            if not (min_bpm <= t <= max_bpm):
                continue
            near = torch.nonzero((grid >= t / 1.02) & (grid <= t * 1.02)).flatten()
            if near.numel() == 0:
                continue
            t = float(grid[near[score[near].argmax()]])
            if all(abs(t / o - 1.0) > 0.03 for o in out):
                out.append(t)
    return out


_REGION_NAMES = ("kick", "lowmid", "snare", "hats")
_ALL_MULTS = (0.25, 1 / 3, 0.5, 2 / 3, 1.0, 1.5, 3.0)  # beat fractions for the total curve
_REGION_MULTS = (0.25, 0.5, 1.0, 2.0, 4.0)  # and for each region
# Cues whose weight may depend on the tempo (a prior per rhythmic family: e.g. a snare once
# per bar is common at 130-160 BPM, rare at 180).
_TEMPO_CROSSED = ("backbeat_0.5", "backbeat_1", "backbeat_2", "kick_1/2", "kick_1", "snare_1",
                  "snare_2", "snare_4", "hats_1/2", "hats_1/4", "all_1/3", "all_1/4", "harm_4",
                  "harm_2")
_HARM_MULTS = (1.0, 2.0, 4.0, 8.0)


def _cues(an: dict, bpms: list[float]) -> dict:
    """Cue values of each candidate tempo, by name: {name: tensor [len(bpms)]}."""
    fps, n = an["fps"], an["n"]
    b = torch.tensor(bpms, dtype=torch.float32)
    lag = 60.0 * fps / b  # frames per beat
    acp, xcp, hac = an["acp"], an["xcp"], an["hac"]
    u = torch.log2(b / 100.0)
    cues = {
        "salience": torch.log(_comb(acp[0], fps, b, n).clamp_min(1e-3)),
        "log_tempo": u,
        "log_tempo_sq": u * u,
        "log_tempo_x_onset_rate": u * math.log2(max(an["onset_rate"], 0.25)),
        "log_tempo_x_drums": u * math.log2(max(an["drums"], 1e-3)),
    }
    # Kick -> snare and snare -> kick half, one and two beats apart (where the backbeat falls).
    for mult in (0.5, 1.0, 2.0):
        both = _interp(xcp, torch.cat([n - 1 + lag * mult, n - 1 - lag * mult]))
        cues[f"backbeat_{mult:g}"] = 0.5 * (both[: len(bpms)] + both[len(bpms):])
    # Harmonic rhythm: chord changes every 1, 2, 4, 8 beats.
    hlag = 60.0 * an["hfps"] / b
    h = _interp(hac, (hlag[None] * torch.tensor(_HARM_MULTS)[:, None]).flatten())
    for i, mult in enumerate(_HARM_MULTS):
        cues[f"harm_{mult:g}"] = h[i * len(bpms):(i + 1) * len(bpms)]
    # Periodicity of all onsets at beat fractions and multiples, and of each region.
    allm = _interp(acp[0], (lag[None] * torch.tensor(_ALL_MULTS)[:, None]).flatten())
    for i, name in enumerate(("1/4", "1/3", "1/2", "2/3", "1", "3/2", "3")):
        cues[f"all_{name}"] = allm[i * len(bpms):(i + 1) * len(bpms)]
    regm = _interp(acp[1:], (lag[None] * torch.tensor(_REGION_MULTS)[:, None]).flatten())
    for r, region in enumerate(_REGION_NAMES):
        for i, name in enumerate(("1/4", "1/2", "1", "2", "4")):
            cues[f"{region}_{name}"] = regm[r, i * len(bpms):(i + 1) * len(bpms)]
    for name in _TEMPO_CROSSED:
        cues[f"log_tempo_x_{name}"] = u * cues[name]
    return cues


def all_cue_names() -> tuple:
    """Every cue ``_cues`` computes (the learned model uses the subset ``FEATURES``)."""
    dummy = dict(fps=100.0, n=1000, acp=torch.zeros(5, 1000), xcp=torch.zeros(1999),
                 hac=torch.zeros(200), hfps=20.0, onset_rate=1.0, drums=1.0)
    return tuple(_cues(dummy, [100.0]))


def _candidate_features(an: dict, bpms: list[float], names=None) -> torch.Tensor:
    """[len(bpms), len(names)] cue matrix; names default to the learned ``FEATURES``."""
    cues = _cues(an, bpms)
    return torch.stack([cues[k] for k in (names or FEATURES or tuple(cues))], 1)


def _pick(an: dict, bpms: list[float]):
    """(index of the chosen candidate, softmax shares of all candidates): the learned
    linear score over the standardised cues."""
    if not _WEIGHTS:  # untrained (only while bench/bpm_tune.py bootstraps): salience alone
        s = _cues(an, bpms)["salience"]
    else:
        f = _candidate_features(an, bpms)
        mu = torch.tensor(_FEATURE_MEAN, dtype=torch.float32)
        sd = torch.tensor(_FEATURE_SCALE, dtype=torch.float32)
        s = ((f - mu) / sd) @ torch.tensor(_WEIGHTS, dtype=torch.float32)
    p = torch.softmax(s, 0)
    return int(p.argmax()), p


def _clarity(an: dict, min_bpm: float, max_bpm: float) -> float:
    """Pulse clarity: the best comb mean of the detrended autocorrelation over the tempo
    range, above its median over all lags of 0.25-4 s (fast beating between held partials
    lifts every lag alike and must not count), in units of the spread random onsets give
    (which shrinks as 1/sqrt(seconds))."""
    fps, n, acd = an["fps"], an["n"], an["acd"][0]
    grid = _grid(min_bpm, max_bpm, 0.002)
    lags = 60.0 * fps / grid
    k = torch.arange(1, 9, dtype=torch.float32)
    pos = lags[:, None] * k[None]
    max_lag = min(_COMB_MAX_LAG_S * fps, n - 2)
    use = (pos <= max_lag) | (k[None] <= 2)
    vals = (_interp(acd, pos.flatten()).view(pos.shape) * use).sum(1) / use.sum(1)
    floor = float(acd[int(0.25 * fps):int(max_lag)].median())
    return (float(vals.max()) - floor) * math.sqrt(n / fps)


def confidence_from_clarity(clarity: float, centre: float | None = None,
                            slope: float | None = None) -> float:
    """Confidence 0-1 that a clip with this pulse clarity has a steady beat: a logistic in
    log clarity, 0.5 (= ``CONFIDENCE_THRESHOLD``) at the clarity that separates beatless
    audio from music on the tuning set (bench/bpm_tune.py)."""
    centre = _CONFIDENCE_CENTRE if centre is None else centre
    slope = _CONFIDENCE_SLOPE if slope is None else slope
    if clarity <= 0.0:
        return 0.0
    return 1.0 / (1.0 + (centre / clarity) ** slope)


def _refine(ac: torch.Tensor, fps: float, bpm: float, lo: float, hi: float) -> float:
    """Fine tempo: mean of the raw autocorrelation over all beat multiples up to half the
    clip (long lags pin the period down), +-2.5 % search on a 0.02 % grid, then parabolic
    interpolation."""
    n = ac.shape[0]
    step = 0.0002
    cand = bpm * torch.exp(torch.arange(-0.025, 0.025 + 1e-9, step, dtype=torch.float64)).float()
    lags = 60.0 * fps / cand
    max_lag = n * 0.5
    k = torch.arange(1, int(max_lag / lags.min().item()) + 2, dtype=torch.float32)
    pos = lags[:, None] * k[None]
    use = pos <= max_lag
    use[:, 0] = True
    score = (_interp(ac, pos.flatten()).view(pos.shape) * use).sum(1) / use.sum(1)
    i = int(score.argmax())
    t = float(cand[i])
    if 0 < i < len(cand) - 1:
        y0, y1, y2 = float(score[i - 1]), float(score[i]), float(score[i + 1])
        den = y0 - 2 * y1 + y2
        if den < 0:
            t *= math.exp(step * 0.5 * (y0 - y2) / den)
    return min(max(t, lo), hi)


# ----------------------------------------------------------------------------- public API


def estimate_tempo(waveform: torch.Tensor, sample_rate: int, *, min_bpm: float = 60.0,
                   max_bpm: float = 200.0) -> TempoEstimate:
    """Estimate the tempo of a music clip, with a confidence.

    waveform: float tensor ``[channels, samples]`` or ``[samples]``, any channel count and
        sample rate (clips longer than ``MAX_SECONDS`` are analysed in their middle part).
    Returns a ``TempoEstimate``; ``bpm`` is None (and ``reason`` says why, for the
    musician) when the clip is too short, silent, has no onsets or no steady beat.
    Raises ``ValueError`` for invalid input (shape, sample rate, NaN/inf samples, range).
    """
    if not 0 < min_bpm < max_bpm:
        raise ValueError(f"detect_bpm: need 0 < min_bpm < max_bpm, got {min_bpm}, {max_bpm}")
    try:
        an = _analyse(*_prepare(waveform, sample_rate))
    except _Unknown as e:
        return TempoEstimate(None, 0.0, str(e))
    return _estimate(an, min_bpm, max_bpm)


def _estimate(an: dict, min_bpm: float, max_bpm: float) -> TempoEstimate:
    conf = confidence_from_clarity(_clarity(an, min_bpm, max_bpm))
    if conf < CONFIDENCE_THRESHOLD:
        return TempoEstimate(None, round(conf, 3),
                             f"no steady beat found (confidence {conf:.2f} < "
                             f"{CONFIDENCE_THRESHOLD:.2f}), so the tempo is unknown; enter "
                             f"the BPM manually")
    bpms = _candidates(an, min_bpm, max_bpm)
    i, share = _pick(an, bpms)
    bpm = round(_refine(an["ac"], an["fps"], bpms[i], min_bpm, max_bpm), 1)
    order = share.argsort(descending=True).tolist()
    alts = tuple((round(bpms[j], 1), round(float(share[j]), 3)) for j in order
                 if j != i and float(share[j]) >= 0.05)[:3]
    return TempoEstimate(bpm, round(conf, 3), None, round(float(share[i]), 3), alts)


def detect_bpm(waveform: torch.Tensor, sample_rate: int, *, min_bpm: float = 60.0,
               max_bpm: float = 200.0) -> float:
    """The tempo of a music clip in BPM, rounded to 0.1, within ``[min_bpm, max_bpm]``.

    Raises ``ValueError`` with a musician-facing message when the tempo is unknown (too
    short, silent, no onsets, no steady beat: "no steady beat found (confidence 0.12 <
    0.50), so the tempo is unknown; enter the BPM manually") or the input is invalid
    (shape, sample rate, NaN/inf samples).  Callers that want the confidence and the
    runner-up tempi use ``estimate_tempo``.
    """
    est = estimate_tempo(waveform, sample_rate, min_bpm=min_bpm, max_bpm=max_bpm)
    if est.bpm is None:
        raise ValueError(f"detect_bpm: {est.reason}")
    return est.bpm
