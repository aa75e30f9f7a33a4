"""The prepared dataset's ``manifest.json`` (and what each sample file holds): one format, written by Prepare,
read by the trainer and the benchmarks.

Top level (``Manifest``): ``format`` (this layout's version), ``metadata`` (the official manifest's block: name,
custom_tag, ...), ``samples`` (tensor file names, in training order) and ``num_samples`` (both derived from
``samples_info``, kept for readers of the official format), ``preprocess_version``, ``checkpoint`` (Prepare's
fingerprint of the model files), ``dtype``, ``max_duration``, ``long_audio``, ``detect_bpm``, ``samples_info``
(one ``SampleInfo`` per training sample: what it is and where each fact came from) and ``warnings``.

Only this module reads or writes the file. ``load`` checks ``format`` and names what to do with a folder written by
another version: run Prepare again on the same audio into the same folder — tensors of the same
``preprocess_version`` are found in its cache and reused, so that only rewrites the manifest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from .fileio import atomic_write_json

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1  # bump when a key changes meaning or a required one is added
PREPROCESS_VERSION = 2  # the tensors' own version (in every cache key); 2: tempo in the metas, segments
# What each sample's .pt file holds (+ "metadata", for people), loaded with weights_only=True.
TENSOR_KEYS = ("target_latents", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
               "context_latents")


@dataclass
class SampleInfo:
    """One training sample: its tensor file, the input it came from, and its metadata with their sources."""

    file: str  # the .pt file, relative to the tensor folder
    name: str  # the input as given (a path, or "audio_input_2")
    cache_key: str  # content hash of everything the tensors depend on: the sample's identity across runs
    segment: int = 0  # which window of the input (long_audio = segments), of ``segments``
    segments: int = 1
    offset: float = 0.0  # seconds into the input
    duration_used: float = 0.0
    duration_total: float = 0.0
    frames: int = 0  # latent frames (25 per second)
    caption: str = ""
    caption_source: str = ""
    lyrics: str = ""
    lyrics_source: str = ""
    instrumental: bool = False
    bpm: Optional[int] = None
    bpm_source: str = ""
    keyscale: str = ""
    language: str = "unknown"
    timesignature: str = ""
    notes: list = field(default_factory=list)


@dataclass
class DatasetMetadata:
    """The official manifest's ``metadata`` block."""

    name: str = ""
    custom_tag: str = ""
    tag_position: str = "append"
    created_at: str = ""
    num_samples: int = 0
    all_instrumental: bool = False
    genre_ratio: int = 0


@dataclass
class Manifest:
    samples_info: list  # [SampleInfo], in training order
    checkpoint: dict  # config_path, variant, is_turbo, condition_width, and the dit / vae / text_encoder identities
    dtype: str  # the tensors' dtype ("bfloat16", "float32")
    metadata: DatasetMetadata = field(default_factory=DatasetMetadata)
    preprocess_version: int = PREPROCESS_VERSION
    max_duration: Optional[float] = 240.0
    long_audio: str = "segments"
    detect_bpm: bool = True
    warnings: list = field(default_factory=list)
    format: int = MANIFEST_FORMAT

    @property
    def samples(self) -> list[str]:
        return [s.file for s in self.samples_info]

    @property
    def config_path(self) -> str:
        """The DiT folder name whose condition encoder made the tensors."""
        return self.checkpoint.get("config_path", "")

    def sample_keys(self) -> Optional[list]:
        """Each sample's cache key in order; None when two share one (the same audio listed twice)."""
        keys = [s.cache_key for s in self.samples_info]
        return keys if all(keys) and len(set(keys)) == len(keys) else None

    def fingerprint(self) -> str:
        """Hash of what every sample is (its cache key and metadata): a run trained on another dataset differs."""
        entries = [dataclasses.asdict(s) for s in self.samples_info]
        return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        out = {"format": self.format, "metadata": dataclasses.asdict(self.metadata), "samples": self.samples,
               "num_samples": len(self.samples_info)}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name not in ("format", "metadata", "samples_info", "warnings")})
        out["samples_info"] = [dataclasses.asdict(s) for s in self.samples_info]
        out["warnings"] = list(self.warnings)
        return out

    def save(self, tensor_dir: str) -> str:
        path = os.path.join(tensor_dir, MANIFEST)
        atomic_write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, tensor_dir: str) -> Manifest:
        path = os.path.join(tensor_dir, MANIFEST)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tensor_dir '{tensor_dir}' has no {MANIFEST}. Run 'ACE-Step LoRA Prepare "
                                    "Training Data' first and connect its tensor_dir output.")
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is damaged ({e}); run Prepare again to rewrite it.") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a manifest written by Prepare; run Prepare again to rewrite it.")
        _check_format(path, data)
        try:
            info = [SampleInfo(**_known(SampleInfo, entry)) for entry in data["samples_info"]]
            manifest = cls(samples_info=info, checkpoint=dict(data["checkpoint"]), dtype=data["dtype"],
                           metadata=DatasetMetadata(**_known(DatasetMetadata, data.get("metadata") or {})),
                           **_known(cls, data, skip=("samples_info", "checkpoint", "dtype", "metadata")))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path} lacks or mistypes {e}; it was edited or damaged. Run Prepare again to "
                             "rewrite it.") from None
        if data.get("samples") is not None and data["samples"] != manifest.samples:
            raise ValueError(f"{path}: 'samples' and 'samples_info' list different files; it was edited by hand. "
                             "Run Prepare again to rewrite it.")
        return manifest


def _known(cls, data: dict, skip=()) -> dict:
    """The keys of ``data`` that are fields of ``cls`` (a required one missing fails in the constructor)."""
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    return {k: v for k, v in data.items() if k in names}


def _check_format(path: str, data: dict) -> None:
    found = data.get("format")
    if found == MANIFEST_FORMAT:
        return
    if isinstance(found, int) and found > MANIFEST_FORMAT:
        raise ValueError(f"{path} was written by a newer version of acestep-lora (manifest format {found}; this one "
                         f"reads format {MANIFEST_FORMAT}). Update the pack, or run Prepare again with this version "
                         "into another folder.")
    version = data.get("preprocess_version")
    reuse = ("its tensors (preprocess version {v}) are reused from the folder's cache, so only the manifest is "
             "rewritten" if version == PREPROCESS_VERSION else
             "its tensors were made by an older preprocessing (version {v}) and are encoded again")
    raise ValueError(f"{path} was written by an older Prepare (manifest format {found or 'none'}; this version "
                     f"reads format {MANIFEST_FORMAT}). Run Prepare again on the same audio with this folder as "
                     f"output_dir: {reuse.format(v=version)}.")
