"""The metrics log of a training run: losses read back in batches, the NaN/inf check, ``train_log.jsonl``, the log
lines, the ETA, and ``ProgressEvent`` — the one progress event type the trainer emits and the console bar, the
node, its live chart's websocket messages and HTTP routes (nodes/routes.py) and the JS tests all use.

Reading a loss back to the host waits for the device. The loop therefore hands over loss *tensors*; they are
read in one transfer every ``log_every`` optimizer steps (every step on a CPU, where it costs nothing), before a
checkpoint and at the end.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional
from collections.abc import Callable

import torch

from .fileio import atomic_write_text
from .run_state import TrainingStopped

log = logging.getLogger("acestep_lora.metrics")
PRINT_EVERY_SECONDS = 10.0  # epoch lines in the console; train_log.jsonl gets every epoch


@dataclass
class ProgressEvent:
    """Where training is. ``points`` are the ``[step, loss, lr]`` read back since the previous event (the first
    event of a resumed run also carries the restored history); ``loss``/``lr`` are the newest point's, None when
    no point is new; ``eta`` in seconds, NaN while unknown.

    ``validation``: the held-out validation losses ``[step, loss, epoch]`` computed since the previous event (step 0:
    the model before training, LoRA off; validation.py). ``previews``: the preview sets rendered since then, each
    ``{"epoch", "step", "base", "files", "captions"}`` with ``files`` relative to the run's output folder and
    ``base`` true for the LoRA-off reference (epoch 0; previews.py). A resumed run announces the restored ones."""

    step: int
    total_steps: int
    epoch: int
    total_epochs: int
    elapsed: float
    eta: float
    loss: Optional[float] = None
    lr: Optional[float] = None
    points: list = field(default_factory=list)
    validation: list = field(default_factory=list)
    previews: list = field(default_factory=list)

    def message(self, **context) -> dict:
        """The JSON form (the live chart's websocket message): the fields, ``context`` (node, output_dir), and
        None for NaN/inf, which JSON has not."""
        return json_safe({**context, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}})

    @classmethod
    def example(cls) -> ProgressEvent:
        """A typical mid-run event (tests/js/fixtures/training_messages.json is made from it)."""
        files = lambda folder: [f"previews/{folder}/preview_{i}.flac" for i in (1, 2)]  # noqa: E731
        captions = ["dreamy lofi piano, mystyle", "energetic rock, distorted guitars, mystyle"]
        return cls(step=4, total_steps=100, epoch=2, total_epochs=50, elapsed=15.0, eta=360.0, loss=0.7, lr=4e-05,
                   points=[[3, 0.85, 3e-05], [4, 0.7, 4e-05]], validation=[[0, 0.91, 0], [4, 0.74, 2]],
                   previews=[{"epoch": 0, "step": 0, "base": True, "files": files("base"), "captions": captions},
                             {"epoch": 2, "step": 4, "base": False, "files": files("epoch_2"), "captions": captions}])


def json_safe(value):
    """NaN/inf are not JSON (a browser rejects the whole message): None instead, in nested dicts and lists too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def format_seconds(seconds) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class MetricsLog:
    """Queues loss tensors, reads them back together, checks them, and logs them (console, train_log.jsonl,
    progress events). ``on_event`` gets each ProgressEvent; ``advice()`` ends the divergence message; ``writes``
    False: train_log.jsonl is another process's to write (distributed.py), this one keeps the same log in memory."""

    def __init__(self, output_dir: str, total_epochs: int, log_every: int, read_every_step: bool,
                 on_event: Optional[Callable[[ProgressEvent], None]] = None, advice: Callable[[], str] = str,
                 writes: bool = True):
        self.jsonl, self.writes = os.path.join(output_dir, "train_log.jsonl"), writes
        self.total_epochs, self.log_every, self.read_every_step = total_epochs, log_every, read_every_step
        self.on_event, self.advice = on_event, advice
        # notes: the other lines of train_log.jsonl ({"note", "epoch", "step"}, and what record() writes)
        self.history, self.epoch_log, self.notes, self.lines = [], [], [], []
        self.pending_steps = []  # (step, loss tensor, lr): not yet read back from the device
        self.pending_epochs = []  # (epoch, step, loss-sum tensor, micro-batches, lr, seconds)
        self.unsent = []  # points no event carried yet
        self.step, self.total_steps, self.epoch = 0, 0, 1
        self.started, self.steps_at_start, self.last_print = time.time(), 0, 0.0

    def restore(self, history: list, epoch_log: list, notes: list, step: int) -> None:
        self.history, self.epoch_log, self.notes = list(history), list(epoch_log), list(notes)
        self.unsent, self.step = list(history), step

    def note(self, text: str) -> None:
        """A line for the log and train_log.jsonl, between the epochs where it happened."""
        self.notes.append({"note": text, "epoch": self.epoch, "step": self.step})

    def record(self, entry: dict, line: str = "", quiet: bool = False, **event) -> None:
        """A line of its own in train_log.jsonl (a validation loss, a preview set: readers skip lines without
        "loss"), kept with the notes so a resumed run writes it again; ``line`` for the log (not the console when
        ``quiet``); ``event``: what the next progress event announces (ProgressEvent.validation / .previews), sent
        now. The losses still pending are read back first, so the log stays in order; an epoch whose hooks record
        nothing costs no extra read-back."""
        self.flush()
        entry = {"epoch": self.epoch, "step": self.step, **entry}
        self.notes.append(entry)
        if self.writes:
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        if line:
            self.lines.append(line)
            if not quiet:
                log.info(line)
        self.announce(**event)

    def announce(self, **event) -> None:
        """A progress event now, carrying ``event`` (ProgressEvent.validation / .previews) and any unsent points."""
        self._emit([], **event)

    def start(self, header: str) -> None:
        """The session's first line; train_log.jsonl rewritten from the (restored) state; the clock starts."""
        self.lines = [header]
        log.info(header)
        entries = sorted(self.epoch_log + self.notes, key=lambda e: (e["step"], "note" in e))
        if self.writes:
            atomic_write_text(self.jsonl, "".join(json.dumps(e) + "\n" for e in entries))
        self.started, self.steps_at_start = time.time(), self.step

    def add_step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.step = step
        self.pending_steps.append((step, loss, lr))
        if self.read_every_step or len(self.pending_steps) >= self.log_every:
            self.flush()

    def add_epoch(self, epoch: int, loss_sum: torch.Tensor, count: int, lr: float, seconds: float) -> None:
        self.pending_epochs.append((epoch, self.step, loss_sum, count, lr, seconds))
        if self.read_every_step:
            self.flush()

    def eta(self) -> float:
        done = self.step - self.steps_at_start
        if done <= 0:
            return float("nan")
        return (time.time() - self.started) / done * (self.total_steps - self.step)

    def report(self) -> None:
        """A progress event without reading anything back (that would wait for the device)."""
        self._emit([])

    def _emit(self, new_points: list, **new) -> None:
        if self.on_event is None:
            return
        points, self.unsent = self.unsent + new_points, []
        last = points[-1] if points else (None, None, None)
        self.on_event(ProgressEvent(self.step, self.total_steps, self.epoch, self.total_epochs,
                                    time.time() - self.started, self.eta(), last[1], last[2], points, **new))

    def flush(self, check: bool = True) -> None:
        """Read pending step and epoch losses back in one transfer, check them, log them."""
        if not self.pending_steps and not self.pending_epochs:
            return
        steps, epochs = self.pending_steps, self.pending_epochs
        self.pending_steps, self.pending_epochs = [], []
        values = torch.stack([p[1] for p in steps] + [p[2] for p in epochs]).tolist()
        new_points = []
        for (step, _, lr), loss in zip(steps, values):
            if check and not math.isfinite(loss):
                self._diverged(f"step {step}", loss)
            new_points.append([step, loss, lr])
        self.history += new_points
        for (epoch, step, _, count, lr, seconds), total in zip(epochs, values[len(steps):]):
            loss = total / max(count, 1)
            if check and not math.isfinite(loss):
                self._diverged(f"epoch {epoch}", loss)
            eta = self.eta()
            entry = {"epoch": epoch, "step": step, "loss": loss, "lr": lr, "seconds": round(seconds, 3),
                     "eta_seconds": round(eta, 1) if math.isfinite(eta) else None}
            self.epoch_log.append(entry)
            self.lines.append(f"epoch {epoch}/{self.total_epochs} step {step}/{self.total_steps} loss {loss:.5f} "
                              f"lr {lr:.2e} {seconds:.2f}s/epoch ETA {format_seconds(eta)}")
            if self.writes:
                with open(self.jsonl, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")
        if epochs and (time.time() - self.last_print > PRINT_EVERY_SECONDS or self.step == self.total_steps):
            log.info(self.lines[-1])
            self.last_print = time.time()
        if new_points:
            self._emit(new_points)

    def drop_pending(self) -> None:
        self.pending_steps, self.pending_epochs = [], []

    def _diverged(self, where: str, loss: float):
        raise TrainingStopped(f"the loss became {loss} at {where}: training diverged and was stopped. "
                              f"{self.advice()}")

    def text(self, keep: int = 60) -> str:
        """Header, up to ``keep`` evenly spaced epoch lines, and the last line (a 4000-epoch log stays
        readable)."""
        lines = self.lines
        if len(lines) <= keep + 2:
            return "\n".join(lines)
        body = lines[1:-1]
        stride = math.ceil(len(body) / keep)
        picked = body[::stride]
        if picked[-1] != body[-1]:
            picked.append(body[-1])
        return "\n".join([lines[0], *picked, lines[-1]])
