"""The command line runs the same prepare/train core as the nodes."""
import json
import os

import soundfile as sf

from acestep_lora.__main__ import main

from test_prepare import tone


def test_cli_prepare_then_train(tiny_ckpt, tmp_path, capsys):
    songs = tmp_path / "songs"
    songs.mkdir()
    for i in range(2):
        sf.write(songs / f"s{i}.wav", tone(1.0 + 0.2 * i, rate=48000).T.numpy(), 48000)
        (songs / f"s{i}.json").write_text(json.dumps({"caption": f"song {i}, dreamy", "bpm": 100 + i,
                                                      "keyscale": "Am"}))
    assert main(["prepare", "--samples-dir", str(songs), "--output", str(tmp_path / "t"), "--checkpoint-dir",
                 tiny_ckpt, "--device", "cpu"]) == 0
    assert "2 encoded" in capsys.readouterr().out
    assert main(["train", "--tensor-dir", str(tmp_path / "t"), "--checkpoint-dir", tiny_ckpt, "--output-dir",
                 str(tmp_path / "run"), "--rank", "4", "--alpha", "8", "--epochs", "2", "--save-every", "1",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "ComfyUI LoRA:" in out and os.path.isfile(tmp_path / "run" / "run.safetensors")
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "epoch_1")
