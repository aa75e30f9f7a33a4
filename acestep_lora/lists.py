"""Lists carried in one STRING socket: Collect -> Prepare wiring, and what people type into Prepare's boxes.

ACE-Step captions ("rock, loud guitars, female vocals") and lyrics are full of commas, so they are never split at
commas by surprise. The rules, one per kind of input (the node tooltips and docs quote the ``*_RULE`` texts):

* captions: a JSON array (what Collect outputs) gives one caption per element; otherwise several non-empty lines
  give one caption per line; a single line is one caption for every file, except the seed's comma form
  ``Pop,Rock,Jazz``, accepted only when it is unambiguous: more than one file, as many comma-separated parts as
  files, and no comma followed by a space (captions separate their tags with ", ").
* lyrics: a JSON array, or blocks separated by a line holding only ``---``, or one text for every file (never split
  at commas or line breaks); plus the same unambiguous seed comma form (``[Instrumental],[Instrumental]``).
* audio files, bpm, key, language, time signature (values never contain commas): a JSON array, one per line, or
  comma-separated.

Everywhere a single entry applies to every file and an empty box means "unknown" (no caption, instrumental).
"""
from __future__ import annotations

import json
import re
from typing import Optional

CAPTIONS_RULE = ("one caption per line, or a JSON array; a single line is the caption of every file (commas "
                 "inside it are kept); 'a,b,c' without spaces after the commas is split only when it has exactly "
                 "one part per file")
LYRICS_RULE = ("a JSON array, or one block per file separated by a line holding only ---; a single text is used "
               "for every file (never split at commas or line breaks); '[Instrumental],[Instrumental]' without "
               "spaces is split only when it has exactly one part per file")
VALUES_RULE = "a JSON array, one per line, or comma-separated; a single value applies to every file"
BLOCK_SEPARATOR = re.compile(r"^[ \t]*---[ \t]*$", re.MULTILINE)


def encode_list(values: list) -> str:
    return json.dumps(["" if v is None else v for v in values], ensure_ascii=False)


def _json_array(text: str) -> Optional[list[str]]:
    """The elements of ``text`` when it is a JSON array of scalars, else None ("[Verse]..." is not JSON)."""
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) or v is None for v in value):
        return ["" if v is None else str(v) for v in value]
    return None


def parse_list(text: Optional[str], name: str) -> list[str]:
    """Values that never contain commas (audio paths, bpm, key, language, time signature): a JSON array, one per
    line, or comma-separated. Empty input gives []."""
    text = (text or "").strip()
    if not text:
        return []
    array = _json_array(text)
    if array is not None:
        return array
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        return lines
    return [part.strip() for part in text.split(",")]


def _files(count: int) -> str:
    return "there is 1 audio file" if count == 1 else f"there are {count} audio files"


def fit_list(values: list[str], count: int, name: str, default: str = "", rule: str = VALUES_RULE) -> list[str]:
    """Match a list to ``count`` audio files: empty -> all default, one value -> repeated."""
    if not values:
        return [default] * count
    if len(values) == 1 and count > 1:
        return values * count
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries but {_files(count)}. Give one entry per "
                         f"audio file, a single entry for all, or leave it empty. The rule for {name}: {rule}.")
    return values


def _seed_comma_form(line: str, count: int, name: str, rule: str) -> Optional[list[str]]:
    """The seed's 'a,b,c' (one part per file, no space after any comma) -> its parts; None when the line is one
    text. A line in that form with the wrong number of parts is ambiguous and raises."""
    if count < 2 or "," not in line or re.search(r",\s", line):
        return None
    parts = [part.strip() for part in line.split(",")]
    if len(parts) == count:
        return parts
    raise ValueError(f"{name} has {len(parts)} entries but {_files(count)}: {line[:80]!r} looks "
                     f"like the comma-separated form (no space after the commas). If it is one text for every "
                     f"file, write ', ' (comma and space) between its parts; otherwise give {count} entries. The "
                     f"rule for {name}: {rule}.")


def parse_captions(text: Optional[str], count: int, name: str = "captions") -> tuple[list[str], Optional[str]]:
    """-> (one caption per file, a note for the status when the seed's comma form was split)."""
    text = (text or "").strip()
    if not text:
        return [""] * count, None
    array = _json_array(text)
    if array is not None:
        return fit_list(array, count, name, rule=CAPTIONS_RULE), None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and count > 1:
        return fit_list(lines, count, name, rule=CAPTIONS_RULE), None
    if len(lines) == 1:
        parts = _seed_comma_form(lines[0], count, name, CAPTIONS_RULE)
        if parts is not None:
            return parts, f"{name}: split at commas into {count} (one per file)"
    return [text] * count, None


def parse_lyrics(text: Optional[str], count: int, name: str = "lyrics_list") -> tuple[list[str], Optional[str]]:
    """-> (one lyrics text per file, a note for the status when the seed's comma form was split)."""
    text = (text or "").strip()
    if not text:
        return [""] * count, None
    array = _json_array(text)
    if array is not None:
        return fit_list(array, count, name, rule=LYRICS_RULE), None
    blocks = [block.strip() for block in BLOCK_SEPARATOR.split(text)]
    if len(blocks) > 1 and count > 1:
        return fit_list(blocks, count, name, rule=LYRICS_RULE), None
    if "\n" not in text:
        parts = _seed_comma_form(text, count, name, LYRICS_RULE)
        if parts is not None:
            return parts, f"{name}: split at commas into {count} (one per file)"
    return [text] * count, None


def metadata_lists(raw: dict, count: int) -> tuple[dict, list[str]]:
    """Prepare's six metadata boxes -> ({input name: one entry per file}, notes for the status)."""
    notes = []
    captions, note = parse_captions(raw.get("captions"), count)
    notes += [note] if note else []
    lyrics, note = parse_lyrics(raw.get("lyrics_list"), count)
    notes += [note] if note else []
    out = {"captions": captions, "lyrics_list": lyrics}
    for name in ("bpm_list", "keyscale_list", "language_list", "timesignature_list"):
        out[name] = fit_list(parse_list(raw.get(name), name), count, name)
    return out, notes
