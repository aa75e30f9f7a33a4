"""Prepare and Train nodes through their ComfyUI-facing methods (ComfyUI stand-ins from scripts/headless.py)."""
import importlib
import json
import os

import pytest
import soundfile as sf
import torch

from acestep_lora.lists import encode_list

from test_prepare import tone


def node_module(comfy, name):
    return importlib.import_module(f"{comfy.pack.__name__}.nodes.{name}")


def prepare_node(comfy):
    return node_module(comfy, "prepare").PrepareTrainingData()


def call_prepare(comfy, ckpt, audio_files="", captions="", **kw):
    args = dict(audio_files=audio_files, captions=captions, lyrics_list="", bpm_list="", keyscale_list="",
                language_list="", output_dir="tensors", checkpoint_dir=ckpt, config_path="acestep-v15-turbo",
                device="cpu")
    args.update(kw)
    with torch.inference_mode():  # as ComfyUI runs nodes
        return prepare_node(comfy).prepare(**args)


def write_wav(path, seconds=1.0, rate=44100):
    sf.write(path, tone(seconds, rate=rate).T.numpy(), rate)
    return path


def test_node_definitions(comfy):
    mappings = comfy.pack.NODE_CLASS_MAPPINGS
    assert comfy.pack.NODE_DISPLAY_NAME_MAPPINGS == {
        "ACEStepLoRA_CreateTrainingSample": "ACE-Step Create Training Sample",
        "ACEStepLoRA_CollectTrainingSamples": "ACE-Step Collect Training Samples",
        "ACEStepLoRA_PrepareTrainingData": "ACE-Step LoRA Prepare Training Data",
        "ACEStepLoRA_Train": "ACE-Step LoRA Train"}
    prepare = mappings["ACEStepLoRA_PrepareTrainingData"]
    inputs = prepare.INPUT_TYPES()
    assert list(inputs["required"]) == ["audio_files", "captions", "lyrics_list", "bpm_list", "keyscale_list",
                                        "language_list", "output_dir", "checkpoint_dir", "config_path", "device"]
    assert {"audio_input_1", "audio_input_2", "audio_input_3", "audio_input_4", "custom_tag", "tag_position",
            "max_duration"} <= set(inputs["optional"])
    assert prepare.RETURN_NAMES == ("tensor_dir", "status")
    train = mappings["ACEStepLoRA_Train"]
    tin = train.INPUT_TYPES()
    assert list(tin["required"]) == ["tensor_dir", "checkpoint_dir", "config_path", "output_dir", "lora_rank",
                                     "lora_alpha", "lora_dropout", "learning_rate", "train_epochs", "batch_size",
                                     "gradient_accumulation", "save_every_n_epochs", "seed", "resume_from",
                                     "target_modules"]
    assert tin["required"]["lora_rank"][1]["min"] == 4 and tin["required"]["lora_rank"][1]["max"] == 256
    assert tin["required"]["lora_rank"][1]["default"] == 64 and tin["required"]["lora_alpha"][1]["default"] == 128
    assert tin["required"]["learning_rate"][1]["default"] == 3e-4
    assert train.RETURN_TYPES == ("ACE_STEP_LORA_INFO", "STRING", "AUDIO")
    assert train.RETURN_NAMES == ("lora_info", "training_log", "previews")
    for cls in mappings.values():
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, value in spec.get(section, {}).items():
                assert value[1].get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
        assert cls.DESCRIPTION and cls.CATEGORY == "audio/ACE-Step LoRA"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)


def test_config_path_dropdown_lists_found_folders(comfy, tiny_ckpt):
    empty = prepare_node(comfy).INPUT_TYPES()["required"]["config_path"]
    assert empty[0][:3] == ["acestep-v15-turbo", "acestep-v15-base", "acestep-v15-sft"]  # nothing found: the names
    assert "acestep-v15-xl-turbo" in empty[0] and empty[1]["default"] == "acestep-v15-turbo"
    os.symlink(tiny_ckpt, os.path.join(comfy.models, "Ace-Step1.5"))
    config_path = prepare_node(comfy).INPUT_TYPES()["required"]["config_path"]
    assert config_path[0] == ["acestep-v15-base", "acestep-v15-turbo"]  # what is there, nothing else
    assert config_path[1]["default"] == "acestep-v15-turbo"
    assert prepare_node(comfy).INPUT_TYPES()["required"]["checkpoint_dir"][1]["default"].endswith("Ace-Step1.5")


def test_audio_inputs_mixed_with_files_and_typed_lists(comfy, tiny_ckpt, tmp_path):
    f1 = write_wav(str(tmp_path / "one.wav"))
    f2 = write_wav(str(tmp_path / "two.wav"), seconds=1.5)
    audio = {"waveform": tone(1.2, rate=22050, channels=1).unsqueeze(0), "sample_rate": 22050}
    out = call_prepare(comfy, tiny_ckpt, audio_files=f"{f1},{f2}", captions="Electronic pop,Chill lo-fi,Ambient",
                       lyrics_list="[Instrumental],[Instrumental],[Instrumental]", bpm_list="120,90,0",
                       keyscale_list="C Major,Am,", language_list="", audio_input_1=audio, custom_tag="zz",
                       tag_position="prepend")
    tensor_dir, status = out["result"]
    assert tensor_dir == os.path.join(comfy.output, "tensors") and "3 encoded" in status
    assert out["ui"]["text"] == [status]
    manifest = json.load(open(os.path.join(tensor_dir, "manifest.json")))
    assert [s["name"] for s in manifest["samples_info"]] == [f1, f2, "audio_input_1"]
    metas = [torch.load(os.path.join(tensor_dir, f), weights_only=True)["metadata"] for f in manifest["samples"]]
    assert [m["caption"] for m in metas] == ["zz, Electronic pop", "zz, Chill lo-fi", "zz, Ambient"]
    assert [m["bpm"] for m in metas] == [120, 90, None] and [m["keyscale"] for m in metas] == ["C major", "A minor", ""]
    assert metas[2]["frames"] == 30  # 1.2 s at 22.05 kHz -> 48 kHz -> 30 frames
    assert comfy.progress[-1].updates[-1][0] == 3


def test_json_lists_with_commas_and_newlines_round_trip(comfy, tiny_ckpt, tmp_path):
    files = [write_wav(str(tmp_path / f"{i}.wav")) for i in range(2)]
    captions = ["rock, loud, fast", "calm\npiano, strings"]
    lyrics = ["[Verse]\nhello, world\n[Chorus]\nla, la", "[Instrumental]"]
    out = call_prepare(comfy, tiny_ckpt, audio_files=encode_list(files), captions=encode_list(captions),
                       lyrics_list=encode_list(lyrics), bpm_list=encode_list([120, ""]),
                       language_list=encode_list(["en", "instrumental"]))
    tensor_dir = out["result"][0]
    manifest = json.load(open(os.path.join(tensor_dir, "manifest.json")))
    metas = [torch.load(os.path.join(tensor_dir, f), weights_only=True)["metadata"] for f in manifest["samples"]]
    assert [m["caption"] for m in metas] == captions and [m["lyrics"] for m in metas] == lyrics


def test_list_count_mismatch_is_named(comfy, tiny_ckpt, tmp_path):
    files = [write_wav(str(tmp_path / f"{i}.wav")) for i in range(3)]
    with pytest.raises(ValueError, match="captions has 2 entries but there are 3 audio files"):
        call_prepare(comfy, tiny_ckpt, audio_files=",".join(files), captions="a,b")
    assert not os.path.exists(os.path.join(comfy.output, "tensors", "manifest.json"))


def test_relative_audio_paths_resolve_in_comfy_input(comfy, tiny_ckpt):
    os.makedirs(os.path.join(os.path.dirname(comfy.output), "input"), exist_ok=True)
    write_wav(os.path.join(os.path.dirname(comfy.output), "input", "song.wav"))
    out = call_prepare(comfy, tiny_ckpt, audio_files="song.wav", captions="c")
    assert "1 encoded" in out["result"][1]


def test_is_changed_follows_the_files(comfy, tmp_path):
    node = node_module(comfy, "prepare").PrepareTrainingData
    path = write_wav(str(tmp_path / "a.wav"))
    first = node.IS_CHANGED(audio_files=path)
    assert node.IS_CHANGED(audio_files=path) == first
    write_wav(path, seconds=2.0)
    assert node.IS_CHANGED(audio_files=path) != first


def train_args(tensor_dir, ckpt, **kw):
    args = dict(tensor_dir=tensor_dir, checkpoint_dir=ckpt, config_path="acestep-v15-turbo", output_dir="runs/mylora",
                lora_rank=8, lora_alpha=16, lora_dropout=0.0, learning_rate=1e-3, train_epochs=3, batch_size=1,
                gradient_accumulation=1, save_every_n_epochs=2, seed=1, resume_from="",
                target_modules="q_proj,k_proj,v_proj,o_proj", device="cpu", unique_id="7", preview_every_n_epochs=0)
    args.update(kw)
    return args


@pytest.fixture()
def prepared(comfy, tiny_ckpt, tmp_path):
    files = [write_wav(str(tmp_path / f"{i}.wav"), seconds=1.0 + 0.2 * i) for i in range(2)]
    return call_prepare(comfy, tiny_ckpt, audio_files=",".join(files), captions="a,b", custom_tag="mytag")["result"][0]


def test_train_node_end_to_end(comfy, tiny_ckpt, prepared, capsys):
    train = node_module(comfy, "train").TrainLoRA()
    unloaded_before = comfy.unloaded
    capsys.readouterr()
    with torch.inference_mode():  # ComfyUI executes every node under inference mode
        out = train.train(**train_args(prepared, tiny_ckpt))
    console = capsys.readouterr().out  # ComfyUI's console: the trainer's lines, once, prefixed once
    assert console.count("[ACE-Step LoRA] training on 2 samples: 3 epochs") == 1
    assert console.count("[ACE-Step LoRA] done: 3 epochs, 6 steps") == 1
    lora_info, log, _ = out["result"]
    assert lora_info["scale"] == 1.0 and os.path.isfile(os.path.join(lora_info["path"], "adapter_config.json"))
    assert lora_info["path"] == os.path.join(comfy.output, "runs", "mylora", "final", "adapter")
    assert lora_info["comfy_lora_path"] == os.path.join(comfy.models, "loras", "mylora.safetensors")
    assert lora_info["comfy_lora_name"] == "mylora.safetensors"
    assert lora_info["rank"] == 8 and lora_info["alpha"] == 16 and lora_info["config_path"] == "acestep-v15-turbo"
    # the epoch-2 checkpoint's LoRA, where LoraLoaderModelOnly lists it (as "mylora/epoch_2.safetensors")
    assert lora_info["epoch_loras"] == ["mylora/epoch_2.safetensors"]
    assert os.path.isfile(os.path.join(comfy.models, "loras", "mylora", "epoch_2.safetensors"))
    assert "mylora/epoch_2.safetensors" in out["ui"]["text"][0]
    assert "epoch 3/3" in log and isinstance(log, str)
    assert comfy.unloaded == unloaded_before + 1  # ComfyUI was asked to unload its models first
    bar = comfy.progress[-1]
    assert bar.total == 6 and bar.updates[-1][0] == 6
    previews = [u[2] for u in bar.updates if u[2] is not None]
    assert previews and previews[-1][0] == "PNG" and previews[-1][1].size == (512, 288)
    events = [m for m in comfy.server.messages if m[0] == "acestep_lora.training"]
    assert events and events[-1][1]["step"] == 6 and events[-1][1]["node"] == "7"
    assert sum(len(e[1]["points"]) for e in events) == 6
    from acestep_lora.lora_io import read_comfy_lora
    _, meta = read_comfy_lora(lora_info["comfy_lora_path"])
    assert meta["acestep_lora.trigger_tag"] == "mytag"


def test_train_node_plays_previews_and_returns_them_as_audio(comfy, tiny_ckpt, tmp_path):
    """Previews and validation through the node: while it trains, the websocket messages name the clips in
    ComfyUI's temp folder; its result lists them as ui.audio and returns the last epoch's as AUDIO."""
    files = [write_wav(str(tmp_path / f"{i}.wav"), seconds=1.0 + 0.1 * i) for i in range(5)]
    tensors = call_prepare(comfy, tiny_ckpt, audio_files=",".join(files), captions="a,b,c,d,e")["result"][0]
    module = node_module(comfy, "train")
    with torch.inference_mode():
        out = module.TrainLoRA().train(**train_args(tensors, tiny_ckpt, train_epochs=2, save_every_n_epochs=1,
                                                    preview_every_n_epochs=-1, preview_seconds=1.0,
                                                    validation_every_n_epochs=1, unique_id="9"))
    lora_info, log, audio = out["result"]
    assert audio["sample_rate"] == 48000 and tuple(audio["waveform"].shape) == (2, 2, 48000)
    assert audio["waveform"].dtype == torch.float32 and 0 < audio["waveform"].abs().max() <= 1
    ui = out["ui"]
    temp = os.path.join(comfy.base, "temp")
    assert [a["filename"] for a in ui["audio"]] == ["epoch_2_1.flac", "epoch_2_2.flac", "base_1.flac", "base_2.flac"]
    for a in ui["audio"]:  # what /view?filename=...&subfolder=...&type=temp serves
        assert a["type"] == "temp" and a["subfolder"] == "acestep_lora/9"
        data, rate = sf.read(os.path.join(temp, *a["subfolder"].split("/"), a["filename"]))
        assert rate == 48000 and data.shape == (48000, 2)
    assert torch.equal(audio["waveform"][0], torch.from_numpy(sf.read(
        os.path.join(temp, "acestep_lora", "9", "epoch_2_1.flac"), dtype="float32")[0].T.copy()))
    assert [(s["epoch"], s["base"]) for s in ui["acestep_lora_previews"]] == [(0, True), (1, False), (2, False)]
    assert lora_info["best"]["epoch"] in (1, 2) and os.path.isdir(lora_info["best"]["path"])
    assert "previews: " in ui["text"][0] and "best epoch" in ui["text"][0]
    sent = [m[1] for m in comfy.server.messages if m[0] == "acestep_lora.training" and m[1]["node"] == "9"]
    shown = [p for m in sent for p in m["previews"]]
    assert [p["epoch"] for p in shown] == [0, 1, 2] and all(len(p["audio"]) == 2 for p in shown)
    assert [v[2] for m in sent for v in m["validation"]] == [0, 1, 2]
    assert module.RUNS["9"]["validation"] and len(module.RUNS["9"]["previews"]) == 3
    # previews off: nothing rendered, 1 s of silence as AUDIO
    with torch.inference_mode():
        out = module.TrainLoRA().train(**train_args(tensors, tiny_ckpt, train_epochs=1, output_dir="runs/quiet",
                                                    validation_split=0.0))
    assert out["ui"]["audio"] == [] and not out["result"][2]["waveform"].abs().any()


def test_train_node_cancel_then_resume_latest(comfy, tiny_ckpt, prepared):
    train = node_module(comfy, "train").TrainLoRA()
    module = node_module(comfy, "train")
    calls = [0]
    original = module.comfy.interrupt_requested

    def press_cancel_at_third_batch():
        calls[0] += 1
        if calls[0] == 3:
            comfy.interrupt()
        return original()

    module.comfy.interrupt_requested = press_cancel_at_third_batch
    try:
        with pytest.raises(comfy.InterruptProcessingException), torch.inference_mode():
            train.train(**train_args(prepared, tiny_ckpt))
    finally:
        module.comfy.interrupt_requested = original
    assert comfy.interrupted is False  # ComfyUI's flag is cleared, as its own Cancel clears it
    run = os.path.join(comfy.output, "runs", "mylora")
    assert any(d.startswith("cancelled_epoch_2") for d in os.listdir(os.path.join(run, "checkpoints")))
    out = train.train(**train_args(prepared, tiny_ckpt, resume_from="latest"))
    assert out["result"][0]["steps"] == 6


def test_cancel_says_where_to_continue_once(comfy, tiny_ckpt, prepared, capsys):
    module = node_module(comfy, "train")
    original = module.comfy.interrupt_requested
    calls = [0]

    def press_cancel_at_fourth_batch():
        calls[0] += 1
        if calls[0] == 4:
            comfy.interrupt()
        return original()

    module.comfy.interrupt_requested = press_cancel_at_fourth_batch
    try:
        with pytest.raises(comfy.InterruptProcessingException), torch.inference_mode():
            module.TrainLoRA().train(**train_args(prepared, tiny_ckpt))
    finally:
        module.comfy.interrupt_requested = original
    out = capsys.readouterr().out
    folder = os.path.join(comfy.output, "runs", "mylora", "checkpoints", "cancelled_epoch_2_step_3")
    assert [line for line in out.splitlines() if "stopped" in line] == [
        f"[ACE-Step LoRA] stopped at epoch 2 step 3; resumable checkpoint: {folder} — queue it again with "
        "resume_from = latest to continue"]


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_are_readable_by_everyone_under_umask_022(umask_022, comfy, tiny_ckpt, tmp_path):
    """ComfyUI in Docker or as a service user must read what the pack writes: tensors, manifest, checkpoints,
    LoRA files, logs — the modes the umask gives (0644 / 0755), not temporary files' owner-only 0600 / 0700."""
    files = [write_wav(str(tmp_path / f"{i}.wav")) for i in range(2)]
    tensor_dir = call_prepare(comfy, tiny_ckpt, audio_files=",".join(files), captions="a,b")["result"][0]
    with torch.inference_mode():
        node_module(comfy, "train").TrainLoRA().train(**train_args(tensor_dir, tiny_ckpt, save_every_n_epochs=1))
    checked = 0
    for top in (tensor_dir, os.path.join(comfy.output, "runs"), os.path.join(comfy.models, "loras")):
        for folder, _dirs, names in os.walk(top):
            assert os.stat(folder).st_mode & 0o777 == 0o755, folder
            for name in names:
                assert os.stat(os.path.join(folder, name)).st_mode & 0o777 == 0o644, os.path.join(folder, name)
                checked += 1
    assert checked >= 20  # tensors + manifest, 2 checkpoints + final (adapter, state, json, LoRA), loras, log


def test_second_run_with_same_name_does_not_replace_the_first_file(comfy, tiny_ckpt, prepared):
    train = node_module(comfy, "train").TrainLoRA()
    first = train.train(**train_args(prepared, tiny_ckpt))["result"][0]
    second = train.train(**train_args(prepared, tiny_ckpt, output_dir="other/mylora"))["result"][0]
    assert first["comfy_lora_path"] != second["comfy_lora_path"]
    assert second["comfy_lora_path"].endswith("mylora_2.safetensors") and os.path.isfile(first["comfy_lora_path"])


def test_relative_checkpoint_dir_resolves_against_comfyui_folders(comfy, tiny_ckpt, tmp_path):
    os.symlink(tiny_ckpt, os.path.join(comfy.models, "Ace-Step1.5"))
    f = write_wav(str(tmp_path / "a.wav"))
    for typed in ("models/Ace-Step1.5", "Ace-Step1.5"):
        out = call_prepare(comfy, typed, audio_files=f, captions="c", output_dir=f"t_{typed.replace('/', '_')}")
        assert "Prepared 1 sample (" in out["result"][1]


def test_live_events_are_json_safe(comfy):
    module = node_module(comfy, "comfy")
    module.send_event("acestep_lora.training", {"eta": float("nan"), "points": [[1, float("inf"), 0.1]]})
    event = comfy.server.messages[-1][1]
    assert event["eta"] is None and event["points"] == [[1, None, 0.1]]
    json.dumps(event, allow_nan=False)
