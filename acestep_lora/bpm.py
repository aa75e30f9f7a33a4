"""Tempo (BPM) estimation for music clips, in plain PyTorch (no ComfyUI, no librosa).

``detect_bpm(waveform, sample_rate)`` returns the tempo of a clip in BPM, or raises
``ValueError`` with a user-facing message (too short, silent, NaN, no onsets) so the caller
can ask the user to type the tempo instead.

Method
------
1. Onset strength.  Mono mix (only the middle ``MAX_SECONDS`` of long files), resampled to
   16-24 kHz by an integer factor where possible (torchaudio's polyphase resampler is
   then cheap), 1024-point STFT with a ~10 ms hop, 64 mel bands, compression
   ``log1p(10 * power / band mean)`` (quiet cymbal bands count as much as loud kick
   bands), half-wave-rectified spectral flux.  The flux is averaged in four regions -
   kick/bass < 200 Hz, low-mid, 1-5 kHz ("snare"), > 5 kHz ("hats") - each normalised to
   unit variance, and summed.
2. Periodicity.  FFT autocorrelation of the summed envelope.  The salience of a tempo
   with beat period L is a comb ``sum_k AC(kL) / sqrt(k)`` over all multiples up to 4 s
   (autocorrelation max-pooled over +-20 ms against timing jitter), combined with a
   log-normal tempo prior (100 BPM, sd 1.3 octaves), on a 0.1 % log grid in
   ``[min_bpm, max_bpm]``.
3. Octave decision.  The best candidate T competes with T/2, 2T and T/3 (T/3 catches the
   triplet grid of a shuffle).  Each is re-scored with two cues the autocorrelation alone
   does not see:
   * backbeat - cross-correlation of the kick and snare regions one beat apart (kick on
     1 and 3, snare on 2 and 4 is large at the true beat, small at half/double tempo);
   * subdivision - strong onset periodicity *below* a tempo's 8th notes (its 16ths, or
     the swung 8ths of twice the tempo) favours twice that tempo.  This keeps half-time
     grooves (snare on 3, band in 8ths) from being read at half tempo; it only moves the
     choice inside the pair (T, 2T), so busy 16ths never push an estimate down.
4. Refinement.  +-2.5 % search on a 0.02 % grid maximising the mean raw autocorrelation
   over all beat multiples up to half the clip, then parabolic interpolation.

Measured accuracy
-----------------
``python bench/bpm_accuracy.py`` (synthetic songs from tests/synthetic_music.py: rock,
waltz, house, half-time and sparse/syncopated styles incl. clips without hi-hats and with
syncopated bass, 60-180 BPM incl. non-integer tempos, ~1/3 swung, ~1/3 with pink noise at
3-14 dB SNR, slight tempo wander on "played" styles, 20-30 s, 44.1/48 kHz):

* 100-clip sets (the default run), seeds 0/1/2/8/9: 94 %, 93 %, 97 %, 97 %, 91 % within
  +-2 %; the default run (seed 0) has a mean |error| of 0.04 % on its hits;
* 480 clips (eight 60-clip sets; the weights were chosen on five of them, 93.7 %; the
  other three, unseen, 97.2 %): 95.0 % within +-2 %, hits' mean |error| 0.04 % (max 0.6 %).

Every miss is a metrical-level error, never a wrong pulse: slow (60-97 BPM) grooves with
busy straight 8ths/16ths (often without hi-hats) read at double tempo, swung half-time
grooves read at half tempo, rarely 3/2.  Such grooves are genuinely ambiguous (a 64 BPM
backbeat with 16th hats is drum-for-drum a 128 BPM half-time groove), so on real music
expect more such half/double answers and let the user override the value.
Runtime ~0.04 s per 30 s clip on a 2-core CPU.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import torchaudio.functional as AF

__all__ = ["detect_bpm", "onset_envelope", "MIN_SECONDS", "MAX_SECONDS"]

MIN_SECONDS = 4.0  # shorter clips hold too few beats for a reliable estimate
MAX_SECONDS = 120.0  # longer clips: only the middle MAX_SECONDS are analysed
_FPS = 100.0  # onset-envelope frame rate (Hz)
_N_FFT = 1024
_N_MELS = 64
_FMIN = 30.0
_REGIONS = (30.0, 200.0, 1000.0, 5000.0, 11000.0)  # kick/bass, low-mid, snare, hats
_KICK, _SNARE = 0, 2
_MIN_FLUX = 3e-3  # mean onset strength below which a clip counts as having no onsets

# Tempo model (tuned on bench seeds 0-4; checked on unseen seeds).
_PRIOR_BPM = 100.0
_PRIOR_OCTAVES = 1.3
_COMB_MAX_LAG_S = 4.0
_W_BACKBEAT = 8.0
_W_SUBDIV = 4.0
_SUBDIV_FLOOR = 0.2
_PARAMS = dict(prior_bpm=_PRIOR_BPM, prior_octaves=_PRIOR_OCTAVES, w_backbeat=_W_BACKBEAT,
               w_subdiv=_W_SUBDIV, subdiv_floor=_SUBDIV_FLOOR, ratios=(2.0, 0.5, 1.0 / 3.0))


def _analysis_rate(sr: int) -> int:
    """A rate in 16-24 kHz reachable by an integer factor (cheap to resample), else 22050."""
    for k in (1, 2, 3, 4, 5, 6):
        if sr % k == 0 and 16000 <= sr // k <= 24000:
            return sr // k
    return 22050


@functools.lru_cache(maxsize=8)
def _mel_matrix(n_freqs: int, sr: int, fmax: float) -> torch.Tensor:
    fb = AF.melscale_fbanks(n_freqs, _FMIN, fmax, _N_MELS, sr, norm=None, mel_scale="htk")
    return fb.T.contiguous()  # [M, F]


@functools.lru_cache(maxsize=8)
def _region_matrix(fmax: float) -> torch.Tensor:
    """[R, M] averaging matrix from mel bands to the frequency regions."""
    to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    mels = torch.linspace(to_mel(_FMIN), to_mel(fmax), _N_MELS + 2)[1:-1]
    centres = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    rows = []
    for lo, hi in zip(_REGIONS[:-1], _REGIONS[1:]):
        sel = ((centres >= lo) & (centres < hi)).float()
        if sel.sum() == 0:  # very low analysis rate: region above Nyquist
            sel = torch.zeros(_N_MELS)
        rows.append(sel / sel.sum().clamp_min(1.0))
    return torch.stack(rows)


def onset_envelope(mono: torch.Tensor, sample_rate: int) -> tuple[torch.Tensor, float]:
    """Per-region onset strength ``[4, T]`` (unit variance each) and its frame rate."""
    env, fps = _region_flux(mono, sample_rate)
    return env / (env.std(1, keepdim=True) + 1e-8), fps


def _region_flux(mono: torch.Tensor, sample_rate: int) -> tuple[torch.Tensor, float]:
    """Raw (unnormalised) spectral flux averaged per frequency region, ``[4, T]``."""
    rate = _analysis_rate(int(sample_rate))
    x = mono if rate == sample_rate else AF.resample(mono, int(sample_rate), rate)
    hop = max(1, round(rate / _FPS))
    spec = torch.stft(x, _N_FFT, hop, window=torch.hann_window(_N_FFT), center=True,
                      return_complex=True)
    power = torch.view_as_real(spec).pow(2).sum(-1)  # [F, T]
    fmax = min(11000.0, rate / 2.0)
    mel = _mel_matrix(power.shape[0], rate, fmax) @ power
    # Compression relative to each band's mean level, so quiet bands (cymbals) count as much
    # as loud ones; bands more than 60 dB below the loudest band are treated as empty
    # rather than having their leakage / rounding noise amplified.
    band = mel.mean(1, keepdim=True)
    ref = band.clamp_min(float(band.max()) * 1e-6 + 1e-20)
    comp = torch.log1p(10.0 * mel / ref)
    flux = (comp[:, 1:] - comp[:, :-1]).clamp_min(0.0)
    return _region_matrix(fmax) @ flux, rate / hop


def _xcorr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalised cross-correlation r[k] = sum a[t] b[t+k], k = -(n-1)..(n-1), centred at n-1."""
    a = a - a.mean()
    b = b - b.mean()
    n = a.shape[-1]
    m = 1 << int(math.ceil(math.log2(2 * n)))
    r = torch.fft.irfft(torch.fft.rfft(a, m).conj() * torch.fft.rfft(b, m), m)
    r = torch.cat([r[m - n + 1:], r[:n]])
    return r / (a.norm() * b.norm() + 1e-12)


def _interp(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of a 1-D signal at fractional positions (clamped)."""
    pos = pos.clamp(0, x.shape[0] - 1.001)
    lo = pos.floor().long()
    fr = pos - lo
    return x[lo] * (1 - fr) + x[lo + 1] * fr


def _mean_at(x: torch.Tensor, lags: torch.Tensor, mults, max_lag: float) -> torch.Tensor:
    """Mean of x at lags*m for m in mults, using only lags <= max_lag (at least the first)."""
    m = torch.as_tensor(mults, dtype=lags.dtype)
    pos = lags[:, None] * m[None]
    use = pos <= max_lag
    use[:, 0] = True
    return (_interp(x, pos.flatten()).view(pos.shape) * use).sum(1) / use.sum(1)


def _check(waveform, sample_rate) -> torch.Tensor:
    """Validate the input and return the mono mix (float32, CPU)."""
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
    x = waveform.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("detect_bpm: the audio contains NaN or infinite samples; fix the "
                         "file/decoder or enter the BPM manually")
    mono = x if x.dim() == 1 else x.mean(0)
    seconds = mono.shape[0] / float(sample_rate)
    if seconds < MIN_SECONDS:
        raise ValueError(f"detect_bpm: the audio is too short to measure its tempo "
                         f"({seconds:.2f} s < {MIN_SECONDS:g} s); use a longer clip or enter "
                         f"the BPM manually")
    if mono.abs().max() < 1e-5:
        raise ValueError("detect_bpm: the audio is silent (peak below -100 dBFS), so there is "
                         "no tempo to measure; check the file or enter the BPM manually")
    # Long files: the middle MAX_SECONDS are plenty and keep time/memory bounded.
    max_n = int(MAX_SECONDS * sample_rate)
    if mono.shape[0] > max_n:
        off = (mono.shape[0] - max_n) // 2
        mono = mono[off:off + max_n]
    return mono


def detect_bpm(waveform: torch.Tensor, sample_rate: int, *, min_bpm: float = 60.0,
               max_bpm: float = 200.0) -> float:
    """Estimate the tempo of a music clip in beats per minute.

    waveform: float tensor ``[channels, samples]`` or ``[samples]``, any channel count and
        sample rate (clips longer than ``MAX_SECONDS`` are analysed in their middle part).
    Returns the tempo rounded to 0.1 BPM, within ``[min_bpm, max_bpm]``.
    Raises ``ValueError`` (with a message meant for the user) if the audio is shorter than
    ``MIN_SECONDS``, silent, has no onsets, or contains NaN/inf samples.
    """
    if not 0 < min_bpm < max_bpm:
        raise ValueError(f"detect_bpm: need 0 < min_bpm < max_bpm, got {min_bpm}, {max_bpm}")
    mono = _check(waveform, sample_rate)
    return round(_decide(_analyse(mono, int(sample_rate)), min_bpm, max_bpm), 1)


def _analyse(mono: torch.Tensor, sample_rate: int) -> dict:
    """Everything the decision needs: autocorrelations and the kick/snare cross-correlation."""
    raw, fps = _region_flux(mono, sample_rate)
    # A steady tone (or a file that is silent apart from a click) has essentially no flux
    # once the edges are ignored (~1e-3); music has a mean flux of order 0.1.
    if raw.shape[1] < 20 or float(raw[:, 5:-5].mean()) < _MIN_FLUX:
        raise ValueError("detect_bpm: the audio has no rhythmic onsets (a steady tone?), so "
                         "there is no tempo to measure; enter the BPM manually")
    regions = raw / (raw.std(1, keepdim=True) + 1e-8)
    env = regions.sum(0)
    n = env.shape[0]
    # Autocorrelation (FFT, zero-padded), normalised to AC[0] = 1.
    e = env - env.mean()
    size = 1 << int(math.ceil(math.log2(2 * n)))
    ac = torch.fft.irfft(torch.fft.rfft(e, size).abs().pow(2), size)[:n]
    ac = ac / ac[0].clamp_min(1e-12)
    # Max-pooled copies (+-2 frames) for scoring: tolerant of timing jitter and swing.
    acp = F.max_pool1d(ac[None, None], 5, 1, 2)[0, 0]
    xc = _xcorr(regions[_KICK], regions[_SNARE])
    xcp = F.max_pool1d(xc[None, None], 5, 1, 2)[0, 0]
    return dict(ac=ac, acp=acp, xcp=xcp, fps=fps, n=n)


def _cues(an: dict, bpm: float) -> tuple[float, float]:
    """(backbeat, fast-subdivision ratio) of one candidate tempo."""
    acp, xcp, fps, n = an["acp"], an["xcp"], an["fps"], an["n"]
    lag = 60.0 * fps / bpm
    # Kick -> snare (and snare -> kick) one beat apart.
    backbeat = 0.5 * float(_interp(xcp, torch.tensor([n - 1 + lag, n - 1 - lag])).sum())
    # Onsets closer together than this candidate's 8th notes: pairs 0.15-0.29 (or 0.71-0.85)
    # of a beat apart, i.e. straight 16ths or the swung 8ths of twice this tempo.  Lags near
    # 1/3 and 1/2 beat (the candidate's own 8ths, straight or swung) are deliberately left out.
    sub = []
    for j in range(4):
        for a, b in ((0.15, 0.29), (0.71, 0.85)):
            lo, hi = int((j + a) * lag), int(math.ceil((j + b) * lag)) + 1
            if hi < n:
                sub.append(float(acp[lo:hi].max()))
    eighths = _mean_at(acp, torch.tensor([lag / 2.0]), range(1, 9), 8 * fps)
    return backbeat, (sum(sub) / max(len(sub), 1)) / max(float(eighths[0]), 0.05)


def _decide(an: dict, min_bpm: float, max_bpm: float, params: dict | None = None) -> float:
    """Pick the tempo (before rounding) from an ``_analyse`` result."""
    p = dict(_PARAMS, **(params or {}))
    ac, acp, fps, n = an["ac"], an["acp"], an["fps"], an["n"]
    # Base salience on a 0.1 % log grid: comb over the autocorrelation, 1/sqrt(k) weights,
    # all multiples up to _COMB_MAX_LAG_S, plus the log-normal tempo prior.
    grid = torch.exp(torch.arange(math.log(min_bpm), math.log(max_bpm) + 1e-9, 0.001,
                                  dtype=torch.float64)).float()
    lags = 60.0 * fps / grid
    k = torch.arange(1, 64, dtype=torch.float32)
    pos = lags[:, None] * k[None]
    use = (pos <= min(_COMB_MAX_LAG_S * fps, n - 2)) | (k[None] == 1)
    sal = ((_interp(acp, pos.flatten()).view(pos.shape) * use) / k.sqrt()).sum(1)
    prior = -0.5 * (torch.log2(grid / p["prior_bpm"]) / p["prior_octaves"]) ** 2
    base = torch.log(sal.clamp_min(1e-3)) + prior

    def local_best(t: float) -> int:
        """Index of the best base score within +-2 % of t."""
        idx = torch.nonzero((grid >= t / 1.02) & (grid <= t * 1.02)).flatten()
        return int(idx[base[idx].argmax()])

    def excess(sub: float) -> float:
        return min(max(sub - p["subdiv_floor"], 0.0), 1.0)

    # Octave decision between the best base candidate t and t/2, 2t, t/3 (the last catches
    # a shuffle's triplet grid).  Each is scored by base + backbeat.  A strong level below
    # t's 8ths (t's "16ths") is evidence for 2t over t; a strong level below t/2's 8ths
    # (t's own 8ths) is evidence against t/2.  That evidence only moves the choice inside
    # its pair, so e.g. busy 16ths never push a tempo down.
    j0 = local_best(float(grid[int(base.argmax())]))
    t0 = float(grid[j0])
    bb0, sub0 = _cues(an, t0)
    best_t, best_s = t0, float(base[j0]) + p["w_backbeat"] * bb0
    for ratio in p["ratios"]:
        t = t0 * ratio
        if not (min_bpm <= t <= max_bpm):
            continue
        j = local_best(t)
        bb, sub = _cues(an, float(grid[j]))
        s = float(base[j]) + p["w_backbeat"] * bb
        if ratio == 2.0:
            s += p["w_subdiv"] * excess(sub0)
        elif ratio == 0.5:
            s -= p["w_subdiv"] * excess(sub)
        if s > best_s:
            best_t, best_s = float(grid[j]), s
    return _refine(ac, fps, best_t, min_bpm, max_bpm)


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
