"""What people read in a terminal (the command line, ComfyUI's console): the pack's log lines and its bars.

The core logs through ``logging.getLogger("acestep_lora.<module>")`` (named, not ``__name__``: ComfyUI imports
the pack's copy under another package name) and never prints. ``install()``, called by the command line and the
node pack, gives the "acestep_lora" logger one handler that writes each line with the "[ACE-Step LoRA]" prefix
once, through tqdm, so a line appears above a running progress bar instead of inside it.
Without ``install()`` (the core used as a library) the records go wherever the application's logging sends them.
Progress bars are drawn only on a terminal, and vanish when done (the lines are the record); elsewhere (a log
file, a service, CI) only the lines are written.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Optional

from tqdm import tqdm

PREFIX = "[ACE-Step LoRA]"
LOGGER = "acestep_lora"
HANDLER = "acestep_lora.console"


class PrefixFormatter(logging.Formatter):
    """Every line of a record gets the prefix once (a multi-line summary too)."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(f"{PREFIX} {line}" for line in super().format(record).splitlines() or [""])


class TqdmHandler(logging.Handler):
    """Writes above any tqdm bar (tqdm clears the bar, writes the line, redraws it): no interleaving mid-line."""

    def emit(self, record: logging.LogRecord) -> None:
        if sys.stdout is None:  # no console at all (pythonw)
            return
        try:
            tqdm.write(self.format(record))
            sys.stdout.flush()  # a log file or a service's journal gets the line now, not when a buffer fills
        except Exception:
            self.handleError(record)


def install(level: int = logging.INFO) -> logging.Logger:
    """Route the pack's log records to the console (prefix, tqdm-safe); idempotent. They no longer propagate to
    the root logger, whose handler (ComfyUI's) would print each line a second time."""
    logger = logging.getLogger(LOGGER)
    # Found by name, not class: the node pack imports this module under its own package name as well
    if not any(h.get_name() == HANDLER for h in logger.handlers):
        handler = TqdmHandler()
        handler.set_name(HANDLER)
        handler.setFormatter(PrefixFormatter())
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


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
    """The console bar of a training run (steps, epoch, last loss), fed the trainer's progress events."""

    def __init__(self):
        self.bar: Optional[tqdm] = None

    def update(self, event) -> None:
        """``event``: a ``metrics.ProgressEvent``."""
        if self.bar is None:  # the first event comes after the first step of this session (resume: of the rest)
            self.bar = tqdm(total=event.total_steps, initial=max(0, event.step - 1), desc=f"{PREFIX} training",
                            unit="step", dynamic_ncols=True, leave=False, disable=None)
        self.bar.update(event.step - self.bar.n)
        if event.loss is not None:
            self.bar.set_postfix(epoch=f"{event.epoch}/{event.total_epochs}", loss=f"{event.loss:.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class CountBar:
    """A bar over a known number of items (Prepare's samples); off a terminal, one log line per step instead."""

    def __init__(self, what: str):
        self.what, self.bar = what, None

    def update(self, done: int, total: int, message: str) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=f"{PREFIX} {self.what}", unit="sample", dynamic_ncols=True,
                            leave=False, disable=None)
        if self.bar.disable:
            logging.getLogger(LOGGER).info(f"{self.what} {done}/{total}: {message}")
            return
        self.bar.set_postfix_str(message, refresh=False)
        self.bar.update(done - self.bar.n)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
