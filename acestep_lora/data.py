"""Training data: the prepared ``.pt`` files listed in ``manifest.json``, length-bucketed batches, padding with
masks."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from .manifest import TENSOR_KEYS, Manifest


@dataclass
class Batch:
    target_latents: torch.Tensor  # (B, T, 64)
    context_latents: torch.Tensor  # (B, T, 128)
    encoder_hidden_states: torch.Tensor  # (B, L, Hc)
    frame_mask: Optional[torch.Tensor]  # (B, T) 1 = real frame; None when nothing is padded
    encoder_mask: Optional[torch.Tensor]  # (B, L) 1 = real token; None when nothing is padded
    frames: int  # real (unpadded) frames in the batch, known on the host

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.target_latents), move(self.context_latents), move(self.encoder_hidden_states),
                     move(self.frame_mask), move(self.encoder_mask), self.frames)


class TensorDataset:
    """Every sample listed in ``manifest.json``, loaded once (``weights_only=True``) and checked."""

    def __init__(self, tensor_dir: str):
        if not tensor_dir or not os.path.isdir(tensor_dir):
            raise FileNotFoundError(f"tensor_dir '{tensor_dir}' does not exist. Connect the tensor_dir output of "
                                    "'ACE-Step LoRA Prepare Training Data' (or type the folder it wrote).")
        self.tensor_dir = tensor_dir
        self.manifest = Manifest.load(tensor_dir)
        names = self.manifest.samples
        if not names:
            raise ValueError(f"tensor_dir '{tensor_dir}': manifest.json lists no samples; run Prepare with audio.")
        self.samples = [self._load(name) for name in names]
        self.lengths = [s["target_latents"].shape[0] for s in self.samples]

    def _load(self, name: str) -> dict:
        path = name if os.path.isabs(name) else os.path.join(self.tensor_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tensor_dir '{self.tensor_dir}': sample file '{name}' listed in manifest.json "
                                    "is missing; run Prepare again to recreate it.")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"'{path}' cannot be read ({e}); delete it and run Prepare again.") from None
        missing = [k for k in TENSOR_KEYS if k not in data]
        if missing:
            raise ValueError(f"'{path}' lacks {missing}; it was not written by a compatible Prepare. Run Prepare "
                             "again into an empty folder.")
        t, c = data["target_latents"], data["context_latents"]
        if t.dim() != 2 or c.dim() != 2 or t.shape[0] != c.shape[0] or t.shape[0] == 0:
            raise ValueError(f"'{path}' has inconsistent shapes: target {tuple(t.shape)}, context {tuple(c.shape)}.")
        return {k: data[k] for k in ("target_latents", "context_latents", "encoder_hidden_states")}

    def __len__(self) -> int:
        return len(self.samples)

    def check_for(self, config_path: str, condition_width: int, batch_size: int) -> None:
        """Refuse tensors another model's encoder made, and a batch larger than the dataset."""
        prepared_with, wanted = self.manifest.config_path, os.path.basename(os.path.normpath(config_path))
        if prepared_with and prepared_with != wanted:
            raise ValueError(f"tensor_dir '{self.tensor_dir}' was prepared with config_path '{prepared_with}', but "
                             f"training uses '{wanted}'. Train with '{prepared_with}' or run Prepare again with "
                             f"'{wanted}' (the conditioning comes from that model's encoder).")
        if self.condition_width != condition_width:
            raise ValueError(f"tensor_dir '{self.tensor_dir}' holds conditioning of width {self.condition_width}, "
                             f"but '{wanted}' expects {condition_width}: the tensors come from another model. Run "
                             "Prepare again with this checkpoint.")
        if batch_size > len(self):
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({len(self)} samples); "
                             f"use batch_size <= {len(self)} or add samples.")

    @property
    def condition_width(self) -> int:
        return self.samples[0]["encoder_hidden_states"].shape[-1]

    def to(self, device: torch.device, dtype: torch.dtype, max_device_bytes: int = 2 * 2 ** 30) -> TensorDataset:
        """Stage all samples on the training device once, so the loop never copies host -> device; a dataset
        larger than ``max_device_bytes`` stays in pinned host memory and is copied batch by batch, asynchronously."""
        on_device = device.type == "cpu" or self.bytes() * torch.finfo(dtype).bits // 32 <= max_device_bytes
        target = device if on_device else torch.device("cpu")
        self.samples = [{k: v.to(device=target, dtype=dtype) for k, v in s.items()} for s in self.samples]
        if not on_device and device.type == "cuda":
            self.samples = [{k: v.pin_memory() for k, v in s.items()} for s in self.samples]
        self.staged_on_device = on_device
        return self

    def bytes(self) -> int:
        return sum(v.numel() * v.element_size() for s in self.samples for v in s.values())


def make_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffled batches of similar-length samples (little padding), in a shuffled order; the last may be short.

    Samples are shuffled, cut into pools of 50 batches, each pool sorted by length and split into batches, and
    the batches shuffled again: the order is random every epoch, the padding small.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if batch_size == 1:
        return [[i] for i in order]
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def collate(samples: list[dict]) -> Batch:
    """Zero-pad to the longest sample; masks mark the real frames/tokens (None when no padding was needed)."""
    frame_lengths = [s["target_latents"].shape[0] for s in samples]
    token_lengths = [s["encoder_hidden_states"].shape[0] for s in samples]
    if len(samples) == 1:
        s = samples[0]
        return Batch(s["target_latents"][None], s["context_latents"][None], s["encoder_hidden_states"][None],
                     None, None, frame_lengths[0])

    def pad(key, lengths):
        longest = max(lengths)
        return torch.stack([torch.nn.functional.pad(s[key], (0, 0, 0, longest - s[key].shape[0])) for s in samples])

    def mask(lengths, like):
        if len(set(lengths)) == 1:
            return None
        return (torch.arange(max(lengths), device=like.device)[None, :]
                < torch.tensor(lengths, device=like.device)[:, None]).to(like.dtype)

    target = pad("target_latents", frame_lengths)
    enc = pad("encoder_hidden_states", token_lengths)
    return Batch(target, pad("context_latents", frame_lengths), enc, mask(frame_lengths, target),
                 mask(token_lengths, enc), sum(frame_lengths))
