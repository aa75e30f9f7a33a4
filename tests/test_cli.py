"""The command line runs the same prepare/train core as the nodes, and talks to people, not to debuggers."""
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from acestep_lora import prepare as prepare_mod
from acestep_lora.__main__ import main
from acestep_lora.prepare import PrepareSettings, prepare_dataset

from test_prepare import item, tone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "[ACE-Step LoRA]"


def run_cli(*args, cwd, timeout=300):
    """``python -m acestep_lora ...`` in a child process, as a user starts it."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "acestep_lora", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tensors(tiny_ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tensors"))
    prepare_dataset([item("a", 1.0), item("b", 1.2)], out, PrepareSettings(tiny_ckpt, device="cpu"))
    return out


def test_cli_prepare_then_train(tiny_ckpt, tmp_path, capsys):
    songs = tmp_path / "songs"
    songs.mkdir()
    for i in range(2):
        sf.write(songs / f"s{i}.wav", tone(1.0 + 0.2 * i, rate=48000).T.numpy(), 48000)
        (songs / f"s{i}.json").write_text(json.dumps({"caption": f"song {i}, dreamy", "bpm": 100 + i,
                                                      "keyscale": "Am"}))
    assert main(["prepare", "--samples-dir", str(songs), "--output", str(tmp_path / "t"), "--checkpoint-dir",
                 tiny_ckpt, "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out.count("2 encoded") == 1  # the status, once
    assert "Loading weights" not in err  # transformers' own bar stays out of ours
    assert main(["train", "--tensor-dir", str(tmp_path / "t"), "--checkpoint-dir", tiny_ckpt, "--output-dir",
                 str(tmp_path / "run"), "--rank", "4", "--alpha", "8", "--epochs", "2", "--save-every", "1",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("ComfyUI LoRA:") == 1 and os.path.isfile(tmp_path / "run" / "run.safetensors")  # summary once
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "epoch_1")
    lines = out.splitlines()
    assert lines and all(line.startswith(PREFIX + " ") for line in lines), out  # one prefix per line, nothing else
    assert f"{PREFIX} {PREFIX}" not in out and f"{PREFIX} ACE-Step LoRA" not in out
    assert "training on 2 samples: 2 epochs of 2 steps, 4 steps in all" in out


def test_a_user_error_is_one_message_without_traceback(tiny_ckpt, tmp_path):
    run = run_cli("train", "--tensor-dir", str(tmp_path / "missing"), "--checkpoint-dir", tiny_ckpt,
                  "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert run.returncode == 1 and "Traceback" not in run.stderr + run.stdout
    assert run.stderr.splitlines() == [f"python -m acestep_lora: error: tensor_dir '{tmp_path / 'missing'}' does not "
                                       "exist. Connect the tensor_dir output of 'ACE-Step LoRA Prepare Training "
                                       "Data' (or type the folder it wrote)."]


@pytest.mark.parametrize("debug", [False, True])
def test_debug_shows_the_traceback(tiny_ckpt, tensors, tmp_path, capsys, debug):
    argv = ["train", "--tensor-dir", tensors, "--checkpoint-dir", tiny_ckpt, "--output-dir", str(tmp_path),
            "--batch-size", "5", "--device", "cpu"] + (["--debug"] if debug else [])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.rstrip().endswith("error: batch_size 5 is larger than the dataset (2 samples); use batch_size <= 2 "
                                 "or add samples.")
    assert ("Traceback (most recent call last)" in err) == debug


def test_ctrl_c_stops_at_a_step_boundary_and_resume_is_exact(tiny_ckpt, tensors, tmp_path):
    """SIGINT to a real ``python -m acestep_lora train``: it stops at the next micro-batch boundary (here inside
    a 2-batch accumulation group), saves a resumable checkpoint, names it and exits 130; ``--resume-from latest``
    then ends with the same LoRA weights and loss history as an uninterrupted run."""
    train = ["train", "--tensor-dir", tensors, "--checkpoint-dir", tiny_ckpt, "--rank", "4", "--alpha", "8",
             "--epochs", "20", "--grad-accum", "2", "--save-every", "0", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "acestep_lora", *train, "--output-dir", str(tmp_path / "run")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    try:
        seen = []
        for line in proc.stdout:  # wait until training runs: the first epoch's line
            seen.append(line)
            if "epoch 1/20" in line:
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.stdout.read()
        code = proc.wait()
    finally:
        watchdog.cancel()
    output = "".join(seen) + rest
    assert code == 130 and "Traceback" not in output, output
    stops = [line for line in rest.splitlines() if "stopped" in line]
    assert len(stops) == 1 and rest.rstrip().endswith(stops[0]), rest
    assert stops[0].startswith(f"{PREFIX} stopped at epoch ") and stops[0].endswith(
        "— run again with --resume-from latest")
    folder = stops[0].split("resumable checkpoint: ")[1].split(" — ")[0]
    state = torch.load(os.path.join(folder, "training_state.pt"), weights_only=True)
    assert 1 <= state["global_step"] < 20 and state["epoch_order"] is not None  # mid-run: a step boundary

    assert main([*train, "--output-dir", str(tmp_path / "run"), "--resume-from", "latest"]) == 0
    assert main([*train, "--output-dir", str(tmp_path / "full")]) == 0
    resumed, full = (torch.load(tmp_path / d / "final" / "training_state.pt", weights_only=True)
                     for d in ("run", "full"))
    assert resumed["global_step"] == full["global_step"] == 20
    assert resumed["history"] == full["history"]  # every step's loss and learning rate, bit for bit
    a, b = (load_file(str(tmp_path / d / "final" / "adapter" / "adapter_model.safetensors")) for d in ("run", "full"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flags,expected", [([], ("segments", True)),
                                            (["--long-audio", "crop", "--no-detect-bpm"], ("crop", False))])
def test_prepare_passes_long_audio_and_bpm(tmp_path, monkeypatch, capsys, flags, expected):
    sf.write(tmp_path / "s.wav", tone(0.5, rate=48000).T.numpy(), 48000)
    (tmp_path / "s.json").write_text(json.dumps({"caption": "c"}))
    seen = {}

    def fake_prepare(items, output_dir, settings, progress=None):
        seen["settings"] = settings
        return prepare_mod.PrepareResult(output_dir, "status line", 1, 0)

    monkeypatch.setattr(prepare_mod, "prepare_dataset", fake_prepare)
    assert main(["prepare", "--samples-dir", str(tmp_path), "--output", str(tmp_path / "t"), "--checkpoint-dir",
                 "ckpt", *flags]) == 0
    out = capsys.readouterr().out
    assert (seen["settings"].long_audio, seen["settings"].detect_bpm) == expected
    assert out.count("status line") == 1


def test_prepare_help_states_the_sidecar_convention(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    out = capsys.readouterr().out
    assert "<name>_caption.txt" in out and "<name>.txt           the lyrics" in out
