"""Turn audio + metadata into the training tensors (one ``.pt`` per sample + ``manifest.json``), spec §3.

Per sample, as the official preprocessing does, but with the conditioning built exactly as official inference
builds it, so training sees what generation sees:
  audio -> 48 kHz stereo -> tiled VAE encode -> one posterior sample (seeded)
  caption (+ custom tag) -> SFT_GEN_PROMPT with metas -> Qwen3-Embedding
  lyrics -> "# Languages ... # Lyric ..." prompt -> token embeddings
  condition encoder, with the silence latent as the "no reference audio" timbre input (inference's choice)
  context latents = [silence latent, ones] (the text2music context)

Two decisions differ from the official *training* preprocessing and follow official *inference* instead:
the lyric header and unpadded prompts (newer official preprocessing does the same), and the timbre input. The
metas duration is the length actually encoded, not the file's full length.

Long files (``long_audio``): the official preprocessing keeps the first 240 s and drops the rest. By default we
cut a file longer than ``max_duration`` into equal segments, each a training sample with the file's metadata
(``"segments"``); ``"crop"`` keeps the first ``max_duration`` seconds. Either way only the part used is decoded.

Nothing is guessed silently. Before any model is loaded, every file is checked from its header alone (missing,
unreadable, shorter than one latent frame); each new sample is then decoded exactly once, in the encode loop,
where silence is refused and an unknown tempo is detected (``detect_bpm``) and written into the metas prompt.
The status ends with a table of what will be trained on (file, duration used / total, caption and where it came
from, lyrics, bpm and whether typed or detected, key, language, notes such as "cropped" or "caption from file
name"), and ``manifest.json``'s ``samples_info`` holds the same facts, one entry per training sample.

Each sample's tensors are cached under a content hash of (audio, the window of it used, metadata, tempo detection,
model identity, dtype, preprocessing version): re-running encodes nothing, adding a sample encodes only that one.
The VAE posterior sample is drawn with a seed made from the audio and its window alone, so the same clip gets the
same latents whichever files hold the model (the official folder or ComfyUI's files, source.py) and whatever its
caption.

The model comes from ``source.ModelSource``: the official folder, or ComfyUI-format files (split or all-in-one),
with the silence latent derived from the VAE when no ``silence_latent.pt`` exists; the status says which files
were used and what was chosen or derived automatically.
"""
from __future__ import annotations

import hashlib
import math
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Optional
from collections.abc import Callable

import torch

from . import audio as audio_io
from . import samples as sample_files
from .device import compute_dtype, release_memory, resolve_device
from .fileio import atomic_save, sha256_file
from .manifest import PREPROCESS_VERSION, TENSOR_KEYS, DatasetMetadata, Manifest, SampleInfo
from .metadata import (INSTRUMENTAL_LYRICS, normalize_bpm, normalize_keyscale, normalize_language,
                       normalize_lyrics, normalize_timesignature, prompt_language)
from .prompts import apply_custom_tag, caption_prompt, lyrics_prompt
from .options import PrepareSettings  # declared in the option table, with its node and CLI facts
from .source import Folders, ModelSource, from_config

LONG_AUDIO_CHOICES = audio_io.LONG_AUDIO_CHOICES
# ACE-Step generates 10-600 s (official DURATION_MIN / DURATION_MAX): a shorter clip teaches a length the model is
# never asked for, and holds only a few bars of the style. Kept, with a note.
VERY_SHORT_SECONDS = 10.0
DETECTED = "detected"
UNKNOWN = "unknown"


@dataclass
class PrepareItem:
    """One input: a file path or an in-memory waveform, plus its metadata (any typed form).

    The ``*_source`` fields and ``notes`` say where the metadata came from (``items_from_samples`` fills them
    from Collect's sidecar reading); left empty, Prepare works them out itself: a file's sidecars are read again
    and a value equal to the sidecar's is credited to it, anything else counts as typed.
    """

    name: str  # how errors and progress refer to it (the path, or "audio_input_2")
    caption: str
    path: Optional[str] = None
    waveform: Optional[torch.Tensor] = None  # [C, N]
    sample_rate: Optional[int] = None
    lyrics: str = ""
    bpm: object = None
    keyscale: str = ""
    language: str = "unknown"
    timesignature: str = ""
    caption_source: str = ""
    lyrics_source: str = ""
    bpm_source: str = ""
    notes: list = field(default_factory=list)


def items_from_samples(found: list) -> list[PrepareItem]:
    """``samples.collect_samples`` output -> Prepare items carrying each sample's sources and notes."""
    return [PrepareItem(name=s.audio_path, path=s.audio_path, caption=s.caption, lyrics=s.lyrics, bpm=s.bpm,
                        keyscale=s.keyscale, language=s.language, timesignature=s.timesignature,
                        caption_source=s.caption_source, lyrics_source=s.lyrics_source,
                        bpm_source=s.bpm_source, notes=list(s.notes)) for s in found]



@dataclass
class PrepareResult:
    tensor_dir: str
    status: str  # header line, warnings, then the table
    encoded: int
    reused: int
    files: list = field(default_factory=list)
    seconds_of_audio: float = 0.0
    header: str = ""  # "Prepared 12 samples (3 encoded, 9 cached), ..."
    warnings: list = field(default_factory=list)  # what to check before training, one line each
    table: str = ""  # the per-file table of what will be trained on
    samples_info: list = field(default_factory=list)  # [manifest.SampleInfo], as in manifest.json
    model: str = ""  # which model files were used (ModelSource.describe)


@dataclass
class _Source:
    """One input, validated: normalised metadata, where it came from, and its length (from the header)."""
    item: PrepareItem
    label: str  # the file name (or input name) shown in the table
    caption: str  # with the custom tag applied
    lyrics: str
    bpm: Optional[int]
    keyscale: str
    language: str
    timesignature: str
    caption_source: str
    lyrics_source: str
    bpm_source: str  # sample_files.TYPED / DETECTED_BY_CREATE, or "" while unknown
    notes: list
    rate: int = 0
    total_frames: int = 0
    content: str = ""  # content hash of the file or waveform


@dataclass
class _Piece:
    """One training sample: a window of a source (the whole clip, its first max_duration s, or a segment)."""
    source: _Source
    index: int
    count: int
    start: int  # in source sample frames
    frames: int
    bpm: Optional[int] = None
    bpm_source: str = ""
    notes: list = field(default_factory=list)
    key: str = ""
    file: str = ""
    seed: int = 0  # of the VAE posterior sample: from the audio and its window only
    bpm_note: str = ""  # why detection left the tempo unknown (kept in the tensor file's metadata)

    @property
    def label(self) -> str:
        """How errors and warnings name this piece: the file as given, and which part."""
        return self.source.item.name + self._part

    @property
    def short_label(self) -> str:
        """How progress lines name it: the file name without its folder."""
        item = self.source.item
        return (os.path.basename(item.path) if item.path else item.name) + self._part

    @property
    def _part(self) -> str:
        return f" (part {self.index + 1} of {self.count})" if self.count > 1 else ""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "sample"


def _seconds(value: float) -> str:
    """35.2 s / 6 s / 240 s: at most one decimal, none from 100 s on."""
    text = f"{value:.1f}" if value < 99.95 else f"{value:.0f}"
    return (text[:-2] if text.endswith(".0") else text) + " s"


# ----------------------------------------------------------------------------------------------------- inputs

def _provenance(item: PrepareItem, caption: str, lyrics: str, bpm: Optional[int]) -> tuple[str, str, str, list]:
    """-> (caption_source, lyrics_source, bpm_source, notes); see PrepareItem."""
    if item.caption_source or item.lyrics_source:
        bpm_source = (item.bpm_source or sample_files.TYPED) if bpm is not None else ""
        return (item.caption_source or sample_files.TYPED, item.lyrics_source or sample_files.TYPED, bpm_source,
                list(item.notes))
    sidecar = None
    if item.path:
        try:  # the file's own sidecars: small text files, read again to credit what came from them
            sidecar = sample_files.read_sample(item.path)
        except (ValueError, OSError):
            sidecar = None
    notes = list(item.notes)
    caption_source, lyrics_source = sample_files.TYPED, sample_files.TYPED
    if not (item.lyrics or "").strip():
        lyrics_source = sample_files.NO_LYRICS
    if sidecar is not None and sidecar.caption == caption:
        caption_source = sidecar.caption_source
        if caption_source == sample_files.FROM_FILE_NAME:
            notes.append(sample_files.NOTE_FILE_NAME_CAPTION)
    if sidecar is not None and sidecar.lyrics == lyrics and lyrics_source != sample_files.NO_LYRICS:
        lyrics_source = sidecar.lyrics_source
        notes += [n for n in sidecar.notes if n != sample_files.NOTE_FILE_NAME_CAPTION]
    bpm_source = ""
    if bpm is not None:
        bpm_source = sidecar.bpm_source if sidecar is not None and sidecar.bpm == bpm else sample_files.TYPED
    return caption_source, lyrics_source, bpm_source, [n for i, n in enumerate(notes) if n not in notes[:i]]


def _silence_reason(waveform: torch.Tensor) -> Optional[str]:
    peak = audio_io.peak(waveform)
    if peak >= audio_io.SILENCE_PEAK:
        return None
    level = "digital silence (every sample is 0)" if peak == 0 else f"peak {20 * math.log10(peak):.0f} dBFS"
    return (f"the audio is silent ({level}, below -60 dBFS): there is nothing to learn from it. Remove it from "
            "the dataset, or check the file (a muted track or a wrong export?).")


def _resolve_source(item: PrepareItem, settings: PrepareSettings) -> _Source:
    """Normalise the metadata and check the audio from its header (files) or in memory (AUDIO inputs)."""
    try:
        typed_caption = (item.caption or "").strip()
        caption = apply_custom_tag(typed_caption, settings.custom_tag, settings.tag_position)
        if not caption:
            raise ValueError("the caption is empty; describe the music (genre, instruments, mood) or set a custom_tag.")
        lyrics, bpm = normalize_lyrics(item.lyrics), normalize_bpm(item.bpm)
        keyscale, language = normalize_keyscale(item.keyscale), normalize_language(item.language)
        timesignature = normalize_timesignature(item.timesignature)
    except ValueError as e:
        raise ValueError(f"sample '{item.name}': {e}") from None
    caption_source, lyrics_source, bpm_source, notes = _provenance(item, typed_caption, lyrics, bpm)
    label = os.path.basename(item.path) if item.path else item.name
    src = _Source(item, label, caption, lyrics, bpm, keyscale, language, timesignature, caption_source,
                  lyrics_source, bpm_source, notes)
    name = f"sample '{item.name}'"
    if item.waveform is not None:  # already in memory: every check happens here, before anything is written
        src.rate, src.total_frames = int(item.sample_rate or 0), int(item.waveform.shape[-1])
        audio_io.check_waveform(item.waveform, src.rate, name)
    elif item.path:
        try:
            info = audio_io.audio_info(item.path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{name}: audio file not found: '{item.path}'. Check the path (relative paths "
                                    "are resolved against ComfyUI's input folder).") from None
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if info.frames <= 0:
            raise ValueError(f"{name}: the audio is empty (zero samples). Remove it or load the right file.")
        src.rate, src.total_frames = info.sample_rate, info.frames
    else:
        raise ValueError(f"{name} has neither a file path nor audio.")
    if src.total_frames * audio_io.TARGET_RATE // src.rate < audio_io.LATENT_HOP:
        raise ValueError(f"{name} is shorter than one latent frame (40 ms); remove it.")
    if item.waveform is not None and (reason := _silence_reason(item.waveform)):
        raise ValueError(f"{name}: {reason}")
    return src


def _content_hash(item: PrepareItem) -> str:
    if item.path:
        return sha256_file(item.path)
    h = hashlib.sha256(str(item.sample_rate).encode())
    h.update(item.waveform.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _cut(src: _Source, settings: PrepareSettings, identity: dict) -> list[_Piece]:
    """The source's training samples (long_audio), each with its cache key and tensor file name."""
    windows = audio_io.windows(src.total_frames, src.rate, settings.max_duration, settings.long_audio)
    total = src.total_frames / src.rate
    stem = os.path.splitext(os.path.basename(src.item.path))[0] if src.item.path else src.item.name
    pieces = []
    for index, (start, frames) in enumerate(windows):
        used = frames / src.rate
        notes = list(src.notes)
        if len(windows) > 1:
            notes.append(f"split into {len(windows)} × {_seconds(used)} (long_audio = segments)")
        elif frames < src.total_frames:
            notes.append(f"cropped {_seconds(total)} → {_seconds(used)} (long_audio = crop)")
        if used < VERY_SHORT_SECONDS:
            notes.append(f"very short ({_seconds(used)})")
        piece = _Piece(src, index, len(windows), start, frames, src.bpm, src.bpm_source, notes)
        payload = {"audio": src.content, "window": [start, frames], "caption": src.caption, "lyrics": src.lyrics,
                   "bpm": src.bpm, "detect_bpm": settings.detect_bpm if src.bpm is None else None,
                   "keyscale": src.keyscale, "language": src.language, "timesignature": src.timesignature,
                   **identity, "version": PREPROCESS_VERSION}
        piece.key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        piece.seed = int(hashlib.sha256(f"{src.content}:{start}:{frames}".encode()).hexdigest()[:15], 16)
        part = f"_part{index + 1}of{len(windows)}" if len(windows) > 1 else ""
        piece.file = f"{_slug(stem)}{part}_{piece.key[:12]}.pt"
        pieces.append(piece)
    return pieces


def _check_output_dir(output_dir: str) -> None:
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"output_dir '{output_dir}' is not writable ({e.strerror}); choose a folder you can write "
                         "to (a relative path goes under ComfyUI's output folder).") from None


def context_latents_for(silence: torch.Tensor, frames: int) -> torch.Tensor:
    """[T, 128]: the silence latent (repeated when the clip is longer) and an all-ones chunk mask."""
    reps = -(-frames // silence.shape[1])
    src = silence[0].repeat(reps, 1)[:frames]
    return torch.cat([src, torch.ones(frames, silence.shape[-1], dtype=silence.dtype, device=silence.device)], -1)


def prepare_dataset(items: list[PrepareItem], output_dir: str, settings: PrepareSettings,
                    progress: Optional[Callable[[int, int, str], None]] = None,
                    check_cancel: Optional[Callable[[], None]] = None,
                    input_notes: Optional[list[str]] = None, folders: Optional[Folders] = None) -> PrepareResult:
    """Encode ``items`` into ``output_dir``. Every input is checked (file headers only) before any model loads;
    each new training sample is then decoded once, checked for silence, tempo-detected and encoded.

    ``input_notes``: lines the caller wants in the status's warnings (e.g. how a typed list was split).
    ``folders``: ComfyUI's model folders, where the nodes' dropdown entries (diffusion_models/...) are found.
    """
    started = time.time()
    if not items:
        raise ValueError("the dataset is empty: give audio_files (or connect audio_input_1..4), e.g. from "
                         "'ACE-Step Collect Training Samples'.")
    if settings.max_duration is not None and settings.max_duration < 1:
        raise ValueError(f"max_duration must be at least 1 second (got {settings.max_duration}).")
    if settings.long_audio not in LONG_AUDIO_CHOICES:
        raise ValueError(f"long_audio '{settings.long_audio}' is not one of {', '.join(LONG_AUDIO_CHOICES)}: "
                         "'segments' trains on every part of a long file, 'crop' on its first max_duration seconds.")
    source = from_config(settings, folders)  # an unknown model, missing or mismatched files fail here
    source.require("vae", "text_encoder")
    fingerprint = source.identity()
    _check_output_dir(output_dir)
    device = resolve_device(settings.device)
    dtype = compute_dtype(device)

    sources = [_resolve_source(item, settings) for item in items]
    pieces = []
    for src in sources:
        src.content = _content_hash(src.item)
        pieces += _cut(src, settings, {"checkpoint": fingerprint, "dtype": str(dtype)})

    metas = {p.file: m for p in pieces if (m := _cached_metadata(os.path.join(output_dir, p.file), p.key))}
    encoded = []
    models = None
    try:
        for index, piece in enumerate(pieces):
            if check_cancel is not None:
                check_cancel()
            if piece.file not in metas:
                if progress is not None:
                    progress(index, len(pieces), f"encoding {piece.short_label}")
                waveform, rate = _decode(piece, len(encoded))
                if piece.bpm is None and settings.detect_bpm:
                    piece.bpm, piece.bpm_source, note = sample_files.detect_tempo(waveform, rate)
                    piece.bpm_note = note or ""
                if models is None:
                    models = _Models(settings, source, device, dtype)
                data = models.encode(piece, waveform, rate)
                del waveform
                atomic_save(os.path.join(output_dir, piece.file), lambda p, d=data: torch.save(d, p))
                metas[piece.file] = data["metadata"]
                encoded.append(piece)
            if progress is not None:
                progress(index + 1, len(pieces),
                         f"{'encoded' if encoded and encoded[-1] is piece else 'cached'} {piece.short_label}")
    finally:
        if models is not None:
            del models
            release_memory(device)

    samples_info = [_sample_info(p, metas[p.file]) for p in pieces]
    total_seconds = sum(s.duration_used for s in samples_info)
    warnings = list(input_notes or []) + _warnings(sources, pieces, settings)
    metadata = DatasetMetadata(name=os.path.basename(os.path.normpath(output_dir)), custom_tag=settings.custom_tag,
                               tag_position=settings.tag_position, created_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                               num_samples=len(pieces), all_instrumental=all(s.instrumental for s in samples_info))
    Manifest(samples_info, fingerprint, str(dtype).replace("torch.", ""), metadata, PREPROCESS_VERSION,
             settings.max_duration, settings.long_audio, settings.detect_bpm, warnings).save(output_dir)

    elapsed = time.time() - started
    header = _header(len(pieces), sources, len(encoded), total_seconds,
                     sum(metas[p.file]["duration"] for p in encoded), elapsed, device.type, output_dir)
    table = format_table(samples_info)
    model = source.describe()
    status = f"{header}\nModel: {model}"
    if warnings:
        status += "\n\nCheck before training:\n" + "\n".join(f"  - {w}" for w in warnings)
    status += "\n\n" + table
    return PrepareResult(output_dir, status, len(encoded), len(pieces) - len(encoded), [p.file for p in pieces],
                         total_seconds, header, warnings, table, samples_info, model)


def _decode(piece: _Piece, encoded_so_far: int) -> tuple[torch.Tensor, int]:
    """The piece's audio, decoded once (files: only its window), checked; errors say what is already cached."""
    src = piece.source
    try:
        if src.item.waveform is not None:
            waveform, rate = src.item.waveform[:, piece.start:piece.start + piece.frames], src.rate
        else:
            waveform, rate = audio_io.load_audio_file(src.item.path, piece.start, piece.frames)
        audio_io.check_waveform(waveform, rate, "the decoded audio")
        reason = _silence_reason(waveform)
        if reason:
            raise ValueError(reason)
    except (ValueError, FileNotFoundError) as e:
        if encoded_so_far:
            done = (" The sample encoded before it in this run is cached" if encoded_so_far == 1 else
                    f" The {encoded_so_far} samples encoded before it in this run are cached")
        else:
            done = " Nothing was encoded in this run yet"
        raise ValueError(f"sample '{piece.label}': {e}{done}; once you remove or fix it, running Prepare again "
                         "encodes only the samples that are not cached yet.") from None
    return waveform, rate


def _sample_info(piece: _Piece, meta: dict) -> SampleInfo:
    """One manifest ``samples_info`` entry: what this training sample is and where each fact came from. Only
    facts of the input (no timings, no cached/encoded flag): the same dataset gives the same entries."""
    src = piece.source
    if src.bpm is not None:
        bpm, bpm_source = src.bpm, src.bpm_source
    else:
        bpm = meta.get("bpm")
        bpm_source = meta.get("bpm_source") or (DETECTED if bpm is not None else UNKNOWN)
    return SampleInfo(file=piece.file, name=src.item.name, cache_key=piece.key, segment=piece.index,
                      segments=piece.count, offset=round(piece.start / src.rate, 3), duration_used=meta["duration"],
                      duration_total=round(src.total_frames / src.rate, 3), frames=meta["frames"],
                      caption=src.caption, caption_source=src.caption_source, lyrics=src.lyrics,
                      lyrics_source=src.lyrics_source, instrumental=src.lyrics == INSTRUMENTAL_LYRICS, bpm=bpm,
                      bpm_source=bpm_source, keyscale=src.keyscale, language=src.language,
                      timesignature=src.timesignature,
                      notes=list(piece.notes) + ([meta["bpm_note"]] if bpm is None and meta.get("bpm_note") else []))


# ----------------------------------------------------------------------------------------------------- status

def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _audio_length(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else _seconds(seconds)


def _elapsed(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def _header(samples: int, sources: list, encoded: int, total_seconds: float, encoded_seconds: float,
            elapsed: float, device: str, output_dir: str) -> str:
    origin = ""
    if len(sources) != samples:
        noun = "audio file" if all(s.item.path for s in sources) else "clip"
        origin = f" from {_count(len(sources), noun)}"
    text = (f"Prepared {_count(samples, 'sample')}{origin} ({encoded} encoded, {samples - encoded} cached): "
            f"{_audio_length(total_seconds)} of audio")
    if not encoded:
        text += f", all from the cache ({_elapsed(elapsed)})"
    elif elapsed < 1.0:  # a ratio over a blink of time would say nothing
        text += f"; encoded {_audio_length(encoded_seconds)} in {_elapsed(elapsed)} on {device}"
    else:
        ratio = encoded_seconds / elapsed
        ratio_text = f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.1f}" if ratio >= 1 else f"{ratio:.2g}"  # never "0×"
        text += (f"; encoded {_audio_length(encoded_seconds)} in {_elapsed(elapsed)} ({ratio_text}× real time) "
                 f"on {device}")
    return text + f". Tensors in {output_dir}"


def _names(labels: list[str], limit: int = 5) -> str:
    shown = ", ".join(labels[:limit])
    return shown + (f" and {len(labels) - limit} more" if len(labels) > limit else "")


def _warnings(sources: list[_Source], pieces: list[_Piece], settings: PrepareSettings) -> list[str]:
    """What to check before training, grouped: guessed captions, .txt read as lyrics, cut files, short clips."""
    out = []
    named = [s.label for s in sources if s.caption_source == sample_files.FROM_FILE_NAME]
    if named:
        one = len(named) == 1
        out.append(f"{_count(len(named), 'file')} {'has' if one else 'have'} no caption and will train on "
                   f"{'its file name' if one else 'their file names'} as caption: {_names(named)}. Write the "
                   "caption into <name>_caption.txt (or the \"caption\" of <name>.json) next to the audio file.")
    for s in sources:
        out += [n for n in s.notes if "is read as LYRICS" in n]
    by_source = {}
    for p in pieces:
        by_source.setdefault(id(p.source), []).append(p)
    long_limit = _seconds(settings.max_duration or 0)
    cropped = [f"{s.label} ({_seconds(s.total_frames / s.rate)})" for s in sources
               if len(by_source[id(s)]) == 1 and by_source[id(s)][0].frames < s.total_frames]
    if cropped:
        out.append(f"{_count(len(cropped), 'file')} longer than max_duration {long_limit} "
                   f"{'is' if len(cropped) == 1 else 'are'} cropped to the first {long_limit} (long_audio = crop); "
                   f"the rest is not trained on: {_names(cropped)}. long_audio = segments trains on all of it.")
    split = [f"{s.label} ({_seconds(s.total_frames / s.rate)} → {len(by_source[id(s)])} × "
             f"{_seconds(by_source[id(s)][0].frames / s.rate)})" for s in sources if len(by_source[id(s)]) > 1]
    if split:
        out.append(f"{_count(len(split), 'file')} longer than max_duration {long_limit} "
                   f"{'is' if len(split) == 1 else 'are'} split into equal segments, each a training sample with "
                   f"the file's metadata (long_audio = segments): {_names(split)}.")
    copies = {}
    for s in sources:
        copies.setdefault(tuple(p.key for p in by_source[id(s)]), []).append(s.label)
    for labels in (labels for labels in copies.values() if len(labels) > 1):
        out.append(f"the same audio with the same metadata is listed {len(labels)} times ({_names(labels)}): it "
                   f"is trained on {len(labels)} times as often as the other samples; remove the copies unless you "
                   "mean it.")
    short = [f"{s.label} ({_seconds(s.total_frames / s.rate)})" for s in sources
             if s.total_frames / s.rate < VERY_SHORT_SECONDS]
    if short:
        out.append(f"{_count(len(short), 'clip')} shorter than {VERY_SHORT_SECONDS:.0f} s (ACE-Step generates "
                   f"10-600 s; kept, but longer clips teach a style better): {_names(short)}.")
    return out


def _shorten(text: str, limit: int) -> str:
    text = " / ".join(line.strip() for line in text.splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _shorten_middle(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


_SOURCE_WORDS = {sample_files.FROM_FILE_NAME: "(from the file name)", sample_files.TYPED: "(typed)",
                 sample_files.NO_LYRICS: "(none given)"}
_BPM_WORDS = {sample_files.TYPED: "typed", DETECTED: "detected", sample_files.DETECTED_BY_CREATE: "detected by Create"}


def _bpm_cell(entries: list[SampleInfo]) -> str:
    known = [e for e in entries if e.bpm is not None]
    if not known:
        return UNKNOWN
    values = [str(e.bpm) if e.bpm is not None else "?" for e in entries]
    shown = values[0] if len(set(values)) == 1 else "/".join(values)
    return f"{shown} ({_BPM_WORDS.get(known[0].bpm_source, known[0].bpm_source)})"


def _duration_cell(entries: list[SampleInfo]) -> str:
    first = entries[0]
    total = _seconds(first.duration_total)
    if len(entries) > 1:
        return f"{len(entries)} × {_seconds(first.duration_used)} / {total}"
    if first.duration_used < first.duration_total - 0.05:
        return f"{_seconds(first.duration_used)} / {total}"
    return _seconds(first.duration_used)


def format_table(samples_info: list[SampleInfo]) -> str:
    """The table of what will be trained on, from manifest ``samples_info`` (one row per input file; the segments
    of a long file share its row). Fits ~100 columns: a line of short facts per file, then its caption, lyrics
    and notes on indented lines."""
    groups: list[list[SampleInfo]] = []
    for entry in samples_info:
        if groups and groups[-1][0].name == entry.name and entry.segment > 0:
            groups[-1].append(entry)
        else:
            groups.append([entry])
    rows = []
    for number, entries in enumerate(groups, 1):
        first = entries[0]
        name = os.path.basename(first.name) if os.path.sep in first.name else first.name
        rows.append((str(number), _shorten_middle(name, 32), _duration_cell(entries), _bpm_cell(entries),
                     first.keyscale or "-", first.language, entries))
    heads = ("#", "file", "used / total", "bpm", "key", "language")
    widths = [max(len(heads[c]), *(len(r[c]) for r in rows)) for c in range(6)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(heads), line(["-" * w for w in widths])]
    pad = " " * (widths[0] + 2)
    for *cells, entries in rows:
        first = entries[0]
        out.append(line(cells))
        source = _SOURCE_WORDS.get(first.caption_source, f"(from {first.caption_source})")
        out.append(f"{pad}caption  \"{_shorten(first.caption, 40)}\"  {source}")
        if first.instrumental:
            lyrics = INSTRUMENTAL_LYRICS
        else:
            lyrics = f"\"{_shorten(first.lyrics, 40)}\""
        source = _SOURCE_WORDS.get(first.lyrics_source, f"(from {first.lyrics_source})")
        out.append(f"{pad}lyrics   {lyrics}  {source}")
        notes = [n for e in entries for n in e.notes]
        notes = [n for i, n in enumerate(notes) if n not in notes[:i]]
        if notes:
            out.append(f"{pad}notes    " + "; ".join(notes))
    return "\n".join(out)


def _cached_metadata(path: str, key: str) -> Optional[dict]:
    """The metadata of a complete tensor file made from exactly this input, else None (missing, stale, damaged:
    it is then encoded again and replaced atomically)."""
    if not os.path.isfile(path):
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    meta = data.get("metadata", {})
    return meta if meta.get("cache_key") == key and all(k in data for k in TENSOR_KEYS) else None


class _Models:
    """VAE, text encoder and condition encoder, loaded once per run on the chosen device."""

    def __init__(self, settings: PrepareSettings, source: ModelSource, device: torch.device, dtype: torch.dtype):
        self.settings, self.device, self.dtype = settings, device, dtype
        self.vae = source.load_vae(device=device, dtype=dtype, decoder=False)  # encodes only
        self.text = source.load_text_encoder(device=device, dtype=dtype)
        self.dit = source.load_dit(("encoder",), device=device, dtype=dtype)
        self.silence = source.load_silence_latent(device=device, dtype=dtype)

    @torch.no_grad()
    def encode(self, piece: _Piece, waveform: torch.Tensor, rate: int) -> dict:
        """The tensors of one training sample from its decoded audio ([C, N] at ``rate``, already windowed)."""
        src = piece.source
        audio = audio_io.to_stereo_48k(waveform, rate, self.vae.sample_rate)
        duration = audio.shape[-1] / self.vae.sample_rate
        posterior = self.vae.encode_tiled(audio.unsqueeze(0), self.settings.vae_chunk_seconds,
                                          self.settings.vae_overlap_seconds)
        generator = torch.Generator().manual_seed(piece.seed)
        latents = posterior.sample(generator)[0].transpose(0, 1)  # (T, 64)
        frames = latents.shape[0]

        prompt = caption_prompt(src.caption, piece.bpm, src.timesignature, src.keyscale, duration)
        text, text_mask = self.text.encode_caption(prompt)
        lyric, lyric_mask = self.text.embed_lyrics(lyrics_prompt(src.lyrics, prompt_language(src.language)))
        cfg = self.dit.config
        timbre = self.silence[:, : cfg.timbre_fix_frame]  # "no reference audio", as inference passes it
        states, mask = self.dit.encoder(
            text_hidden_states=text.to(self.dtype), text_attention_mask=text_mask.to(self.dtype),
            lyric_hidden_states=lyric.to(self.dtype), lyric_attention_mask=lyric_mask.to(self.dtype),
            refer_audio_acoustic_hidden_states_packed=timbre,
            refer_audio_order_mask=torch.zeros(1, dtype=torch.long, device=self.device))
        return {
            "target_latents": latents.to(self.dtype).cpu(),
            "attention_mask": torch.ones(frames, dtype=self.dtype),
            "encoder_hidden_states": states[0].to(self.dtype).cpu(),
            "encoder_attention_mask": mask[0].cpu(),
            "context_latents": context_latents_for(self.silence, frames).to(self.dtype).cpu(),
            "metadata": {
                "audio_path": src.item.path or "", "filename": os.path.basename(src.item.path or src.item.name),
                "caption": src.caption, "lyrics": src.lyrics, "duration": round(duration, 3), "frames": frames,
                "duration_total": round(src.total_frames / src.rate, 3), "segment": piece.index,
                "segments": piece.count, "offset": round(piece.start / src.rate, 3),
                "bpm": piece.bpm, "bpm_source": piece.bpm_source or UNKNOWN, "bpm_note": piece.bpm_note,
                "keyscale": src.keyscale,
                "timesignature": src.timesignature, "language": src.language,
                "is_instrumental": src.lyrics == INSTRUMENTAL_LYRICS, "cache_key": piece.key,
                "config_path": self.settings.config_path, "preprocess_version": PREPROCESS_VERSION,
                "text_prompt": prompt,
            },
        }
