"""manifest.json: one format (Manifest), the keys Prepare writes, and clear errors for other versions."""
import json
import os

import pytest

from acestep_lora.manifest import MANIFEST_FORMAT, PREPROCESS_VERSION, DatasetMetadata, Manifest, SampleInfo


def example(**kw):
    info = [SampleInfo(file=f"s{i}.pt", name=f"/songs/s{i}.wav", cache_key=f"key{i}", frames=25 * (i + 1),
                       caption="dreamy synth", caption_source="typed", bpm=120 if i else None,
                       bpm_source="typed" if i else "unknown", notes=["very short (1 s)"]) for i in range(2)]
    values = dict(samples_info=info, checkpoint={"config_path": "acestep-v15-turbo", "variant": "turbo"},
                  dtype="float32", metadata=DatasetMetadata(name="t", custom_tag="zz", num_samples=2))
    values.update(kw)
    return Manifest(**values)


def test_round_trip_with_the_keys_prepare_writes(tmp_path):
    manifest = example()
    manifest.save(str(tmp_path))
    data = json.load(open(tmp_path / "manifest.json"))
    assert list(data) == ["format", "metadata", "samples", "num_samples", "checkpoint", "dtype", "preprocess_version",
                          "max_duration", "long_audio", "detect_bpm", "samples_info", "warnings"]
    assert data["samples"] == ["s0.pt", "s1.pt"] and data["num_samples"] == 2 and data["format"] == MANIFEST_FORMAT
    assert list(data["samples_info"][0]) == [
        "file", "name", "cache_key", "segment", "segments", "offset", "duration_used", "duration_total", "frames",
        "caption", "caption_source", "lyrics", "lyrics_source", "instrumental", "bpm", "bpm_source", "keyscale",
        "language", "timesignature", "notes"]
    assert set(data["metadata"]) == {"name", "custom_tag", "tag_position", "created_at", "num_samples",
                                     "all_instrumental", "genre_ratio"}
    loaded = Manifest.load(str(tmp_path))
    assert loaded == manifest and loaded.config_path == "acestep-v15-turbo" and loaded.metadata.custom_tag == "zz"
    assert loaded.sample_keys() == ["key0", "key1"] and loaded.fingerprint() == manifest.fingerprint()
    assert example(samples_info=manifest.samples_info[::-1]).fingerprint() != manifest.fingerprint()


def test_the_same_audio_twice_has_no_usable_keys():
    twice = example()
    twice.samples_info[1].cache_key = "key0"
    assert twice.sample_keys() is None  # resume then compares the dataset as a whole


def rewrite(tmp_path, **changes):
    path = tmp_path / "manifest.json"
    data = json.load(open(path))
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_an_older_or_newer_folder_says_what_to_do(tmp_path):
    example().save(str(tmp_path))
    rewrite(tmp_path, format=None)  # written before the format was versioned (same preprocessing)
    with pytest.raises(ValueError) as error:
        Manifest.load(str(tmp_path))
    message = str(error.value)
    assert "was written by an older Prepare (manifest format none; this version reads format 1)" in message
    assert "Run Prepare again on the same audio with this folder as output_dir" in message
    assert f"(preprocess version {PREPROCESS_VERSION}) are reused" in message
    rewrite(tmp_path, preprocess_version=1)
    with pytest.raises(ValueError, match="older preprocessing \\(version 1\\) and are encoded again"):
        Manifest.load(str(tmp_path))
    rewrite(tmp_path, format=MANIFEST_FORMAT + 1)
    with pytest.raises(ValueError, match="newer version of acestep-lora.*Update the pack"):
        Manifest.load(str(tmp_path))


def test_damaged_or_edited_manifests_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no manifest.json. Run 'ACE-Step LoRA Prepare Training Data'"):
        Manifest.load(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json is damaged"):
        Manifest.load(str(tmp_path))
    example().save(str(tmp_path))
    rewrite(tmp_path, samples_info=[{"file": "s0.pt"}])
    with pytest.raises(ValueError, match="lacks or mistypes.*Run Prepare again"):
        Manifest.load(str(tmp_path))
    example().save(str(tmp_path))
    rewrite(tmp_path, samples=["other.pt", "s1.pt"])
    with pytest.raises(ValueError, match="'samples' and 'samples_info' list different files"):
        Manifest.load(str(tmp_path))
    assert os.listdir(tmp_path) == ["manifest.json"]
