"""Lists carried in one STRING socket (the seed's Collect -> Prepare wiring).

Collect emits JSON arrays, which survive captions and lyrics containing commas and newlines. Prepare accepts those
and the plain comma-separated form a person types (``120,128,90``), and checks the counts.
"""
from __future__ import annotations

import json
from typing import Optional


def encode_list(values: list) -> str:
    return json.dumps(["" if v is None else v for v in values], ensure_ascii=False)


def parse_list(text: Optional[str], name: str) -> list[str]:
    """A JSON array (as Collect writes it) or comma-separated values; empty input gives []."""
    text = (text or "").strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None  # e.g. "[Instrumental],[Instrumental]": the typed form, not JSON
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) or v is None for v in value):
            return ["" if v is None else str(v) for v in value]
    return [part.strip() for part in text.split(",")]


def fit_list(values: list[str], count: int, name: str, default: str = "") -> list[str]:
    """Match a metadata list to ``count`` audio files: empty -> all default, one value -> repeated."""
    if not values:
        return [default] * count
    if len(values) == 1 and count > 1:
        return values * count
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries but there are {count} audio files. Give one entry per "
                         "audio file (JSON array or comma-separated), a single entry for all, or leave it empty. "
                         "If your text contains commas, use a JSON array such as [\"a, b\", \"c\"].")
    return values
