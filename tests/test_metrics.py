"""The metrics log: losses read back in batches, the NaN check, train_log.jsonl, progress events."""
import json
import math

import pytest
import torch

from acestep_lora.metrics import MetricsLog, ProgressEvent, format_seconds
from acestep_lora.run_state import TrainingStopped


def metrics_log(tmp_path, events, read_every_step=False, log_every=3):
    log = MetricsLog(str(tmp_path), total_epochs=4, log_every=log_every, read_every_step=read_every_step,
                     on_event=events.append, advice=lambda: "Lower learning_rate.")
    log.total_steps = 8
    log.start("header")
    return log


def test_losses_are_read_back_every_log_every_steps(tmp_path):
    events = []
    log = metrics_log(tmp_path, events)
    for step in (1, 2):
        log.add_step(step, torch.tensor(1.0 / step), 1e-4)
        log.report()
    assert log.history == [] and [e.points for e in events] == [[], []]  # queued as tensors, nothing read yet
    log.add_step(3, torch.tensor(0.25), 2e-4)  # the third: one transfer for all three
    assert log.history == [[1, 1.0, 1e-4], [2, 0.5, 1e-4], [3, 0.25, 2e-4]]
    assert events[-1].points == log.history and (events[-1].loss, events[-1].lr, events[-1].step) == (0.25, 2e-4, 3)
    log.add_epoch(1, torch.tensor(1.75), 3, 2e-4, 1.5)
    assert log.epoch_log == []  # waits for the next read-back
    log.flush()
    assert [e["epoch"] for e in log.epoch_log] == [1] and log.epoch_log[0]["loss"] == pytest.approx(1.75 / 3)
    lines = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
    assert lines == log.epoch_log and log.lines[-1].startswith("epoch 1/4 step 3/8 loss 0.58333 lr 2.00e-04")


def test_a_cpu_reads_every_step(tmp_path):
    events = []
    log = metrics_log(tmp_path, events, read_every_step=True)
    log.add_step(1, torch.tensor(0.5), 1e-4)
    assert log.history == [[1, 0.5, 1e-4]] and events[-1].points == [[1, 0.5, 1e-4]]


def test_a_non_finite_loss_stops_with_advice(tmp_path):
    log = metrics_log(tmp_path, [], read_every_step=True)
    with pytest.raises(TrainingStopped, match="the loss became nan at step 1: training diverged.*Lower learning_rate"):
        log.add_step(1, torch.tensor(float("nan")), 1e-4)
    log = metrics_log(tmp_path, [], read_every_step=False)
    log.add_step(1, torch.tensor(float("inf")), 1e-4)
    log.flush(check=False)  # Cancel / out of memory save what there is, unchecked
    assert log.history == [[1, float("inf"), 1e-4]]


def test_a_resumed_run_sends_its_history_first_and_notes_stay_in_order(tmp_path):
    events = []
    log = MetricsLog(str(tmp_path), 4, 10, False, events.append)
    log.restore([[1, 0.9, 1e-4], [2, 0.8, 1e-4]], [{"epoch": 1, "step": 2, "loss": 0.85}], [], step=2)
    log.epoch = 2
    log.note("dataset changed")
    log.start("resumed")
    log.report()
    assert events[0].points == [[1, 0.9, 1e-4], [2, 0.8, 1e-4]] and events[0].step == 2  # the chart gets the curve
    log.report()
    assert events[1].points == []
    assert [json.loads(line) for line in open(tmp_path / "train_log.jsonl")] == [
        {"epoch": 1, "step": 2, "loss": 0.85}, {"note": "dataset changed", "epoch": 2, "step": 2}]


def test_event_message_is_json_safe():
    event = ProgressEvent(step=1, total_steps=2, epoch=1, total_epochs=1, elapsed=0.5, eta=float("nan"),
                          loss=float("inf"), lr=1e-4, points=[[1, float("nan"), 1e-4]],
                          validation=[[1, float("nan"), 1]])
    message = event.message(node="7")
    assert message == {"node": "7", "step": 1, "total_steps": 2, "epoch": 1, "total_epochs": 1, "elapsed": 0.5,
                       "eta": None, "loss": None, "lr": 1e-4, "points": [[1, None, 1e-4]],
                       "validation": [[1, None, 1]], "previews": []}
    json.dumps(message, allow_nan=False)
    assert format_seconds(3725) == "1h02m" and format_seconds(65) == "1m05s" and format_seconds(math.nan) == "?"


def test_recorded_lines_are_written_announced_and_written_again_on_resume(tmp_path):
    """Validation losses and preview sets are lines of their own in train_log.jsonl (readers skip lines without
    "loss"), announced in a progress event at once, and kept with the notes so a resumed run keeps them."""
    events = []
    log = metrics_log(tmp_path, events, read_every_step=True)
    log.record({"epoch": 0, "step": 0, "validation_loss": 0.9}, "validation 0.9", validation=[[0, 0.9, 0]])
    log.add_step(1, torch.tensor(0.5), 1e-4)
    log.add_epoch(1, torch.tensor(0.5), 1, 1e-4, 0.1)
    log.epoch = 1
    log.record({"previews": ["previews/epoch_1/preview_1.flac"]}, "previews of epoch 1", quiet=True,
               previews=[{"epoch": 1, "files": ["previews/epoch_1/preview_1.flac"]}])
    assert [(e.validation, e.previews) for e in events if e.validation or e.previews] == [
        ([[0, 0.9, 0]], []), ([], [{"epoch": 1, "files": ["previews/epoch_1/preview_1.flac"]}])]
    written = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
    assert written == [{"epoch": 0, "step": 0, "validation_loss": 0.9},
                       {"epoch": 1, "step": 1, "loss": 0.5, "lr": 1e-4, "seconds": 0.1, "eta_seconds": written[1][
                           "eta_seconds"]},
                       {"epoch": 1, "step": 1, "previews": ["previews/epoch_1/preview_1.flac"]}]
    assert log.lines[1] == "validation 0.9" and log.lines[-1] == "previews of epoch 1"
    again = MetricsLog(str(tmp_path), 4, 10, False)
    again.restore(log.history, log.epoch_log, log.notes, step=1)
    again.start("resumed")
    assert [json.loads(line) for line in open(tmp_path / "train_log.jsonl")] == written
