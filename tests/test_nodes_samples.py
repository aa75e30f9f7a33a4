"""nodes/samples.py driven as ComfyUI drives it (INPUT_TYPES, FUNCTION, IS_CHANGED) with the headless stand-ins."""
import importlib
import json
import math
import os

import pytest
import soundfile as sf
import torch

SEED_OUTPUTS = ("audio_files", "captions", "lyrics_list", "bpm_list", "keyscale_list", "language_list")


@pytest.fixture()
def nodes(comfy):
    return importlib.import_module(comfy.pack.__name__ + ".nodes.samples")


def audio(seconds=0.5, sr=48000, channels=2, freq=330.0, batch=1):
    t = torch.arange(int(seconds * sr)) / sr
    items = [torch.stack([0.3 * torch.sin(2 * math.pi * (freq + 7 * b) * t)] * channels) for b in range(batch)]
    return {"waveform": torch.stack(items), "sample_rate": sr}  # [B, C, N]


def create(nodes, **kwargs):
    node = nodes.CreateTrainingSample()
    args = dict(audio=audio(), caption="calm piano", output_dir="acestep_lora/samples", lyrics="[Instrumental]",
                bpm=100, keyscale="", language="instrumental")
    args.update(kwargs)
    (info,) = getattr(node, node.FUNCTION)(**args)
    return json.loads(info)


def collect(nodes, **kwargs):
    node = nodes.CollectTrainingSamples()
    outputs = getattr(node, node.FUNCTION)(**{"samples_dir": "acestep_lora/samples", **kwargs})
    return dict(zip(nodes.CollectTrainingSamples.RETURN_NAMES, (json.loads(o) for o in outputs)))


def test_mappings_and_display_names(nodes):
    assert nodes.NODE_CLASS_MAPPINGS == {"ACEStepLoRA_CreateTrainingSample": nodes.CreateTrainingSample,
                                         "ACEStepLoRA_CollectTrainingSamples": nodes.CollectTrainingSamples}
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS == {
        "ACEStepLoRA_CreateTrainingSample": "ACE-Step Create Training Sample",
        "ACEStepLoRA_CollectTrainingSamples": "ACE-Step Collect Training Samples"}
    for cls in nodes.NODE_CLASS_MAPPINGS.values():
        assert cls.CATEGORY == "audio/ACE-Step LoRA" and cls.DESCRIPTION
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        assert all(cls.OUTPUT_TOOLTIPS)
        assert callable(getattr(cls, cls.FUNCTION))
    assert nodes.CreateTrainingSample.OUTPUT_NODE is True
    assert nodes.CreateTrainingSample.RETURN_NAMES == ("sample_info",)
    assert nodes.CollectTrainingSamples.RETURN_NAMES == SEED_OUTPUTS + ("timesignature_list",)


def test_every_input_has_a_tooltip_and_seed_inputs(nodes):
    create_inputs = nodes.CreateTrainingSample.INPUT_TYPES()
    assert list(create_inputs["required"]) == ["audio", "caption", "output_dir", "lyrics", "bpm", "keyscale",
                                               "language"]
    assert list(create_inputs["optional"]) == ["timesignature", "previous"]
    collect_inputs = nodes.CollectTrainingSamples.INPUT_TYPES()
    assert list(collect_inputs["required"]) == ["samples_dir"] and list(collect_inputs["optional"]) == ["sample_info"]
    for spec in (create_inputs, collect_inputs):
        for group in spec.values():
            for name, (_kind, options) in group.items():
                assert options.get("tooltip"), name
    req = create_inputs["required"]
    assert req["audio"][0] == "AUDIO" and req["caption"][1]["multiline"] and req["lyrics"][1]["multiline"]
    assert req["bpm"][1]["default"] == 0 and req["bpm"][1]["min"] == 0 and req["bpm"][1]["max"] == 300
    assert "instrumental" in req["language"][0] and req["language"][1]["default"] == "instrumental"
    assert "Am" in req["keyscale"][1]["tooltip"]
    assert create_inputs["optional"]["previous"][1]["forceInput"]
    assert collect_inputs["optional"]["sample_info"][1]["forceInput"]


def test_create_relative_dir_under_output(nodes, comfy):
    info = create(nodes, keyscale="Am", timesignature="4/4", language="en", lyrics="[Verse]\nhi")
    folder = os.path.join(comfy.output, "acestep_lora", "samples")
    assert info["status"] == "created" and os.path.dirname(info["audio_path"]) == folder
    assert os.path.isfile(info["sidecar_path"]) and info["audio_path"].endswith(".flac")
    assert (info["keyscale"], info["timesignature"], info["language"]) == ("A minor", "4", "en")
    assert info["chain"] == [info["id"]] and info["chain_dirs"] == [folder]
    assert [s["id"] for s in info["samples"]] == [info["id"]]
    data, rate = sf.read(info["audio_path"], always_2d=True)
    assert rate == 48000 and data.shape == (24000, 2)
    again = create(nodes, keyscale="A minor", timesignature="4", language="en", lyrics="[Verse]\nhi")
    assert again["status"] == "exists" and again["id"] == info["id"]


def test_create_absolute_dir_and_autodetect(nodes, comfy, tmp_path, monkeypatch):
    monkeypatch.setattr(comfy.pack.__name__ + ".acestep_lora.bpm.detect_bpm", lambda w, sr: 87.6)
    info = create(nodes, output_dir=str(tmp_path / "abs"), bpm=0)
    assert os.path.dirname(info["audio_path"]) == str(tmp_path / "abs")
    assert (info["bpm"], info["bpm_source"]) == (88, "detected")


def test_create_batch_makes_one_sample_per_item(nodes):
    info = create(nodes, audio=audio(batch=3), caption="three takes")
    assert len(info["samples"]) == 3 and len(set(info["chain"])) == 3
    assert info["chain"] == [s["id"] for s in info["samples"]] and info["id"] == info["chain"][0]
    assert len(collect(nodes)["audio_files"]) == 3


def test_chain_two_creates_into_collect_round_trips_text(nodes):
    caption_a = "rock, loud guitars, \"live\" drums"
    lyrics_a = "[Verse]\none, two, three\n[Chorus]\nla, la"
    first = create(nodes, audio=audio(freq=220.0), caption=caption_a, lyrics=lyrics_a, bpm=120, keyscale="C Major",
                   language="en", timesignature="3/4")
    second = create(nodes, audio=audio(freq=440.0), caption="jazz, brushes", lyrics="", bpm=95, keyscale="F#m",
                    previous=json.dumps(first))
    assert second["chain"] == [first["id"], second["id"]]

    out = collect(nodes, sample_info=json.dumps(second))
    assert list(out) == list(SEED_OUTPUTS) + ["timesignature_list"]
    rows = {path: i for i, path in enumerate(out["audio_files"])}
    a, b = rows[first["audio_path"]], rows[second["audio_path"]]
    assert out["captions"][a] == caption_a and out["lyrics_list"][a] == lyrics_a
    assert out["captions"][b] == "jazz, brushes" and out["lyrics_list"][b] == "[Instrumental]"
    assert (out["bpm_list"][a], out["bpm_list"][b]) == (120, 95)
    assert (out["keyscale_list"][a], out["keyscale_list"][b]) == ("C major", "F# minor")
    assert (out["language_list"][a], out["language_list"][b]) == ("en", "instrumental")
    assert (out["timesignature_list"][a], out["timesignature_list"][b]) == ("3", "")
    assert all(len(v) == 2 for v in out.values())


def test_collect_unknown_bpm_is_empty_string(nodes, comfy, monkeypatch):
    def fail(w, sr):
        raise ValueError("no beat")

    monkeypatch.setattr(comfy.pack.__name__ + ".acestep_lora.bpm.detect_bpm", fail)
    info = create(nodes, bpm=0)
    assert info["bpm"] is None and "no beat" in info["note"]
    assert collect(nodes)["bpm_list"] == [""]


def test_collect_plain_folder_output_is_json_lists(nodes, tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    sf.write(str(folder / "song.wav"), torch.zeros(1000, 2).numpy(), 44100)
    (folder / "song_prompt.txt").write_text("lofi, vinyl, \"warm\"", encoding="utf-8")
    (folder / "song.txt").write_text("line one, with comma\nline two", encoding="utf-8")
    node = nodes.CollectTrainingSamples()
    outputs = node.collect(samples_dir=str(folder))
    assert len(outputs) == 7 and all(isinstance(o, str) for o in outputs)
    assert json.loads(outputs[1]) == ["lofi, vinyl, \"warm\""]
    assert json.loads(outputs[2]) == ["line one, with comma\nline two"]
    assert json.loads(outputs[3]) == [""] and json.loads(outputs[6]) == [""]


def test_collect_chain_mismatch_names_both_folders(nodes, comfy, tmp_path):
    info = create(nodes, output_dir="acestep_lora/other")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sf.write(str(elsewhere / "x.wav"), torch.zeros(1000, 1).numpy(), 44100)
    with pytest.raises(ValueError) as e:
        collect(nodes, samples_dir=str(elsewhere), sample_info=json.dumps(info))
    message = str(e.value)
    assert "sample_info" in message and info["id"] in message and str(elsewhere) in message
    assert os.path.join(comfy.output, "acestep_lora", "other") in message and "samples_dir" in message


def test_collect_missing_folder_with_chain_points_to_create_folder(nodes, comfy):
    info = create(nodes, output_dir="acestep_lora/other")
    with pytest.raises(FileNotFoundError) as e:
        collect(nodes, samples_dir="acestep_lora/samples", sample_info=json.dumps(info))
    assert "samples_dir 'acestep_lora/samples' does not exist" in str(e.value)
    assert os.path.join(comfy.output, "acestep_lora", "samples") in str(e.value)
    assert os.path.join(comfy.output, "acestep_lora", "other") in str(e.value)


def test_bad_previous_and_sample_info_rejected(nodes):
    with pytest.raises(ValueError, match="previous: expected the sample_info output"):
        create(nodes, previous="not json")
    create(nodes)
    with pytest.raises(ValueError, match="sample_info: expected the sample_info output"):
        collect(nodes, sample_info="[1, 2]")


def test_create_errors_name_the_input(nodes):
    with pytest.raises(ValueError, match="caption is empty"):
        create(nodes, caption="")
    with pytest.raises(ValueError, match="keyscale 'X minor'"):
        create(nodes, keyscale="X minor")
    with pytest.raises(ValueError, match="audio: expected a ComfyUI AUDIO"):
        create(nodes, audio=torch.zeros(2, 10))


def test_is_changed_follows_folder_contents(nodes, comfy):
    cls = nodes.CollectTrainingSamples
    missing = cls.IS_CHANGED(samples_dir="acestep_lora/samples")
    create(nodes)
    first = cls.IS_CHANGED(samples_dir="acestep_lora/samples")
    assert first != missing and cls.IS_CHANGED(samples_dir="acestep_lora/samples", sample_info=None) == first
    create(nodes, caption="another one")
    assert cls.IS_CHANGED(samples_dir="acestep_lora/samples") != first
