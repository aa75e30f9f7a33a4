"""Audio in: read file headers, decode only the part used, accept ComfyUI AUDIO dicts, and bring everything to
the VAE's 48 kHz stereo.

Decoding uses soundfile (libsndfile: wav, flac, ogg/vorbis, opus, mp3) and falls back to PyAV (ComfyUI's own
decoder, present in every ComfyUI install) for anything else. ``audio_info`` reads a file's length from its header
and ``load_audio_file(path, start, frames)`` decodes one window of it, so a 2-hour file costs no more memory than
the piece that is trained on. ``windows`` cuts a long file into the pieces Prepare uses (``long_audio``: equal
segments, or the first ``max_duration`` seconds as the official preprocessing does). As in the official
preprocessing: resample with torchaudio's sinc resampler, duplicate mono, keep the first two of >2 channels; no
loudness normalisation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".aiff", ".aif")
TARGET_RATE = 48000
LATENT_HOP = 1920  # audio samples at 48 kHz per VAE latent frame (25 frames/s)
# A clip whose peak stays below -60 dBFS holds nothing audible to learn from (dither and hiss sit below it).
SILENCE_PEAK = 10 ** (-60 / 20)
LONG_AUDIO_CHOICES = ("segments", "crop")


@dataclass(frozen=True)
class AudioInfo:
    """What a file header says, without decoding: length in sample frames, rate, channel count."""
    frames: int
    sample_rate: int
    channels: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


def _missing(path: str) -> FileNotFoundError:
    return FileNotFoundError(f"audio file not found: '{path}'. Check the path (relative paths are resolved "
                             "against the current folder).")


def _undecodable(path: str, error: Exception) -> ValueError:
    return ValueError(f"could not decode audio file '{path}' ({error}). The file is corrupt or in a format this "
                      "machine cannot read; convert it to WAV or FLAC.")


def audio_info(path: str) -> AudioInfo:
    """Length, rate and channels of ``path`` from its header (soundfile, else PyAV); decodes no audio."""
    if not os.path.isfile(path):
        raise _missing(path)
    try:
        import soundfile as sf

        info = sf.info(path)
        return AudioInfo(int(info.frames), int(info.samplerate), int(info.channels))
    except Exception as sf_error:  # unsupported by libsndfile, or corrupt
        try:
            return _info_with_av(path)
        except Exception:
            pass
        raise _undecodable(path, sf_error) from sf_error


def load_audio_file(path: str, start: int = 0, frames: Optional[int] = None) -> tuple[torch.Tensor, int]:
    """Decode ``frames`` sample frames of ``path`` from frame ``start`` (all to the end when None) to float32
    [C, N] in [-1, 1], plus the sample rate. Only that part is decoded. Errors name the file and the fix."""
    if not os.path.isfile(path):
        raise _missing(path)
    try:
        import soundfile as sf

        data, rate = sf.read(path, start=start, frames=-1 if frames is None else frames, dtype="float32",
                             always_2d=True)  # (N, C)
        return torch.from_numpy(data.T.copy()), int(rate)
    except Exception as sf_error:  # unsupported by libsndfile, or corrupt
        try:
            return _load_with_av(path, start, frames)
        except Exception:
            pass
        raise _undecodable(path, sf_error) from sf_error


def _info_with_av(path: str) -> AudioInfo:
    """Header facts through PyAV; when the container does not state its length, it is counted by decoding
    frame by frame (nothing is kept)."""
    import av  # type: ignore

    with av.open(path) as container:
        stream = next(s for s in container.streams if s.type == "audio")
        rate, channels = int(stream.rate), int(stream.channels)
        if stream.duration is not None and stream.time_base is not None:
            frames = int(round(float(stream.duration * stream.time_base) * rate))
        elif container.duration is not None:
            frames = int(round(container.duration / 1_000_000 * rate))  # av.time_base = 1/1e6
        else:
            frames = sum(frame.samples for frame in container.decode(stream))
    return AudioInfo(frames, rate, channels)


def _frame_to_array(frame, channels: int):
    import numpy as np

    data = frame.to_ndarray()
    if data.ndim == 2 and data.shape[0] == channels and frame.format.is_planar:
        out = data
    else:  # packed: (1, N * C)
        out = data.reshape(-1, channels).T
    out = out.astype("float32")
    if np.issubdtype(data.dtype, np.integer):
        out /= float(np.iinfo(data.dtype).max + 1)
    return out


def _load_with_av(path: str, start: int = 0, frames: Optional[int] = None) -> tuple[torch.Tensor, int]:
    """Decode [start, start + frames) with PyAV, streaming: frames before ``start`` are dropped as they come and
    decoding stops at the end of the window, so memory holds only the window."""
    import av  # type: ignore
    import numpy as np

    end = None if frames is None else start + frames
    parts, position = [], 0
    with av.open(path) as container:
        stream = next(s for s in container.streams if s.type == "audio")
        rate, channels = int(stream.rate), int(stream.channels)
        for frame in container.decode(stream):
            data = _frame_to_array(frame, channels)
            n = data.shape[1]
            lo, hi = max(start - position, 0), n if end is None else min(end - position, n)
            if hi > lo:
                parts.append(data[:, lo:hi])
            position += n
            if end is not None and position >= end:
                break
    if not parts:
        raise ValueError("no audio frames in the requested range")
    return torch.from_numpy(np.concatenate(parts, axis=1)), rate


def from_comfy_audio(audio: dict, name: str = "audio") -> list[tuple[torch.Tensor, int]]:
    """ComfyUI AUDIO ``{"waveform": [B, C, N], "sample_rate": int}`` -> one (waveform [C, N], rate) per batch item."""
    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise ValueError(f"{name}: expected a ComfyUI AUDIO value (dict with 'waveform' and 'sample_rate'); "
                         "connect a Load Audio node.")
    waveform = torch.as_tensor(audio["waveform"]).float().cpu()
    if waveform.dim() == 2:
        waveform = waveform.unsqueeze(0)
    if waveform.dim() != 3:
        raise ValueError(f"{name}: waveform must be [batch, channels, samples], got {tuple(waveform.shape)}.")
    return [(waveform[i], int(audio["sample_rate"])) for i in range(waveform.shape[0])]


def to_comfy_audio(paths: list, sample_rate: int) -> dict:
    """Clips of one length at ``sample_rate`` as one ComfyUI AUDIO batch ``[clips, C, N]`` (from_comfy_audio's
    counterpart); 1 s of stereo silence when there are none, so a downstream Save/Preview Audio still runs."""
    clips = [load_audio_file(path)[0] for path in paths]
    if not clips:
        return {"waveform": torch.zeros(1, 2, sample_rate), "sample_rate": sample_rate}
    return {"waveform": torch.stack(clips), "sample_rate": sample_rate}


def check_waveform(waveform: torch.Tensor, rate: int, name: str) -> None:
    """Reject audio that cannot be trained on, with the reason and the fix."""
    if rate <= 0:
        raise ValueError(f"{name}: sample rate {rate} is invalid.")
    if waveform.numel() == 0 or waveform.shape[-1] == 0:
        raise ValueError(f"{name}: the audio is empty (zero samples). Remove it or load the right file.")
    finite = torch.isfinite(waveform)
    if not bool(finite.any()):
        raise ValueError(f"{name}: the audio contains only NaN/inf values. Re-export it from your editor.")
    if not bool(finite.all()):
        raise ValueError(f"{name}: the audio contains NaN/inf samples ({int((~finite).sum())} of {finite.numel()}). "
                         "Re-export it from your editor.")


def to_stereo_48k(waveform: torch.Tensor, rate: int, target_rate: int = 48000,
                  max_duration: Optional[float] = None) -> torch.Tensor:
    """[C, N] at ``rate`` -> [2, M] at ``target_rate``, cropped to ``max_duration`` seconds."""
    if waveform.dim() == 1:
        waveform = waveform.unsqueeze(0)
    if max_duration is not None and max_duration > 0:
        # Crop before resampling (plus a margin for the filter) so a long file costs no more than max_duration.
        keep = int(max_duration * rate) + 64
        waveform = waveform[:, :keep]
    if rate != target_rate:
        import torchaudio.functional as AF

        waveform = AF.resample(waveform, rate, target_rate)
    if waveform.shape[0] == 1:
        waveform = waveform.repeat(2, 1)
    elif waveform.shape[0] > 2:
        waveform = waveform[:2]
    if max_duration is not None and max_duration > 0:
        waveform = waveform[:, : int(max_duration * target_rate)]
    return waveform.contiguous()


def windows(total_frames: int, rate: int, max_duration: Optional[float], long_audio: str) -> list[tuple[int, int]]:
    """The (start, frames) pieces of a clip of ``total_frames`` that Prepare trains on.

    Up to ``max_duration`` seconds: the whole clip. Longer: ``"crop"`` keeps the first ``max_duration`` seconds;
    ``"segments"`` cuts it into n = ceil(total / max_duration) equal pieces (no short tail piece), which together
    cover the whole clip.
    """
    if long_audio not in LONG_AUDIO_CHOICES:
        raise ValueError(f"long_audio '{long_audio}' is not one of {', '.join(LONG_AUDIO_CHOICES)}: 'segments' "
                         "trains on every part of a long file, 'crop' on its first max_duration seconds.")
    limit = total_frames if not max_duration or max_duration <= 0 else max(1, int(max_duration * rate))
    if total_frames <= limit:
        return [(0, total_frames)]
    if long_audio == "crop":
        return [(0, limit)]
    count = -(-total_frames // limit)
    bounds = [round(i * total_frames / count) for i in range(count + 1)]
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(count)]


def peak(waveform: torch.Tensor) -> float:
    """Largest absolute sample (0.0 for digital silence)."""
    return float(waveform.abs().max()) if waveform.numel() else 0.0


def save_flac(path: str, waveform: torch.Tensor, rate: int) -> None:
    """Lossless 24-bit FLAC (the sample's source of truth), written atomically."""
    import soundfile as sf

    from .fileio import atomic_path

    data = waveform.clamp(-1.0, 1.0).T.contiguous().numpy()
    with atomic_path(path) as tmp:
        sf.write(tmp, data, rate, format="FLAC", subtype="PCM_24")
