"""The caption and lyric prompts, byte for byte as the official text2music inference builds them (spec §3.1).

Training on exactly the strings a generation node builds is what makes the LoRA respond to the same captions:
- caption: ``SFT_GEN_PROMPT`` with the text2music instruction and the metas block (handler ``_dict_to_meta_string``);
- lyrics: ``"# Languages\\n{language}\\n\\n# Lyric\\n{lyrics}<|endoftext|>"`` (handler ``_format_lyrics``).
"""
from __future__ import annotations

from typing import Optional

DEFAULT_DIT_INSTRUCTION = "Fill the audio semantic mask based on the given conditions:"
SFT_GEN_PROMPT = "# Instruction\n{}\n\n# Caption\n{}\n\n# Metas\n{}<|endoftext|>\n"
LYRIC_PROMPT = "# Languages\n{}\n\n# Lyric\n{}<|endoftext|>"
CAPTION_MAX_TOKENS = 256  # inference truncates the caption prompt here
LYRIC_MAX_TOKENS = 2048


def metas_block(bpm: Optional[int], timesignature: str, keyscale: str, duration_seconds: float) -> str:
    return (f"- bpm: {bpm if bpm else 'N/A'}\n"
            f"- timesignature: {timesignature if timesignature else 'N/A'}\n"
            f"- keyscale: {keyscale if keyscale else 'N/A'}\n"
            f"- duration: {int(duration_seconds)} seconds\n")


def caption_prompt(caption: str, bpm: Optional[int], timesignature: str, keyscale: str,
                   duration_seconds: float) -> str:
    return SFT_GEN_PROMPT.format(DEFAULT_DIT_INSTRUCTION, caption,
                                 metas_block(bpm, timesignature, keyscale, duration_seconds))


def lyrics_prompt(lyrics: str, language: str) -> str:
    return LYRIC_PROMPT.format(language, lyrics)


def apply_custom_tag(caption: str, tag: str, position: str) -> str:
    """Official ``get_training_prompt``: "tag, caption" (prepend), "caption, tag" (append) or the tag alone."""
    tag = (tag or "").strip()
    if not tag:
        return caption
    if position == "prepend":
        return f"{tag}, {caption}" if caption else tag
    if position == "append":
        return f"{caption}, {tag}" if caption else tag
    if position == "replace":
        return tag
    raise ValueError(f"tag_position '{position}' is not one of append, prepend, replace.")
