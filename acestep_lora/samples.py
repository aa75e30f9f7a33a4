"""Training samples on disk: create one (audio + JSON sidecar), collect a folder of them.

A sample is an audio file plus its metadata. ``create_sample`` writes ``<slug>_<id>.flac`` (lossless, original
sample rate and channels; 32-bit float ``.wav`` instead when the peak exceeds 1.0, which FLAC would clip) and then
``<slug>_<id>.json``; the sidecar is written last, so its presence marks a complete sample.

Identity: ``id`` = first 12 hex digits of sha256 over the waveform (float32 bytes and shape), the sample rate and the
normalised metadata given by the user (caption, lyrics, bpm as typed or null when it is to be detected, keyscale,
language, timesignature). Creating the same sample again writes nothing and reports ``"exists"``; any change to the
audio or the metadata gives a new id and new files, so an existing sample is never overwritten.

``collect_samples`` reads the sidecar convention (``SIDECAR_HELP``) so a plain folder of songs works too, and
records where each caption and lyrics text came from, with a note wherever it had to guess (a caption taken from
the file name, a ``<name>.txt`` that looks like a caption but is read as lyrics).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Optional
from collections.abc import Iterable

import torch

from . import metadata
from .audio import AUDIO_EXTENSIONS, check_waveform, save_flac
from .fileio import atomic_path, atomic_write_json

FORMAT = "acestep-lora-sample"
FORMAT_VERSION = 1
SLUG_MAX = 40
ID_LENGTH = 12

# Alternative JSON keys accepted by collect (first found wins), ours first.
_KEYS = {
    "caption": ("caption", "prompt", "tags"),
    "lyrics": ("lyrics",),
    "bpm": ("bpm", "tempo"),
    "keyscale": ("keyscale", "key", "key_scale"),
    "language": ("language", "vocal_language"),
    "timesignature": ("timesignature", "time_signature"),
}


# The sidecar convention, for audio file <name>.<ext> (quoted by the CLI's --help and the node docs).
SIDECAR_HELP = """\
Metadata next to each audio file <name>.<ext>:
  <name>.json          caption, lyrics, bpm, keyscale, language, timesignature (also accepted: prompt/tags,
                       tempo, key, time_signature, vocal_language); ACE-Step Create Training Sample writes it
  <name>_caption.txt   the caption (<name>_prompt.txt also works); wins over the JSON caption
  <name>_lyrics.txt    the lyrics; wins over <name>.txt and the JSON lyrics
  <name>.txt           the lyrics (the official ACE-Step convention); wins over the JSON lyrics
Without a caption the file name is used, and Prepare flags it. Without lyrics: [Instrumental]."""

# Where a caption / lyrics / tempo came from (besides sidecar file names such as "song.json", "song.txt").
FROM_FILE_NAME = "file name"
TYPED = "typed"
NO_LYRICS = "none → [Instrumental]"
DETECTED_BY_CREATE = "detected (Create)"
NOTE_FILE_NAME_CAPTION = "caption from file name"


@dataclass
class Sample:
    """One collected training sample, metadata normalised (see acestep_lora/metadata.py)."""
    audio_path: str            # absolute path
    caption: str
    lyrics: str                # "[Instrumental]" when there are none
    bpm: Optional[int]         # None = unknown
    keyscale: str              # "C major" / "F# minor" or "" (unknown)
    language: str              # a code from metadata.LANGUAGE_CHOICES
    timesignature: str         # "2" / "3" / "4" / "6" or "" (unknown)
    sample_id: str = ""        # the sidecar's id for samples written by create_sample, else ""
    caption_source: str = ""   # the sidecar file it came from ("song.json", "song_caption.txt") or FROM_FILE_NAME
    lyrics_source: str = ""    # "song_lyrics.txt", "song.txt", "song.json" or NO_LYRICS
    bpm_source: str = ""       # TYPED, DETECTED_BY_CREATE (Create measured it), or "" when unknown
    notes: list = field(default_factory=list)  # what the musician should check, e.g. NOTE_FILE_NAME_CAPTION


# ----------------------------------------------------------------------------------------------------- create

def slugify(text: str, limit: int = SLUG_MAX) -> str:
    """'Upbeat Pop, synth leads!' -> 'upbeat_pop_synth_leads' (letters of any script kept; 'sample' if none)."""
    text = unicodedata.normalize("NFKC", text).lower()
    slug = re.sub(r"[\W_]+", "_", text).strip("_")
    return slug[:limit].strip("_") or "sample"


def sample_id(waveform: torch.Tensor, sample_rate: int, fields: dict) -> str:
    """First 12 hex digits of sha256(waveform float32 bytes + shape + sample rate + normalised user metadata)."""
    wave = waveform.detach().to("cpu", torch.float32).contiguous()
    header = {"format": FORMAT, "shape": list(wave.shape), "sample_rate": int(sample_rate), **fields}
    h = hashlib.sha256(json.dumps(header, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    h.update(wave.numpy().astype("<f4", copy=False).tobytes())
    return h.hexdigest()[:ID_LENGTH]


def _as_channels_first(waveform, name: str = "audio") -> torch.Tensor:
    wave = torch.as_tensor(waveform).detach().to("cpu", torch.float32)
    if wave.dim() == 1:
        wave = wave.unsqueeze(0)
    elif wave.dim() == 3 and wave.shape[0] == 1:
        wave = wave[0]
    if wave.dim() != 2:
        raise ValueError(f"{name}: expected a waveform [channels, samples], got shape {tuple(wave.shape)}. "
                         "For a batch, create one sample per item.")
    return wave.contiguous()


def _user_fields(caption, lyrics, bpm, keyscale, language, timesignature) -> dict:
    caption = (caption or "").strip()
    if not caption:
        raise ValueError("caption is empty. Describe the music in a few words (genre, instruments, mood, e.g. "
                         "'upbeat electronic pop, synth leads, female vocals'); it is the text the LoRA learns "
                         "to associate with this audio.")
    return {
        "caption": caption,
        "lyrics": metadata.normalize_lyrics(lyrics),
        "bpm": metadata.normalize_bpm(bpm),
        "keyscale": metadata.normalize_keyscale(keyscale),
        "language": metadata.normalize_language(language),
        "timesignature": metadata.normalize_timesignature(timesignature),
    }


def detect_tempo(waveform: torch.Tensor, sample_rate: int) -> tuple[Optional[int], str, Optional[str]]:
    """-> (bpm, "detected" | "unknown", note). Detection failures leave the bpm unknown; they are not errors."""
    from . import bpm as bpm_module  # lazy: pulls in torchaudio

    try:
        value = float(bpm_module.detect_bpm(waveform, sample_rate))
    except ValueError as e:
        return None, "unknown", (f"bpm could not be detected ({e}); stored as unknown. Type the tempo in the bpm "
                                 "input to set it.")
    lo, hi = metadata.BPM_RANGE
    if math.isnan(value) or not lo <= round(value) <= hi:
        return None, "unknown", (f"detected bpm {value} is outside {lo}-{hi}; stored as unknown. Type the tempo "
                                 "in the bpm input to set it.")
    return int(round(value)), "detected", None


def _json_object(path: str, encoding: str = "utf-8") -> dict:
    """A JSON file holding one object; anything else raises ValueError saying what is wrong."""
    try:
        with open(path, encoding=encoding) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"it holds a JSON {type(data).__name__}, not an object such as "
                         '{"caption": "...", "bpm": 120}')
    return data


def _read_sidecar(path: str) -> dict:
    try:
        return _json_object(path)
    except ValueError as e:
        raise ValueError(f"sample sidecar '{path}' exists but cannot be read ({e}). It was not overwritten. Fix "
                         "or delete it (together with its audio file) and run again.") from e


def _info(sidecar: dict, audio_path: str, sidecar_path: str, status: str, note: Optional[str] = None) -> dict:
    info = dict(sidecar)
    info.update(audio_path=os.path.abspath(audio_path), sidecar_path=os.path.abspath(sidecar_path), status=status)
    if note:
        info["note"] = note
    return info


def _write_audio(path: str, wave: torch.Tensor, sample_rate: int) -> None:
    if path.endswith(".flac"):
        save_flac(path, wave, sample_rate)
        return
    import soundfile as sf

    with atomic_path(path) as tmp:
        sf.write(tmp, wave.T.contiguous().numpy(), sample_rate, format="WAV", subtype="FLOAT")


def create_sample(waveform, sample_rate: int, caption: str, output_dir: str, lyrics: str = "[Instrumental]",
                  bpm=0, keyscale: str = "", language: str = "instrumental", timesignature: str = "") -> dict:
    """Save one training sample (audio + JSON sidecar) into ``output_dir``; returns the sidecar content plus
    ``audio_path``, ``sidecar_path``, ``status`` ("created" | "exists") and, if bpm detection failed, ``note``.

    ``waveform`` is [channels, samples] (or [samples]); ``bpm`` 0 means detect it.
    """
    wave = _as_channels_first(waveform)
    sample_rate = int(sample_rate)
    check_waveform(wave, sample_rate, "audio")
    fields = _user_fields(caption, lyrics, bpm, keyscale, language, timesignature)
    sid = sample_id(wave, sample_rate, fields)

    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    base = os.path.join(output_dir, f"{slugify(fields['caption'])}_{sid}")
    sidecar_path = base + ".json"
    peak = float(wave.abs().max())
    audio_path = base + (".wav" if peak > 1.0 else ".flac")  # FLAC is integer PCM and would clip above 1.0

    if os.path.exists(sidecar_path):
        existing = _read_sidecar(sidecar_path)
        if existing.get("id") != sid:
            raise ValueError(f"sample sidecar '{sidecar_path}' has id {existing.get('id')!r}, expected {sid!r} "
                             "(it was edited or belongs to another sample). It was not overwritten. Restore it, "
                             "or delete it together with its audio file and run again.")
        existing_audio = os.path.join(output_dir, existing.get("audio_file") or os.path.basename(audio_path))
        if os.path.isfile(existing_audio):
            return _info(existing, existing_audio, sidecar_path, "exists")
        # The sidecar survived but its audio was deleted: the id pins the content, so re-writing it is safe.
        _write_audio(existing_audio, wave, sample_rate)
        return _info(existing, existing_audio, sidecar_path, "created",
                     "the audio file was missing and has been written again")

    if fields["bpm"] is not None:
        bpm_value, bpm_source, note = fields["bpm"], "user", None
    else:
        bpm_value, bpm_source, note = detect_tempo(wave, sample_rate)

    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "id": sid,
        "audio_file": os.path.basename(audio_path),
        "caption": fields["caption"],
        "lyrics": fields["lyrics"],
        "bpm": bpm_value,
        "bpm_source": bpm_source,
        "keyscale": fields["keyscale"],
        "language": fields["language"],
        "timesignature": fields["timesignature"],
        "duration": wave.shape[-1] / sample_rate,
        "sample_rate": sample_rate,
        "channels": int(wave.shape[0]),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    # Audio first, sidecar last: a sidecar on disk always has its complete audio next to it.
    _write_audio(audio_path, wave, sample_rate)
    atomic_write_json(sidecar_path, sidecar)
    return _info(sidecar, audio_path, sidecar_path, "created", note)


# ----------------------------------------------------------------------------------------------------- collect

def _skipped_name(name: str) -> bool:
    """Hidden and temporary files (our own atomic writes use '.<name>.<random>.tmp')."""
    return name.startswith((".", "~")) or name.endswith(("~", ".tmp", ".part"))


def _walk(root: str) -> Iterable[str]:
    """Every non-hidden file under ``root``, as paths relative to it, in sorted order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skipped_name(d))
        for name in filenames:
            if not _skipped_name(name):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found, key=lambda p: p.split(os.sep))


def _resolve_dir(samples_dir: str) -> str:
    if not (samples_dir or "").strip():
        raise ValueError("samples_dir is empty. Type the folder that holds your training samples (the Create "
                         "Training Sample node's output_dir).")
    return os.path.abspath(os.path.expanduser(samples_dir.strip()))


def _read_text(path: str) -> Optional[str]:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read '{path}' ({e}). Save it as UTF-8 text.") from e


def _read_json_metadata(path: str) -> dict:
    try:
        data = _json_object(path, encoding="utf-8-sig")
    except ValueError as e:
        raise ValueError(f"metadata file '{path}': {e}. Fix it, or delete it to use the file name as the "
                         "caption.") from e
    out = {}
    for name, keys in _KEYS.items():
        for key in keys:
            if key in data and data[key] is not None:
                value = data[key]
                if name == "caption" and isinstance(value, list):  # "tags": ["pop", "synth"]
                    value = ", ".join(str(v) for v in value)
                out[name] = value
                break
    for key in ("id", "bpm_source"):
        if isinstance(data.get(key), str):
            out[key] = data[key]
    return out


def _normalised(name: str, value, source: str):
    normalise = {"bpm": metadata.normalize_bpm, "keyscale": metadata.normalize_keyscale,
                 "language": metadata.normalize_language, "timesignature": metadata.normalize_timesignature}[name]
    try:
        return normalise(value)
    except ValueError as e:
        raise ValueError(f"'{source}', field '{name}': {e}") from e


_SECTION_TAG = re.compile(r"\[[^\]\n]{1,40}\]")  # [Verse], [Chorus], [Instrumental] ...


def looks_like_caption(text: str) -> bool:
    """True for text that reads like a caption rather than lyrics: one line without [Verse]-style section tags
    (lyrics have line breaks and usually section tags; captions are one line of comma-separated tags)."""
    text = text.strip()
    return bool(text) and "\n" not in text and len(text) <= 300 and not _SECTION_TAG.search(text)


def txt_lyrics_note(audio_name: str) -> str:
    stem = os.path.splitext(audio_name)[0]
    return (f"{stem}.txt is read as LYRICS (official convention); if it is a caption, rename it "
            f"{stem}_caption.txt")


def _first_text(candidates: list[str]) -> tuple[Optional[str], str]:
    """The first of ``candidates`` (paths) that exists with non-blank text -> (text, its file name)."""
    for path in candidates:
        text = _read_text(path)
        if text is not None and text.strip():
            return text, os.path.basename(path)
    return None, ""


def read_sample(path: str) -> Sample:
    """One audio file's metadata by the sidecar convention (``SIDECAR_HELP``), with sources and notes."""
    stem = os.path.splitext(path)[0]
    name = os.path.basename(path)
    json_path = stem + ".json"
    data = _read_json_metadata(json_path) if os.path.isfile(json_path) else {}
    json_name = os.path.basename(json_path)
    notes = []

    caption, caption_source = _first_text([stem + "_caption.txt", stem + "_prompt.txt"])
    if caption is None and str(data.get("caption") or "").strip():
        caption, caption_source = str(data["caption"]), json_name
    if caption is None:
        caption, caption_source = os.path.basename(stem).replace("_", " ").strip(), FROM_FILE_NAME
        notes.append(NOTE_FILE_NAME_CAPTION)

    lyrics, lyrics_source = _first_text([stem + "_lyrics.txt", stem + ".txt"])
    if lyrics is None and str(data.get("lyrics") or "").strip():
        lyrics, lyrics_source = str(data["lyrics"]), json_name
    if lyrics_source == os.path.basename(stem) + ".txt" and looks_like_caption(lyrics):
        notes.append(txt_lyrics_note(name))
    lyrics = metadata.normalize_lyrics(lyrics)
    lyrics_source = lyrics_source or NO_LYRICS

    if "language" in data:
        language = _normalised("language", data["language"], json_path)
    else:  # not given anywhere: instrumental when there are no lyrics
        language = "instrumental" if lyrics == metadata.INSTRUMENTAL_LYRICS else "unknown"
    bpm = _normalised("bpm", data.get("bpm"), json_path)
    bpm_source = "" if bpm is None else DETECTED_BY_CREATE if data.get("bpm_source") == "detected" else TYPED

    return Sample(
        audio_path=os.path.abspath(path),
        caption=caption.strip(),
        lyrics=lyrics,
        bpm=bpm,
        keyscale=_normalised("keyscale", data.get("keyscale"), json_path),
        language=language,
        timesignature=_normalised("timesignature", data.get("timesignature"), json_path),
        sample_id=data.get("id", ""),
        caption_source=caption_source,
        lyrics_source=lyrics_source,
        bpm_source=bpm_source,
        notes=notes,
    )


def collect_samples(samples_dir: str, *, as_typed: Optional[str] = None) -> list[Sample]:
    """Every audio file under ``samples_dir`` (recursive, sorted) with its metadata.

    Metadata per audio file ``<name>.<ext>`` (``SIDECAR_HELP``): ``<name>.json`` (our sidecar, or keys
    prompt/tags, key, time_signature, vocal_language, tempo); ``<name>_caption.txt`` (or ``<name>_prompt.txt``)
    = caption, wins over the JSON; ``<name>_lyrics.txt`` = lyrics, wins over ``<name>.txt`` = lyrics (the official
    convention), which wins over the JSON. Without a caption the file name is used ("my_song" -> "my song") and
    the sample carries the note "caption from file name"; a ``<name>.txt`` that looks like a caption (one line, no
    [Verse]-style tags) is still read as lyrics, with a note saying so. Without a language: "instrumental" when
    there are no lyrics, else "unknown". ``as_typed``: the folder as the user typed it, for error messages (when
    ``samples_dir`` was already resolved, e.g. under ComfyUI's output folder).
    """
    root = _resolve_dir(samples_dir)
    shown = samples_dir if as_typed is None else as_typed
    if not os.path.exists(root):
        raise FileNotFoundError(f"samples_dir '{shown}' does not exist (resolved to '{root}'). Create "
                                "samples there with ACE-Step Create Training Sample, or type the folder that holds "
                                "your audio files.")
    if not os.path.isdir(root):
        raise ValueError(f"samples_dir '{shown}' is a file, not a folder (resolved to '{root}'). Type the "
                         "folder that holds your audio files.")
    audio = [p for p in _walk(root) if os.path.splitext(p)[1].lower() in AUDIO_EXTENSIONS]
    if not audio:
        raise ValueError(f"samples_dir '{shown}' (resolved to '{root}') contains no audio files. Accepted "
                         f"extensions: {', '.join(AUDIO_EXTENSIONS)}. Add audio there, or create samples with "
                         "ACE-Step Create Training Sample.")
    return [read_sample(os.path.join(root, p)) for p in audio]


def folder_fingerprint(samples_dir: str) -> str:
    """Hash of the names, sizes and modification times of every file under ``samples_dir`` (for IS_CHANGED).

    Never raises: a missing or unreadable folder gets a fingerprint of its own, and collect reports the error.
    """
    try:
        root = _resolve_dir(samples_dir)
    except ValueError:
        return "empty-path"
    if not os.path.isdir(root):
        return "missing:" + root
    h = hashlib.sha256(root.encode("utf-8"))
    for rel in _walk(root):
        try:
            st = os.stat(os.path.join(root, rel))
        except OSError:
            continue
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------- chaining

def parse_sample_info(text: Optional[str], name: str) -> Optional[dict]:
    """The ``sample_info`` JSON a Create node outputs -> dict with ``chain`` (ids) and ``chain_dirs``; None if empty."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("chain"), list) \
            or not all(isinstance(i, str) for i in info["chain"]):
        raise ValueError(f"{name}: expected the sample_info output of an ACE-Step Create Training Sample node "
                         f"(JSON with a 'chain' list), got {text[:80]!r}. Connect that output here, or disconnect it.")
    info.setdefault("chain_dirs", [])
    return info


def extend_chain(previous: Optional[dict], infos: list[dict]) -> tuple[list[str], list[str]]:
    """Upstream chain + this node's samples -> (ids, folders), first occurrence order, no duplicates."""
    ids = list(previous["chain"]) if previous else []
    dirs = list(previous.get("chain_dirs", [])) if previous else []
    for info in infos:
        if info["id"] not in ids:
            ids.append(info["id"])
        folder = os.path.dirname(info["sidecar_path"])
        if folder not in dirs:
            dirs.append(folder)
    return ids, dirs


def check_chain(samples: list[Sample], chain: dict, samples_dir: str, *, as_typed: Optional[str] = None) -> None:
    """Every sample the connected Create chain made must be among ``samples``; else name both folders."""
    present = {s.sample_id for s in samples if s.sample_id}
    missing = [i for i in chain["chain"] if i not in present]
    if missing:
        shown = samples_dir if as_typed is None else as_typed
        saved_in = ", ".join(f"'{d}'" for d in chain.get("chain_dirs", [])) or "another folder"
        raise ValueError(f"sample_info: {len(missing)} of the {len(chain['chain'])} samples made by the connected "
                         f"Create Training Sample chain (ids {', '.join(missing)}) are not in samples_dir "
                         f"'{shown}' (resolved to '{_resolve_dir(samples_dir)}'); they were saved in "
                         f"{saved_in}. Set samples_dir to the Create nodes' output_dir (or a folder above it).")
