"""The optimizer side of a training step: AdamW over the fp32 LoRA weights, the official learning-rate schedule,
gradient clipping and fp16 loss scaling, behind one ``step()``.

Fused AdamW on CUDA and CPU (one kernel for all parameters, no per-parameter host syncs); the schedule is the
official trainer's: linear warm-up from 10 % over ``warmup`` steps (at most 10 % of the run), then a cosine to 1 %.
"""
from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger("acestep_lora.optim")


def lr_factor(step: int, total_steps: int, warmup: int, eta_min_ratio: float = 0.01) -> float:
    """Official schedule: linear warm-up 0.1 -> 1 over ``warmup`` steps, then cosine to 1% (warm restarts
    with period total - warmup, i.e. a single cycle over the run)."""
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    period = max(1, total_steps - warmup)
    cur = (step - warmup) % period
    return eta_min_ratio + (1 - eta_min_ratio) * (1 + math.cos(math.pi * cur / period)) / 2


def warmup_for(total_steps: int, warmup_steps: int) -> int:
    return min(warmup_steps, max(1, total_steps // 10))


def grad_scaler(device: torch.device):
    """Loss scaling for fp16 autocast (MPS, old CUDA GPUs); None where this torch has no scaler for the device."""
    try:
        return torch.amp.GradScaler(device.type)
    except (RuntimeError, ValueError, TypeError):
        log.warning(f"no fp16 gradient scaler for {device.type} in this torch; training without one")
        return None


class Optimizer:
    """AdamW + schedule + clipping (+ a GradScaler with fp16 compute) for ``params``."""

    def __init__(self, params: list, device: torch.device, lr: float, weight_decay: float, max_grad_norm: float,
                 warmup_steps: int, total_steps: int, fp16: bool = False):
        fused = device.type in ("cuda", "cpu")
        self.params, self.max_grad_norm, self.warmup_steps = params, max_grad_norm, warmup_steps
        self.adamw = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None,
                                       foreach=None if fused else True)
        self.total_steps, self.warmup = total_steps, warmup_for(total_steps, warmup_steps)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.adamw, lambda s: lr_factor(s, self.total_steps, self.warmup))
        self.scaler = grad_scaler(device) if fp16 else None

    @property
    def lr(self) -> float:
        """The rate the next step uses."""
        return self.adamw.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> float:
        """Clip, update, advance the schedule, clear the gradients; returns the rate this step used."""
        if self.scaler is not None:
            self.scaler.unscale_(self.adamw)
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.adamw)
            self.scaler.update()
        else:
            self.adamw.step()
        lr = self.lr
        self.schedule.step()
        self.zero_grad()
        return lr

    def zero_grad(self) -> None:
        self.adamw.zero_grad(set_to_none=True)

    def reschedule(self, total_steps: int) -> None:
        """A run that continues with another step count: the schedule over the new total, from the step reached
        (the same rate, bit for bit, when the total did not change)."""
        self.total_steps, self.warmup = total_steps, warmup_for(total_steps, self.warmup_steps)
        for group, base in zip(self.adamw.param_groups, self.schedule.base_lrs):
            group["lr"] = base * lr_factor(self.schedule.last_epoch, self.total_steps, self.warmup)
        self.schedule._last_lr = [group["lr"] for group in self.adamw.param_groups]

    def state_dicts(self) -> tuple:
        """(optimizer, scheduler, scaler) states, as training_state.pt stores them."""
        return (self.adamw.state_dict(), self.schedule.state_dict(),
                self.scaler.state_dict() if self.scaler is not None else None)

    def load_state_dicts(self, optimizer: dict, scheduler: dict, scaler) -> None:
        self.adamw.load_state_dict(optimizer)
        self.schedule.load_state_dict(scheduler)
        if self.scaler is not None and scaler:
            self.scaler.load_state_dict(scaler)
