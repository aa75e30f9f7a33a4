"""Run state on disk: training_state.pt round trip and its load errors, 'latest', and the fresh / reuse / refuse
policy. (Resume itself is tested end to end in test_train.py and test_cli.py.)"""
import json
import os

import pytest
import torch

from acestep_lora import run_state
from acestep_lora.run_state import Position, RunState, plan, resolve_resume


def state(step=3, epoch=1, order=None, signature=None):
    return RunState(run_id="r1", epoch=epoch, global_step=step, next_batch=1 if order else 0, epoch_order=order,
                    optimizer={"state": {}, "param_groups": []}, scheduler={"last_epoch": step}, scaler=None,
                    rng={"torch": torch.get_rng_state()}, data_rng=torch.Generator().get_state(),
                    history=[[1, 0.5, 1e-4]], epoch_log=[], epoch_loss=(0.5, 1),
                    identity={"lora_rank": 8, "lora_alpha": 16.0, "target_modules": ["q_proj"],
                              "config_path": "acestep-v15-turbo"},
                    signature=signature or {"training_version": 1, "seed": 1},
                    settings={"train_epochs": 2, "batch_size": 1, "gradient_accumulation": 1, "dataset_size": 3},
                    lora_file="x.safetensors")


def save(folder, s):
    os.makedirs(folder, exist_ok=True)
    s.save(str(folder))
    return str(folder)


def test_round_trip_and_checkpoint_json(tmp_path):
    saved = state(order=[[0], [2], [1]])
    folder = save(tmp_path / "c", saved)
    loaded = RunState.load(folder)
    assert loaded.global_step == 3 and loaded.epoch_order == [[0], [2], [1]] and loaded.lora_file == "x.safetensors"
    assert torch.equal(loaded.rng["torch"], saved.rng["torch"])
    assert loaded.position == Position(1, 1, [[0], [2], [1]], (0.5, 1))  # mid-epoch: continue epoch 1
    assert state(epoch=2).position == Position(3)  # saved at the end of epoch 2: continue with epoch 3
    info = json.load(open(os.path.join(folder, "checkpoint.json")))
    assert info == {"run_id": "r1", "epoch": 1, "global_step": 3, "complete_epoch": False, "lora_rank": 8,
                    "lora_alpha": 16.0, "target_modules": ["q_proj"], "config_path": "acestep-v15-turbo",
                    "signature": {"training_version": 1, "seed": 1}, "lora_file": "x.safetensors"}


def test_a_state_of_an_older_version_without_the_newer_keys_loads(tmp_path):
    old = {k: v for k, v in vars(state()).items() if k not in ("dataset_keys", "steps_per_epoch", "notes",
                                                                "epoch_loras", "lora_file")}
    os.makedirs(tmp_path / "c")
    torch.save(old, tmp_path / "c" / "training_state.pt")
    loaded = RunState.load(str(tmp_path / "c"))
    assert loaded.notes == [] and loaded.dataset_keys is None and loaded.epoch_loras == []


class Payload:
    """What a hostile or foreign training_state.pt could hold: unpickling it would create ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_state_that_is_not_ours_is_named_and_never_executed(tmp_path):
    folder = tmp_path / "checkpoints" / "epoch_1"
    folder.mkdir(parents=True)
    marker = tmp_path / "executed"
    with open(folder / "training_state.pt", "wb") as f:
        torch.save({"format": 1, "payload": Payload(str(marker))}, f, pickle_protocol=2)
    with pytest.raises(ValueError) as error:
        RunState.load(str(folder))
    message = str(error.value)
    assert f"{folder / 'training_state.pt'} is not a training state this pack wrote, or it is damaged" in message
    assert "It was not executed" in message and "resume_from empty" in message
    assert "Weights only load failed" not in message and "trust the source" not in message  # torch's raw text
    assert not marker.exists()

    (folder / "training_state.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="is not a training state this pack wrote, or it is damaged \\(unreadable"):
        RunState.load(str(folder))
    torch.save({"format": 1, "epoch": 1}, folder / "training_state.pt")  # plain values, but not a run state
    with pytest.raises(ValueError, match="is not a training state this pack wrote"):
        RunState.load(str(folder))


def test_latest_is_the_most_optimizer_steps(tmp_path):
    save(tmp_path / "checkpoints" / "epoch_2", state(step=6, epoch=2))
    save(tmp_path / "checkpoints" / "cancelled_epoch_3_step_7", state(step=7, epoch=3, order=[[0]]))
    save(tmp_path / "checkpoints" / "epoch_10", state(step=5, epoch=10))  # sorted by steps, not by name
    assert resolve_resume("latest", str(tmp_path)).endswith("cancelled_epoch_3_step_7")
    save(tmp_path / "final", state(step=7, epoch=3))  # same steps, saved at an epoch end: preferred
    assert resolve_resume("latest", str(tmp_path)).endswith("final")
    assert resolve_resume("", str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="is not a training checkpoint"):
        resolve_resume(str(tmp_path / "nope"), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        resolve_resume("latest", str(tmp_path / "empty"))


def test_fresh_reuse_or_refuse(tmp_path, monkeypatch):
    signature = {"training_version": run_state.TRAINING_VERSION, "seed": 1, "train_epochs": 2}
    assert plan(str(tmp_path), "", signature) == (None, None)  # empty: a fresh run
    save(tmp_path / "checkpoints" / "epoch_1", state(signature=signature))
    with pytest.raises(FileExistsError, match="unfinished training run.*'latest'"):
        plan(str(tmp_path), "", signature)
    assert plan(str(tmp_path), "latest", signature)[0].endswith("epoch_1")
    save(tmp_path / "final", state(signature=signature))
    assert plan(str(tmp_path), "", signature) == (None, str(tmp_path / "final"))  # finished, same: reused
    with pytest.raises(FileExistsError, match="other settings \\(train_epochs 2 -> 3\\).*Nothing was overwritten"):
        plan(str(tmp_path), "", dict(signature, train_epochs=3))
    # a newer training version never hands back a LoRA trained by the old code
    monkeypatch.setattr(run_state, "TRAINING_VERSION", run_state.TRAINING_VERSION + 1)
    newer = dict(signature, training_version=run_state.TRAINING_VERSION)
    old = run_state.TRAINING_VERSION - 1
    with pytest.raises(FileExistsError,
                       match=f"training_version {old} -> {old + 1} — this version of the pack trains differently"):
        plan(str(tmp_path), "", newer)


def test_another_number_of_processes_continues_the_global_order(tmp_path):
    """A checkpoint of 2 processes (1 micro-batch each per step) continued by one: the position is one in the
    run's global order of micro-batches; the global batch decides the step count, and the note says what changed."""
    from types import SimpleNamespace

    saved = state(step=3, order=[[0], [2], [1]], signature={"dataset": "d"})  # epoch 1, next micro-batch 1 of 3
    saved.settings.update(world_size=2, dataset_size=3)
    saved.steps_per_epoch = 2
    same_batch = run_state.continue_on(saved, saved.position, None, "d", 3,
                                       SimpleNamespace(train_epochs=2, batch_size=1, gradient_accumulation=2), 2, 1)
    assert same_batch.total_steps == 3 + 1 + 2 and same_batch.position.next_batch == 1  # the rest of epoch 1: 1 step
    assert same_batch.note.startswith("gradient_accumulation 1 -> 2; processes 2 -> 1 (global batch 2 -> 2 samples)")
    smaller = run_state.continue_on(saved, saved.position, None, "d", 3,
                                    SimpleNamespace(train_epochs=2, batch_size=1, gradient_accumulation=1), 3, 1)
    assert smaller.total_steps == 3 + 2 + 3 and "processes 2 -> 1 (global batch 2 -> 1 samples)" in smaller.note
    unchanged = run_state.continue_on(saved, saved.position, None, "d", 3,
                                      SimpleNamespace(train_epochs=2, batch_size=1, gradient_accumulation=1), 2, 2)
    assert unchanged.note is None and unchanged.total_steps == 3 + 1 + 2


def test_a_micro_batch_draws_from_its_seed_step_and_part_alone():
    noise, cpu = torch.Generator(), torch.device("cpu")

    def draws(step, part):
        run_state.seed_draws(42, step, part, cpu, noise)
        return torch.randn(4, generator=noise), torch.rand(4)  # noise/timesteps; LoRA dropout (global generator)

    first = draws(5, 1)
    torch.rand(100), torch.randn(7, generator=noise)  # whatever ran in between (a hook, another part)
    again = draws(5, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(draws(5, 0)[0], first[0]) and not torch.equal(draws(6, 1)[0], first[0])
    assert not torch.equal(first[0], torch.randn(4, generator=torch.Generator().manual_seed(0)))
    run_state.seed_draws(42, 5, 1, cpu, noise)
    assert not torch.equal(torch.rand(4, generator=noise), torch.rand(4))  # two streams, not one seed twice
