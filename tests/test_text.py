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


def test_comfyui_tokenizer_folder_gives_the_official_ids(tiny_ckpt, tmp_path):
    """ComfyUI ships Qwen's tokenizer as vocab.json + merges.txt without the post-processor that appends
    <|endoftext|>; load_tokenizer adds it, so both folders tokenise every prompt identically."""
    import os

    from acestep_lora.testing import write_comfy_tokenizer
    from acestep_lora.text import load_tokenizer

    official_dir = os.path.join(tiny_ckpt, "Qwen3-Embedding-0.6B")
    comfy_dir = write_comfy_tokenizer(official_dir, str(tmp_path / "qwen25_tokenizer"))
    assert sorted(os.listdir(comfy_dir)) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(comfy_dir)
    assert raw("la la").input_ids[-1] != raw.convert_tokens_to_ids("<|endoftext|>")  # ComfyUI's does not append
    official, comfy = load_tokenizer(official_dir), load_tokenizer(comfy_dir)
    prompts = [caption_prompt("Upbeat pop, 120 BPM; it's l'amour", 128, "3", "F# minor", 187.5),
               lyrics_prompt("[verse]\nNa na 1999\n\n[chorus]\noh  yeah!!", "fr"), "word " * 400]
    for prompt in prompts:
        assert comfy(prompt).input_ids == official(prompt).input_ids
        truncated = comfy(prompt, truncation=True, max_length=256).input_ids
        assert truncated == official(prompt, truncation=True, max_length=256).input_ids
        assert truncated[-1] == official.convert_tokens_to_ids("<|endoftext|>")
    assert official("a").input_ids == AutoTokenizer.from_pretrained(official_dir)("a").input_ids  # untouched


def test_tokenizer_without_endoftext_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from acestep_lora.text import load_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["hello world"], trainer=trainers.BpeTrainer(vocab_size=300, show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="no <\\|endoftext\\|> token; it is not a Qwen tokenizer"):
        load_tokenizer(str(tmp_path))
