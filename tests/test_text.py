"""Caption and lyric prompts are the official inference strings; the encoders follow the official calls."""
import torch

from acestep_lora import load_text_encoder
from acestep_lora.prompts import apply_custom_tag, caption_prompt, lyrics_prompt

import pytest


def test_caption_prompt_matches_official_inference_string():
    assert caption_prompt("Electronic pop with synth", 120, "4", "C major", 30.9) == (
        "# Instruction\nFill the audio semantic mask based on the given conditions:\n\n"
        "# Caption\nElectronic pop with synth\n\n"
        "# Metas\n- bpm: 120\n- timesignature: 4\n- keyscale: C major\n- duration: 30 seconds\n<|endoftext|>\n")


def test_unknown_metas_are_na():
    assert "- bpm: N/A\n- timesignature: N/A\n- keyscale: N/A\n- duration: 10 seconds\n" in \
        caption_prompt("x", None, "", "", 10)


def test_lyrics_prompt_matches_official_test_string():
    # The newer official preprocessing test expects exactly this for instrumentals.
    assert lyrics_prompt("[Instrumental]", "unknown") == "# Languages\nunknown\n\n# Lyric\n[Instrumental]<|endoftext|>"


@pytest.mark.parametrize("position,expected", [("prepend", "mytag, a song"), ("append", "a song, mytag"),
                                                ("replace", "mytag")])
def test_custom_tag_positions(position, expected):
    assert apply_custom_tag("a song", "mytag", position) == expected
    assert apply_custom_tag("a song", "  ", position) == "a song"


def test_custom_tag_bad_position():
    with pytest.raises(ValueError, match="tag_position 'middle'"):
        apply_custom_tag("a", "b", "middle")


def test_encoders(tiny_ckpt):
    te = load_text_encoder(tiny_ckpt)
    prompt = caption_prompt("upbeat pop", 120, "4", "C major", 30)
    ids = te.tokenizer(prompt).input_ids
    assert te.tokenizer.convert_ids_to_tokens(ids)[-1] == "<|endoftext|>"  # appended, as Qwen3-Embedding does
    hidden, mask = te.encode_caption(prompt)
    assert hidden.shape == (1, len(ids), 32) and mask.shape == (1, len(ids)) and bool(mask.all())
    with torch.no_grad():
        full = te.model(input_ids=torch.tensor([ids])).last_hidden_state
    assert torch.equal(hidden, full)
    lyr, lmask = te.embed_lyrics(lyrics_prompt("la la", "en"))
    lids = te.tokenizer(lyrics_prompt("la la", "en")).input_ids
    assert torch.equal(lyr[0], te.model.embed_tokens.weight[lids])


def test_caption_truncated_at_256_tokens(tiny_ckpt):
    te = load_text_encoder(tiny_ckpt)
    hidden, _ = te.encode_caption(caption_prompt("word " * 2000, None, "", "", 10))
    assert hidden.shape[1] == 256
