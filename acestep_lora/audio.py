"""Audio in: decode files, accept ComfyUI AUDIO dicts, and bring everything to the VAE's 48 kHz stereo.

Decoding uses soundfile (libsndfile: wav, flac, ogg/vorbis, opus, mp3) and falls back to PyAV (ComfyUI's own
decoder, present in every ComfyUI install) for anything else. As in the official preprocessing: resample with
torchaudio's sinc resampler, duplicate mono, keep the first two of >2 channels, crop to ``max_duration``; no
loudness normalisation.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".aiff", ".aif")


def load_audio_file(path: str) -> tuple[torch.Tensor, int]:
    """Decode ``path`` to float32 [C, N] in [-1, 1] and its sample rate. Errors name the file and the fix."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file not found: '{path}'. Check the path (relative paths are resolved "
                                "against the current folder).")
    try:
        import soundfile as sf

        data, rate = sf.read(path, dtype="float32", always_2d=True)  # (N, C)
        return torch.from_numpy(data.T.copy()), int(rate)
    except Exception as sf_error:  # unsupported by libsndfile, or corrupt
        try:
            return _load_with_av(path)
        except ImportError:
            pass
        except Exception:
            pass
        raise ValueError(f"could not decode audio file '{path}' ({sf_error}). The file is corrupt or in a format "
                         "this machine cannot read; convert it to WAV or FLAC.") from sf_error


def _load_with_av(path: str) -> tuple[torch.Tensor, int]:
    import av  # type: ignore
    import numpy as np

    with av.open(path) as container:
        stream = next(s for s in container.streams if s.type == "audio")
        rate = stream.rate
        frames = [frame.to_ndarray() for frame in container.decode(stream)]
    if not frames:
        raise ValueError("no audio frames")
    layout_planar = frames[0].ndim == 2 and frames[0].shape[0] == stream.channels
    data = np.concatenate(frames, axis=1 if layout_planar else 0)
    if not layout_planar:
        data = data.reshape(-1, stream.channels).T
    tensor = torch.from_numpy(data.astype("float32"))
    if np.issubdtype(frames[0].dtype, np.integer):
        tensor = tensor / float(np.iinfo(frames[0].dtype).max + 1)
    return tensor, int(rate)


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


def save_flac(path: str, waveform: torch.Tensor, rate: int) -> None:
    """Lossless 24-bit FLAC (the sample's source of truth), written atomically."""
    import soundfile as sf

    from .fileio import atomic_path

    data = waveform.clamp(-1.0, 1.0).T.contiguous().numpy()
    with atomic_path(path) as tmp:
        sf.write(tmp, data, rate, format="FLAC", subtype="PCM_24")
