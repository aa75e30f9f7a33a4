"""Normalise the metadata people type (key, language, time signature, bpm) to the official vocabularies.

The official vocabularies (acestep/constants.py): keyscale "<note><accidental> major|minor" (e.g. "C major",
"F# minor", "Bb major"), time signatures 2/3/4/6, and the language codes below. We accept the common spellings
("C Major", "Am", "F#m", "c#min", "4/4") and store one canonical form, so the prompt the model is trained on is
the prompt a generation node will build.
"""
from __future__ import annotations

import math
import re
from typing import Optional

LANGUAGES = (
    "ar", "az", "bg", "bn", "ca", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fr", "he", "hi", "hr", "ht",
    "hu", "id", "is", "it", "ja", "ko", "la", "lt", "ms", "ne", "nl", "no", "pa", "pl", "pt", "ro", "ru", "sa",
    "sk", "sr", "sv", "sw", "ta", "te", "th", "tl", "tr", "uk", "ur", "vi", "yue", "zh", "unknown",
)
# Offered in the node's dropdown: "instrumental" is the seed's choice for songs without vocals.
LANGUAGE_CHOICES = ("instrumental",) + LANGUAGES
TIME_SIGNATURES = ("2", "3", "4", "6")
BPM_RANGE = (30, 300)
INSTRUMENTAL_LYRICS = "[Instrumental]"

_KEY_RE = re.compile(r"^\s*([A-G])\s*(#|b|♯|♭|sharp|flat)?[\s-]*(major|minor|maj|min|m)?\s*$", re.IGNORECASE)
_ACCIDENTALS = {"#": "#", "♯": "#", "sharp": "#", "b": "b", "♭": "b", "flat": "b", None: ""}

KEYSCALE_FORMS = 'a note A-G, optional # or b, then major/minor: "C major", "F# minor", "Bb major", "Am", "F#m"'


def normalize_keyscale(value: Optional[str]) -> str:
    """'C Major' / 'c maj' / 'C' -> 'C major'; 'Am' / 'a minor' / 'A min' -> 'A minor'; '' -> '' (unknown)."""
    text = (value or "").strip()
    if text == "" or text.upper() in ("N/A", "NONE", "UNKNOWN"):
        return ""
    m = _KEY_RE.match(text)
    if not m:
        raise ValueError(f"keyscale '{value}' is not a key this pack understands. Use {KEYSCALE_FORMS}, "
                         "or leave it empty if unknown.")
    note, accidental, mode = m.groups()
    accidental = accidental.lower() if accidental and accidental not in ("b", "B") else accidental
    if accidental == "B":  # "BB" is not a key; only a lowercase b is a flat sign
        raise ValueError(f"keyscale '{value}' is not a key this pack understands. Use {KEYSCALE_FORMS}.")
    # "m"/"min"/"minor" is minor; a lone capital "M" (as in "CM"), "maj"/"major" or nothing is major.
    minor = mode is not None and mode != "M" and mode.lower() in ("m", "min", "minor")
    return f"{note.upper()}{_ACCIDENTALS[accidental]} {'minor' if minor else 'major'}"


def normalize_language(value: Optional[str]) -> str:
    text = (value or "").strip().lower()
    if text in ("", "none"):
        return "unknown"
    if text in LANGUAGE_CHOICES:
        return text
    raise ValueError(f"language '{value}' is not one of the ACE-Step language codes: "
                     f"{', '.join(LANGUAGE_CHOICES)}.")


def prompt_language(language: str) -> str:
    """Language as the official lyric prompt spells it ('instrumental' is not an official code)."""
    return "unknown" if language == "instrumental" else language


def normalize_timesignature(value) -> str:
    """'4/4' / '4' / 4 -> '4'; '6/8' -> '6'; '' -> '' (unknown). The official prompt writes the beats only."""
    if value is None:
        return ""
    text = str(value).strip()
    if text == "" or text.upper() in ("N/A", "NONE", "0"):
        return ""
    beats = text.split("/")[0].strip()
    if beats in TIME_SIGNATURES:
        return beats
    raise ValueError(f"timesignature '{value}' is not supported; use one of 2/4, 3/4, 4/4, 6/8 "
                     "(or 2, 3, 4, 6), or leave it empty if unknown.")


def normalize_bpm(value) -> Optional[int]:
    """None/0/'' -> None (unknown); otherwise an int in 30..300 (the official range)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text == "" or text.upper() in ("N/A", "NONE", "AUTO"):
            return None
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"bpm '{value}' is not a number; type a tempo such as 120, or 0 to detect it.") from None
    if isinstance(value, float) and math.isnan(value):
        return None
    bpm = int(round(float(value)))
    if bpm == 0:
        return None
    if not BPM_RANGE[0] <= bpm <= BPM_RANGE[1]:
        raise ValueError(f"bpm {value} is outside {BPM_RANGE[0]}-{BPM_RANGE[1]}; type the song's tempo, "
                         "or 0 to detect it.")
    return bpm


def normalize_lyrics(value: Optional[str]) -> str:
    text = (value or "").strip()
    return text if text else INSTRUMENTAL_LYRICS
