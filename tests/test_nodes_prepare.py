"""nodes/prepare.py as ComfyUI drives it: the status in the node's UI text ends with the table of what will be
trained on, typed lists follow the documented rule, and the advanced long_audio / detect_bpm options reach Prepare."""
import importlib
import json
import os

import soundfile as sf
import torch

from test_prepare import tone


def prepare(comfy, ckpt, **kw):
    node = importlib.import_module(f"{comfy.pack.__name__}.nodes.prepare").PrepareTrainingData()
    args = dict(audio_files="", captions="", lyrics_list="", bpm_list="", keyscale_list="", language_list="",
                output_dir="tensors", checkpoint_dir=ckpt, config_path="acestep-v15-turbo", device="cpu")
    args.update(kw)
    with torch.inference_mode():  # as ComfyUI runs nodes
        return getattr(node, node.FUNCTION)(**args)


def wav(path, seconds=1.0, rate=44100):
    sf.write(str(path), tone(seconds, rate=rate).T.numpy(), rate)
    return str(path)


def test_ui_text_ends_with_the_table_and_says_where_things_came_from(comfy, tiny_ckpt, tmp_path):
    first = wav(tmp_path / "01 - Track 1.wav")
    second = wav(tmp_path / "ballad.wav", seconds=1.5)
    (tmp_path / "ballad.txt").write_text("[Verse]\nhello, world\nagain")
    out = prepare(comfy, tiny_ckpt, audio_files=f"{first}\n{second}", captions="01 - Track 1\nsoft ballad, piano",
                  lyrics_list=json.dumps(["", "[Verse]\nhello, world\nagain"]), bpm_list="0,96")
    tensor_dir, status = out["result"]
    assert out["ui"]["text"] == [status]
    manifest = json.load(open(os.path.join(tensor_dir, "manifest.json")))
    lines = status.splitlines()
    assert lines[0].startswith("Prepared 2 samples (2 encoded, 0 cached)")
    # the table is the end of the status
    table_start = next(i for i, line in enumerate(lines) if line.startswith("#  file"))
    table = "\n".join(lines[table_start:])
    assert status.endswith(table) and table.count("\n   caption  ") == 2
    assert lines[table_start + 2].startswith("1  01 - Track 1.wav") and "unknown" in lines[table_start + 2]
    assert '"01 - Track 1"  (from the file name)' in table and "caption from file name" in table
    assert '"soft ballad, piano"  (typed)' in table
    assert '"[Verse] / hello, world / again"  (from ballad.txt)' in table and "96 (typed)" in table
    # the file-name caption is warned about before the table, and the manifest says the same
    assert status.index("1 file has no caption") < status.index(table)
    info = manifest["samples_info"]
    assert [i["caption_source"] for i in info] == ["file name", "typed"]
    assert [i["lyrics_source"] for i in info] == ["none → [Instrumental]", "ballad.txt"]
    assert (info[1]["bpm"], info[1]["bpm_source"]) == (96, "typed")


def test_typed_caption_with_commas_is_one_caption_for_every_file(comfy, tiny_ckpt, tmp_path):
    files = [wav(tmp_path / f"{i}.wav", seed_seconds) for i, seed_seconds in enumerate((1.0, 1.2, 1.4))]
    caption = "upbeat electronic pop, synth leads, female vocals"
    out = prepare(comfy, tiny_ckpt, audio_files=",".join(files), captions=caption, lyrics_list="Hello, world",
                  bpm_list="120")
    manifest = json.load(open(os.path.join(out["result"][0], "manifest.json")))
    assert [i["caption"] for i in manifest["samples_info"]] == [caption] * 3
    assert [i["lyrics"] for i in manifest["samples_info"]] == ["Hello, world"] * 3
    assert "split at commas" not in out["result"][1]


def test_seed_comma_form_is_split_and_says_so(comfy, tiny_ckpt, tmp_path):
    files = [wav(tmp_path / f"{i}.wav") for i in range(2)]
    out = prepare(comfy, tiny_ckpt, audio_files=",".join(files), captions="Electronic pop,Chill lo-fi",
                  lyrics_list="[Instrumental],[Instrumental]", bpm_list="120,90")
    status = out["result"][1]
    assert "captions: split at commas into 2 (one per file)" in status
    assert "lyrics_list: split at commas into 2 (one per file)" in status
    manifest = json.load(open(os.path.join(out["result"][0], "manifest.json")))
    assert [i["caption"] for i in manifest["samples_info"]] == ["Electronic pop", "Chill lo-fi"]
    assert manifest["warnings"][:2] == ["captions: split at commas into 2 (one per file)",
                                        "lyrics_list: split at commas into 2 (one per file)"]


def test_long_audio_and_detect_bpm_reach_prepare(comfy, tiny_ckpt, tmp_path):
    path = wav(tmp_path / "long.wav", seconds=2.5)
    segments = prepare(comfy, tiny_ckpt, audio_files=path, captions="c", max_duration=1.0, output_dir="seg")
    cropped = prepare(comfy, tiny_ckpt, audio_files=path, captions="c", max_duration=1.0, long_audio="crop",
                      detect_bpm=False, output_dir="crop")
    seg = json.load(open(os.path.join(segments["result"][0], "manifest.json")))
    crop = json.load(open(os.path.join(cropped["result"][0], "manifest.json")))
    assert (seg["num_samples"], seg["long_audio"], seg["detect_bpm"]) == (3, "segments", True)
    assert (crop["num_samples"], crop["long_audio"], crop["detect_bpm"]) == (1, "crop", False)
    assert "3 × 0.8 s / 2.5 s" in segments["result"][1] and "cropped 2.5 s → 1 s" in cropped["result"][1]


def test_options_are_advanced_with_tooltips_that_state_the_rules(comfy):
    node = importlib.import_module(f"{comfy.pack.__name__}.nodes.prepare").PrepareTrainingData
    from acestep_lora.lists import CAPTIONS_RULE, LYRICS_RULE, VALUES_RULE

    spec = node.INPUT_TYPES()
    optional, required = spec["optional"], spec["required"]
    assert optional["long_audio"][0] == ["segments", "crop"] and optional["long_audio"][1]["default"] == "segments"
    assert optional["detect_bpm"][0] == "BOOLEAN" and optional["detect_bpm"][1]["default"] is True
    assert optional["long_audio"][1]["advanced"] and optional["detect_bpm"][1]["advanced"]
    assert CAPTIONS_RULE in required["captions"][1]["tooltip"]
    assert LYRICS_RULE in required["lyrics_list"][1]["tooltip"]
    assert all(VALUES_RULE in required[n][1]["tooltip"] for n in ("bpm_list", "keyscale_list", "language_list"))
    assert "<name>_caption.txt" in node.DESCRIPTION and "<name>.txt (= lyrics" in node.DESCRIPTION
