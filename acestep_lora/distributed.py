"""Data-parallel training over several processes: ``torchrun`` starts them, ``torch.distributed`` connects them
(NCCL between GPUs; gloo on CPUs, and for the few host-side agreements on GPUs too).

    torchrun --nproc_per_node=4 -m acestep_lora train --tensor-dir tensors/ --checkpoint-dir ... --output-dir ...

How train.py shares one run over N processes:
- Every process holds the model, the LoRA and the whole dataset, and draws the same epoch order (the same seeded
  generator). An optimizer step takes the next ``gradient_accumulation x N`` micro-batches of that order; process r
  computes parts r, r + N, r + 2N ... of them (``share``). The global batch is N x batch_size x
  gradient_accumulation samples, and the learning-rate schedule counts these global steps.
- The random draws of a part (noise, timesteps, condition dropout, LoRA dropout) are seeded from (seed, step, part)
  alone (run_state.seed_draws), so a part computes the same whichever process runs it: N processes train what one
  process trains with gradient_accumulation x N (the gradients summed in another order), and a checkpoint can be
  continued by another number of processes.
- Each process scales its parts' losses by 1 / (parts in the step); before clipping, the LoRA gradients and the
  step's losses are summed over the processes in one all-reduce of a flat buffer (``sum_gradients``). Not
  DistributedDataParallel, because this sum is the single-process formula as it stands, also in an epoch's last,
  short step where some processes have no part (DDP averages over N and needs a forward in every process), it needs
  no ``no_sync`` for gradient accumulation, no wrapper around the decoder (gradient checkpointing, compile and the
  trainer see the same module), and no broadcast of the frozen base model at the start. Its price: the LoRA
  gradients (~180 MB at rank 64 on q/k/v/o of the 2B DiT) are summed after the backward instead of during it.
- Agreement: before the gradients are summed, the processes exchange their stop requests on the CPU (``agree``:
  cancel, Ctrl-C or SIGTERM, out of memory). Any request stops every process where the step began: process 0 saves
  the resumable checkpoint while the others wait (``main_done``), then all raise the same error. A NaN/inf loss is
  in the summed losses, so every process sees it at the same step.
- Only process 0 writes (checkpoints, ``train_log.jsonl``, the LoRA files, the run's result). Epoch hooks run in
  every process: a hook that writes files does so ``if is_main()``; one whose answer changes training takes process
  0's (``on_main``, which also raises process 0's exception in every process, so none goes on alone); a hook that
  makes process 0 work long must fit in the process-group timeout (``dist_timeout``, the others wait for it at the
  next step). Previews and the validation loss (previews.py, validation.py) work that way.
- A lost process (killed, crashed): the next exchange with it fails at once (gloo notices the closed connection);
  the others raise ``ProcessLost`` and process 0 saves a resumable checkpoint where the step began when its state is
  complete (``settled``: on a GPU the last gradient sum must have finished; a sum the lost process never joined
  blocks until NCCL's watchdog ends the process at the timeout). torchrun also stops the remaining processes
  (SIGTERM, SIGKILL 30 s later) as soon as one fails. Nothing waits forever; the last checkpoint stays resumable.

References: PyTorch's torch.distributed (init_process_group, all_reduce, broadcast_object_list) and torchrun
(elastic launch: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment).
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
import time
from dataclasses import dataclass, field
from typing import Any, Optional
from collections.abc import Callable

import torch
import torch.distributed as dist

from .device import resolve_device
from .run_state import TrainingStopped

log = logging.getLogger("acestep_lora.distributed")


class ProcessLost(TrainingStopped):
    """Another process of the run stopped answering (killed, crashed, or slower than the timeout)."""

    def stopped(self, epoch: int, step: int, saved: Optional[str], latest: Optional[str]) -> ProcessLost:
        """The error to end this process with: where it stopped and the checkpoint that continues the run."""
        if saved:
            where = f"a resumable checkpoint was saved in {saved}"
        else:
            where = (("process 0 saves a resumable checkpoint if it still runs, else " if not is_main() else "")
                     + f"the last checkpoint is {latest or 'none (none was saved)'}")
        return ProcessLost(f"process {current().rank}: {self} Stopped at epoch {epoch} step {step}: {where}; run the "
                           "same command with --resume-from latest to continue.")


def launched() -> bool:
    """Whether torchrun (or the same environment) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def env_rank() -> int:
    """This process's rank from the environment, before the processes have joined (0 when alone)."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


@dataclass
class Processes:
    """This process's place in a run of ``world`` processes; with one process every method costs nothing."""

    rank: int = 0
    world: int = 1
    device: Optional[torch.device] = None
    host: Any = None  # the gloo group for host-side agreement (the default group on CPU runs)
    flat: Optional[torch.Tensor] = field(default=None, repr=False)  # gradients + step losses, summed in one go
    views: list = field(default_factory=list, repr=False)  # each parameter's part of ``flat``
    summed: Any = field(default=None, repr=False)  # CUDA event: the last gradient sum finished
    lost: bool = False  # a collective failed: the group is broken

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, parts: int) -> range:
        """Which of a step's ``parts`` micro-batches this process computes."""
        return range(self.rank, parts, self.world)

    def _collective(self, op: Callable, *args, **kwargs):
        try:
            return op(*args, **kwargs)
        except RuntimeError as error:  # torch.distributed's errors (DistError) are RuntimeErrors
            self.lost = True
            text = (str(error).strip().splitlines() or [type(error).__name__])[-1][:300]
            raise ProcessLost(f"lost contact with another training process ({text}): it stopped, crashed or did "
                              "not answer within dist_timeout.") from error

    def agree(self, cancel: bool, out_of_memory: bool) -> tuple[int, int]:
        """How many processes ask to stop at this step boundary (cancel, out of memory): the same in all."""
        if self.world == 1:
            return int(cancel), int(out_of_memory)
        flags = torch.tensor([float(cancel), float(out_of_memory)])
        self._collective(dist.all_reduce, flags, group=self.host)
        return int(flags[0]), int(flags[1])

    def sum_gradients(self, params: list, values: torch.Tensor) -> torch.Tensor:
        """Sum ``params``' gradients and ``values`` (this process's losses of the step) over the processes, in one
        all-reduce; returns the summed values. A process without a part in the step contributes zeros."""
        if self.world == 1:
            return values
        n = self._buffer(params, values.numel())
        with torch.no_grad():
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in params]
            torch._foreach_copy_(self.views, grads)
            self.flat[n:].copy_(values)
            self._collective(dist.all_reduce, self.flat)
            torch._foreach_copy_(grads, self.views)
            values = self.flat[n:].clone()
        if self.flat.device.type == "cuda":
            self.summed = torch.cuda.Event()
            self.summed.record()
        return values

    def broadcast_parameters(self, params: list) -> None:
        """Process 0's values of ``params`` in every process (the LoRA's start, whatever each process drew)."""
        if self.world == 1:
            return
        self._buffer(params, 2)
        with torch.no_grad():
            torch._foreach_copy_(self.views, [p.detach() for p in params])
            self._collective(dist.broadcast, self.flat, src=0)
            torch._foreach_copy_([p.detach() for p in params], self.views)

    def _buffer(self, params: list, extra: int) -> int:
        n = sum(p.numel() for p in params)
        if self.flat is None or self.flat.numel() != n + extra:
            self.flat = torch.zeros(n + extra, device=params[0].device, dtype=torch.float32)
            self.views = [v.view_as(p) for v, p in zip(self.flat[:n].split([p.numel() for p in params]), params)]
        return n

    def same_everywhere(self, facts: dict) -> None:
        """Refuse to train when the processes were given different settings, data or checkpoints."""
        if self.world == 1:
            return
        seen = [None] * self.world
        self._collective(dist.all_gather_object, seen, facts, group=self.host)
        differ = sorted({k for other in seen for k in facts if other.get(k) != facts[k]})
        if differ:
            raise ValueError(f"the {self.world} training processes were not given the same run: "
                             f"{', '.join(differ)} differ between them. Start every process with the same command "
                             "and the same files (on one machine, or folders every process sees).")

    def on_main(self, fn: Callable[..., Any], *args) -> Any:
        """``fn(*args)`` run by process 0 alone (the others wait); every process gets its return value, or raises
        the exception it raised (so no process goes on, or waits, alone)."""
        if self.world == 1:
            return fn(*args)
        result, failure = None, None
        if self.main:
            try:
                result = fn(*args)
            except Exception as error:  # noqa: BLE001  (passed on to the others, then raised here as it was)
                failure, result = error, _Failed(_portable(error))
        box = [result]
        self._collective(dist.broadcast_object_list, box, src=0, group=self.host)
        if isinstance(box[0], _Failed):
            raise failure if failure is not None else box[0].error
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            self._collective(dist.barrier, group=self.host)

    def main_done(self) -> None:
        """Wait until process 0 has finished writing (so that no process exits and makes torchrun stop process 0
        in the middle of a checkpoint); process 0 goes on even if the others are gone."""
        try:
            self.barrier()
        except ProcessLost:
            if not self.main:
                raise

    def settled(self, wait: float = 10.0) -> bool:
        """Whether this process's training state is complete: on a GPU, the last gradient sum finished (within
        ``wait`` seconds) rather than waits for a lost process."""
        if self.summed is None:
            return True
        end = time.monotonic() + wait
        while not self.summed.query():
            if time.monotonic() > end:
                return False
            time.sleep(0.05)
        return True


@dataclass
class _Failed:
    """What ``on_main`` sends the others when process 0's call raised."""

    error: BaseException


def _portable(error: BaseException) -> BaseException:
    """``error`` as the other processes can receive it (one that does not pickle: a RuntimeError with its text)."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return RuntimeError(f"process 0: {type(error).__name__}: {error}")


SINGLE = Processes()
_joined: Optional[Processes] = None


def join(device_name: str, timeout_s: float) -> tuple[torch.device, Processes]:
    """This process's device and its place in the run: ``(resolve_device(device_name), SINGLE)`` unless torchrun
    started several processes, which then join one process group (once per process): NCCL over the GPU of each
    process's LOCAL_RANK, or gloo on the CPU. ``timeout_s``: how long a collective waits for the others."""
    global _joined
    if not launched():
        return resolve_device(device_name), SINGLE
    if _joined is not None:
        return _joined.device, _joined
    local, world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"])
    device = _device_for(device_name, local)
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
        host = dist.new_group(backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
        host = None
    _joined = Processes(dist.get_rank(), world, device, host)
    if _joined.main:
        log.info(f"{world} training processes joined ({'NCCL' if device.type == 'cuda' else 'gloo'}, "
                 f"{device.type})")
    return device, _joined


def _device_for(device_name: str, local_rank: int) -> torch.device:
    name = (device_name or "auto").strip().lower()
    device = resolve_device(name)
    if device.type == "cuda":
        if name.startswith("cuda:"):
            raise ValueError(f"device '{name}': with several processes each uses the GPU of its LOCAL_RANK; choose "
                             "the GPUs with CUDA_VISIBLE_DEVICES and leave device at auto or cuda.")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(f"{int(os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1))} processes on this machine "
                             f"but {count} GPU{'' if count == 1 else 's'}: use --nproc_per_node={count} or fewer.")
        return torch.device("cuda", local_rank)
    if device.type != "cpu":
        raise ValueError(f"device '{name}' ({device.type}): several processes train on CUDA GPUs (NCCL) or on the "
                         "CPU (gloo); use --device cpu, or one process.")
    return device


def current() -> Processes:
    """The run's processes as joined so far (SINGLE before ``join``, or when torchrun did not start this one)."""
    return _joined or SINGLE


def is_main() -> bool:
    """Whether this process writes the run's files (process 0; always true for a single process)."""
    return current().main


def on_main(fn: Callable[..., Any], *args) -> Any:
    """``fn(*args)`` in process 0 alone; every process gets its return value (see Processes.on_main)."""
    return current().on_main(fn, *args)


def shutdown() -> None:
    """Leave the process group at the end of a command (nothing when none was joined; a broken one is left to the
    process's exit, since tearing it down could wait for the lost process)."""
    global _joined
    if _joined is not None and not _joined.lost and dist.is_initialized():
        dist.destroy_process_group()
    _joined = None
