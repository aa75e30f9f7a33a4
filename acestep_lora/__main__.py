"""Command line: the same core the nodes call (``acestep-lora`` once installed, else ``python -m acestep_lora``).

    acestep-lora prepare --samples-dir songs/ --output tensors/ --checkpoint-dir checkpoints/
    acestep-lora train --tensor-dir tensors/ --checkpoint-dir checkpoints/ --output-dir runs/my_lora
    acestep-lora tiny-checkpoint demo_checkpoints/
    acestep-lora sample --checkpoint-dir checkpoints/ --lora runs/my_lora/final --caption "..." -o out.flac

A mistake in the input ends with one message and exit status 1 (--debug shows the traceback). Ctrl-C during
training stops at the next step boundary, saves a resumable checkpoint, names it, and exits with status 130
(--resume-from latest continues exactly); a second Ctrl-C quits at once, saving nothing more.

Several GPUs: ``torchrun --nproc_per_node=N -m acestep_lora train ...`` trains one LoRA with N processes
(distributed.py). Process 0 prints the log and writes the files; Ctrl-C and SIGTERM (torchrun passes both on, and
sends SIGTERM when another process failed) stop every process at the next step with a resumable checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback

from . import __version__, console, distributed
from .console import CountBar, TrainingBar, library_bars_off
from .options import PREPARE, TRAIN, add_cli_options, config_from_inputs
from .samples import SIDECAR_HELP
from .train import TrainingStopped

log = logging.getLogger("acestep_lora.cli")

# What a user can cause and fix from the message alone; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, TrainingStopped)
INTERRUPTED = 130  # the shell's status for a command stopped by Ctrl-C (128 + SIGINT)


def _prepare(args) -> int:
    from .prepare import PrepareSettings, items_from_samples, prepare_dataset
    from .samples import collect_samples

    items = items_from_samples(collect_samples(args.samples_dir))
    settings = config_from_inputs(PrepareSettings, vars(args))
    bar = CountBar("prepare")
    try:
        result = prepare_dataset(items, args.output_dir, settings, progress=bar.update)
    except KeyboardInterrupt:
        bar.close()  # the bar first, so the message is the last line
        log.info("stopped; the samples encoded so far are cached: the same command continues")
        return INTERRUPTED
    finally:
        bar.close()
    print(result.status)  # the command's result (ends with the per-sample table where Prepare makes one)
    return 0


class CtrlC:
    """While training: the first Ctrl-C (SIGINT) only raises a flag that the trainer reads before each
    micro-batch, so it stops at a step boundary — never inside a checkpoint write or the end-of-epoch log — and
    saves a resumable checkpoint; a second Ctrl-C interrupts at once (KeyboardInterrupt).

    One of several processes (``several``): SIGTERM raises the flag too, and later signals are ignored — torchrun
    passes a terminal's Ctrl-C on a second time, and ends the processes itself 30 s after its own Ctrl-C."""

    def __init__(self, several: bool = False):
        self.pressed, self.said, self.previous, self.several = False, False, {}, several

    def requested(self) -> bool:
        if self.pressed and not self.said:  # said here, between steps: a handler's line could cut into another
            log.info("stopping every process at this step and saving a resumable checkpoint" if self.several else
                     "Ctrl-C: stopping here and saving a resumable checkpoint (Ctrl-C again quits at once)")
            self.said = True
        return self.pressed

    def _handle(self, signum, frame):
        self.pressed = True
        if not self.several:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in (signal.SIGINT, signal.SIGTERM) if self.several else (signal.SIGINT,):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _train(args) -> int:
    from .train import TrainConfig, TrainingCancelled, train_lora

    cfg = config_from_inputs(TrainConfig, vars(args))
    several, main = distributed.launched(), distributed.env_rank() == 0
    if not main:  # process 0 tells the story; the others only what goes wrong in them
        logging.getLogger(console.LOGGER).setLevel(logging.WARNING)
    bar = TrainingBar() if main else None
    try:
        with CtrlC(several) as ctrl_c:
            train_lora(cfg, progress=bar and bar.update, cancel_requested=ctrl_c.requested)  # it logs the summary
    except TrainingCancelled as stop:
        if bar:
            bar.close()  # the bar first, so the message is the last line
        log.info(stop.resumable.message("run again with --resume-from latest"))
        return INTERRUPTED
    except TrainingStopped as stop:
        if main or isinstance(stop, distributed.ProcessLost):  # else all processes agreed: process 0 says why
            raise
        return 1
    finally:
        if bar:
            bar.close()
        if several:
            distributed.shutdown()
    return 0


def _tiny(args) -> int:
    from .testing import make_tiny_checkpoint

    with library_bars_off():
        print(make_tiny_checkpoint(args.path, variants=args.variants))
    return 0


def _parser() -> argparse.ArgumentParser:
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    prog = "python -m acestep_lora" if invoked in ("__main__.py", "-m", "-c", "") else "acestep-lora"
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, parents=[debug],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    # the prepare and train options come from the option table (options.py): help text, default and range each
    p = sub.add_parser("prepare", parents=[debug], help="encode a folder of samples into training tensors",
                       epilog=SIDECAR_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_options(p, PREPARE)
    p.set_defaults(run=_prepare)

    t = sub.add_parser("train", parents=[debug], help="train a LoRA on prepared tensors")
    add_cli_options(t, TRAIN)
    t.set_defaults(run=_train)

    k = sub.add_parser("tiny-checkpoint", parents=[debug],
                       help="write a tiny official-layout checkpoint (tests, demos)")
    k.add_argument("path")
    k.add_argument("--variants", nargs="+", default=["turbo"], choices=["turbo", "base", "sft"])
    k.set_defaults(run=_tiny)

    from .sampler import add_sample_command

    add_sample_command(sub)
    return parser


def main(argv=None) -> int:
    console.install()
    parser = _parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        return args.run(args)
    except KeyboardInterrupt:  # outside the steps that handle it (a second Ctrl-C, or one in prepare's loading)
        if debug:
            traceback.print_exc()
        log.info("stopped")
        return INTERRUPTED
    except USER_ERRORS as error:
        if debug:
            traceback.print_exc()
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
