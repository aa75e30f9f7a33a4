"""acestep_lora/lists.py: captions and lyrics are never split at commas by surprise; the seed's forms still work."""
import pytest

from acestep_lora.lists import (CAPTIONS_RULE, LYRICS_RULE, encode_list, fit_list, metadata_lists, parse_captions,
                                parse_lyrics, parse_list)

CAPTION = "upbeat electronic pop, synth leads, female vocals"


# ----------------------------------------------------------------------------------------------------- captions

def test_one_caption_with_commas_applies_to_every_file():
    assert parse_captions(CAPTION, 3) == ([CAPTION] * 3, None)


def test_seed_comma_form_splits_only_when_unambiguous():
    captions, note = parse_captions("Electronic pop with synth,Upbeat dance track,Chill lo-fi beat", 3)
    assert captions == ["Electronic pop with synth", "Upbeat dance track", "Chill lo-fi beat"]
    assert note == "captions: split at commas into 3 (one per file)"
    # one file: the text is its caption, commas and all
    assert parse_captions("pop,rock", 1) == (["pop,rock"], None)
    # a space after any comma: ACE-Step tag style, one caption for all
    assert parse_captions("pop, rock,jazz", 3) == (["pop, rock,jazz"] * 3, None)


def test_seed_comma_form_with_the_wrong_count_is_an_error_that_states_the_rule():
    with pytest.raises(ValueError) as e:
        parse_captions("a,b", 3)
    message = str(e.value)
    assert "captions has 2 entries but there are 3 audio files" in message
    assert "', ' (comma and space)" in message and CAPTIONS_RULE in message


def test_json_array_one_caption_per_element():
    captions = ["rock, loud, fast", "calm\npiano, strings"]
    assert parse_captions(encode_list(captions), 2) == (captions, None)
    assert parse_captions(encode_list([CAPTION]), 3) == ([CAPTION] * 3, None)  # one element for all


def test_one_caption_per_line():
    text = f"{CAPTION}\n\n  dark ambient, drones  \nlo-fi hip hop, vinyl, mellow\n"
    assert parse_captions(text, 3) == ([CAPTION, "dark ambient, drones", "lo-fi hip hop, vinyl, mellow"], None)
    # one file: line breaks belong to its caption
    assert parse_captions("pop\nwith strings", 1) == (["pop\nwith strings"], None)


def test_caption_line_count_mismatch_names_the_input_and_the_rule():
    with pytest.raises(ValueError) as e:
        parse_captions("one\ntwo", 3)
    assert "captions has 2 entries but there are 3 audio files" in str(e.value)
    assert "The rule for captions: " + CAPTIONS_RULE in str(e.value)


def test_empty_captions():
    assert parse_captions("  ", 2) == (["", ""], None)


# ----------------------------------------------------------------------------------------------------- lyrics

def test_one_files_lyrics_with_a_comma_are_kept_unchanged():
    assert parse_lyrics("Hello, world", 1) == (["Hello, world"], None)
    lyrics = "[Verse]\nhello, world\nagain, again"
    assert parse_lyrics(lyrics, 1) == ([lyrics], None)


def test_one_lyrics_text_applies_to_every_file_never_split_at_commas_or_lines():
    lyrics = "[Verse]\nhello, world\nagain, again\n[Chorus]\nla,la"
    assert parse_lyrics(lyrics, 3) == ([lyrics] * 3, None)
    assert parse_lyrics("Hello, world", 2) == (["Hello, world"] * 2, None)


def test_lyrics_blocks_separated_by_dashes():
    text = "[Verse]\nfirst, song\n---\n[Instrumental]\n  ---  \n[Chorus]\nthird"
    assert parse_lyrics(text, 3) == (["[Verse]\nfirst, song", "[Instrumental]", "[Chorus]\nthird"], None)
    with pytest.raises(ValueError) as e:
        parse_lyrics(text, 2)
    assert "lyrics_list has 3 entries but there are 2 audio files" in str(e.value) and LYRICS_RULE in str(e.value)


def test_lyrics_json_array_and_seed_comma_form():
    lyrics = ["[Verse]\nhello, world", "[Instrumental]"]
    assert parse_lyrics(encode_list(lyrics), 2) == (lyrics, None)
    assert parse_lyrics("[Instrumental],[Instrumental],[Instrumental]", 3) == (
        ["[Instrumental]"] * 3, "lyrics_list: split at commas into 3 (one per file)")
    with pytest.raises(ValueError, match="lyrics_list has 2 entries but there are 3 audio files"):
        parse_lyrics("[Instrumental],[Instrumental]", 3)


# ----------------------------------------------------------------------------------------------------- values

@pytest.mark.parametrize("text", ['["120", 128, null]', "120,128,", "120\n128\n\n"])
def test_values_json_lines_or_commas(text):
    values = parse_list(text, "bpm_list")
    assert values[:2] == ["120", "128"]
    assert fit_list(parse_list("C Major", "keyscale_list"), 3, "keyscale_list") == ["C Major"] * 3


def test_value_count_mismatch_and_empty():
    assert fit_list(parse_list("", "bpm_list"), 2, "bpm_list") == ["", ""]
    with pytest.raises(ValueError, match=r"bpm_list has 2 entries but there are 3 audio files.*JSON array, one per "
                                         "line, or comma-separated"):
        fit_list(parse_list("120,90", "bpm_list"), 3, "bpm_list")
    with pytest.raises(ValueError, match="x has 2 entries but there is 1 audio file[.]"):
        fit_list(["a", "b"], 1, "x")


def test_metadata_lists_for_prepares_six_inputs():
    raw = {"captions": "Pop,Rock", "lyrics_list": "Hello, world", "bpm_list": "120", "keyscale_list": '["Am", ""]',
           "language_list": "en\nzh", "timesignature_list": ""}
    lists, notes = metadata_lists(raw, 2)
    assert lists == {"captions": ["Pop", "Rock"], "lyrics_list": ["Hello, world"] * 2, "bpm_list": ["120", "120"],
                     "keyscale_list": ["Am", ""], "language_list": ["en", "zh"], "timesignature_list": ["", ""]}
    assert notes == ["captions: split at commas into 2 (one per file)"]
