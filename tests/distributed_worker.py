"""One process of tests/test_distributed.py's torchrun launch: several training commands in a row, through the real
command line (``acestep_lora.__main__.main``), in one process group (started once: a launch costs seconds).

    torchrun --nproc_per_node=2 tests/distributed_worker.py <spec.json>

spec: {"out": folder, "runs": [{"name": ..., "argv": [...], "fault": {"rank": r, "step": s, "signal": "SIGINT"}}]}.
A fault makes process r send itself the signal just before optimizer step s: SIGINT is Ctrl-C, SIGKILL a crash;
``{"rank": r, "raise": "validation"}`` makes the validation loss fail in process r alone.
Each process writes ``<out>/<name>.rank<r>.json`` (exit status, seconds, pid, the metrics log's notes: validation
losses, preview sets) and, when its run ends alive, ``<out>/<name>.rank<r>.safetensors`` (its own LoRA weights, to
show the processes stay identical).
"""
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from acestep_lora import distributed, lora, validation  # noqa: E402
from acestep_lora.__main__ import main  # noqa: E402
from acestep_lora.optim import Optimizer  # noqa: E402
from acestep_lora.train import Trainer  # noqa: E402


def run(spec: dict) -> None:
    torch.set_num_threads(1)
    rank, out = distributed.env_rank(), spec["out"]
    # torchrun sends SIGTERM after a process died; the command's own handler takes it while training, and after
    # the last run this process still writes its report
    signal.signal(signal.SIGTERM, lambda *_: None)
    distributed.shutdown = lambda: None  # one process group for all the runs
    name, fault, notes = None, None, []
    optimizer_step, cleanup, measure = Optimizer.step, Trainer.cleanup, validation.Validation._measure

    def faulty_step(self):  # the kill point: just before optimizer step `step` (the schedule counts the steps done)
        if fault and fault["rank"] == rank and self.schedule.last_epoch + 1 == fault.get("step"):
            os.kill(os.getpid(), getattr(signal, fault["signal"]))
        return optimizer_step(self)

    def faulty_measure(self, trainer, epoch):
        if fault and fault.get("raise") == "validation" and fault["rank"] == rank:
            raise ValueError(f"injected failure in process {rank}")
        return measure(self, trainer, epoch)

    def saving_cleanup(self):
        notes[:] = self.metrics.notes if hasattr(self, "metrics") else []
        save_file(lora.peft_state_dict(self.lora_layers), os.path.join(out, f"{name}.rank{rank}.safetensors"))
        return cleanup(self)

    Optimizer.step, Trainer.cleanup = faulty_step, saving_cleanup
    validation.Validation._measure = faulty_measure
    for item in spec["runs"]:
        name, fault, notes[:] = item["name"], item.get("fault"), []
        began = time.time()
        code = main(item["argv"])
        with open(os.path.join(out, f"{name}.rank{rank}.json"), "w") as f:
            json.dump({"code": code, "seconds": time.time() - began, "pid": os.getpid(), "notes": notes}, f)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        run(json.load(f))
