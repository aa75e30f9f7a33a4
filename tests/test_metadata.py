import pytest

from acestep_lora.metadata import (normalize_bpm, normalize_keyscale, normalize_language, normalize_lyrics,
                                   normalize_timesignature)


@pytest.mark.parametrize("text,expected", [
    ("C Major", "C major"), ("C major", "C major"), ("Am", "A minor"), ("F#m", "F# minor"), ("c#min", "C# minor"),
    ("Bb", "Bb major"), ("Bbm", "Bb minor"), ("E flat minor", "Eb minor"), ("D Minor", "D minor"),
    ("F♯ minor", "F# minor"), ("A-minor", "A minor"), ("", ""), ("N/A", ""), (None, "")])
def test_keyscale_forms(text, expected):
    assert normalize_keyscale(text) == expected


@pytest.mark.parametrize("bad", ["H major", "C##", "Cmajor7", "120"])
def test_keyscale_rejected_lists_accepted_forms(bad):
    with pytest.raises(ValueError) as e:
        normalize_keyscale(bad)
    assert bad in str(e.value) and "F# minor" in str(e.value) and "Am" in str(e.value)


def test_language():
    assert normalize_language("EN") == "en"
    assert normalize_language("instrumental") == "instrumental"
    assert normalize_language("") == "unknown"
    with pytest.raises(ValueError, match="'klingon'.*yue"):
        normalize_language("klingon")


def test_timesignature():
    assert [normalize_timesignature(x) for x in ("4/4", "3/4", "6/8", 2, "", None)] == ["4", "3", "6", "2", "", ""]
    with pytest.raises(ValueError, match="5/4"):
        normalize_timesignature("5/4")


def test_bpm():
    assert [normalize_bpm(x) for x in (120, "128", 0, "", None, 99.6)] == [120, 128, None, None, None, 100]
    with pytest.raises(ValueError, match="outside 30-300"):
        normalize_bpm(900)
    with pytest.raises(ValueError, match="not a number"):
        normalize_bpm("fast")


def test_lyrics_default_instrumental():
    assert normalize_lyrics("  ") == "[Instrumental]"
    assert normalize_lyrics("la\nla") == "la\nla"
