"""What people read in a terminal (the command line, ComfyUI's console): one display, no interleaving.

Every line carries the "[ACE-Step LoRA]" prefix once and is written through tqdm, so it appears above a running
progress bar instead of inside it. Progress bars are drawn only on a terminal, and vanish when done (the lines
are the record); elsewhere (a log file, a service, CI) only the lines are written.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Optional

from tqdm import tqdm

PREFIX = "[ACE-Step LoRA]"


def say(message: str) -> None:
    """Print ``message`` (one or more lines), each line prefixed once, above any progress bar."""
    if sys.stdout is None:  # no console at all (pythonw)
        return
    tqdm.write("\n".join(f"{PREFIX} {line}" for line in str(message).splitlines() or [""]))
    sys.stdout.flush()  # a log file or a service's journal gets the line now, not when a buffer fills


@contextlib.contextmanager
def library_bars_off():
    """Silence transformers' own bars ("Loading weights", "Writing model shards") while ours show the progress."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


class TrainingBar:
    """The console bar of a training run (steps, epoch, last loss), fed the engine's progress dictionaries."""

    def __init__(self):
        self.bar: Optional[tqdm] = None

    def update(self, info: dict) -> None:
        if self.bar is None:  # the first report comes after the first step of this session (resume: of the rest)
            self.bar = tqdm(total=info["total_steps"], initial=info["step"] - 1, desc=f"{PREFIX} training",
                            unit="step", dynamic_ncols=True, leave=False, disable=None)
        self.bar.update(info["step"] - self.bar.n)
        if info.get("new_points"):
            self.bar.set_postfix(epoch=f"{info['epoch']}/{info['total_epochs']}", loss=f"{info['loss']:.4f}",
                                 refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class CountBar:
    """A bar over a known number of items (Prepare's samples); off a terminal, one line per step instead."""

    def __init__(self, what: str):
        self.what, self.bar = what, None

    def update(self, done: int, total: int, message: str) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=f"{PREFIX} {self.what}", unit="sample", dynamic_ncols=True,
                            leave=False, disable=None)
        if self.bar.disable:
            say(f"{self.what} {done}/{total}: {message}")
            return
        self.bar.set_postfix_str(message, refresh=False)
        self.bar.update(done - self.bar.n)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
