"""Crash-safe file writes: write to a temporary name in the same folder, fsync, then ``os.replace``.

A reader (or a crash) never sees a half-written sample, tensor file, manifest or checkpoint. What is published gets
the permissions the process's umask gives any new file or folder (as every other ComfyUI output), not the
owner-only ones of temporary files (Python's mkstemp/mkdtemp, and safetensors, which writes every file through a
0600 temporary of its own), so ComfyUI in Docker or as a service user can read it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any
from collections.abc import Callable, Iterator


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (``os.umask`` can only be read by
    setting it, which for a moment changes it for every thread of the process, e.g. ComfyUI's server)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it is moved over ``path`` in one step."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # after the writer, which may have replaced the file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def atomic_save(path: str, save_fn: Callable[[str], None]) -> None:
    """Run ``save_fn(tmp_path)`` (e.g. ``torch.save`` or ``safetensors.save_file``) and publish atomically."""
    with atomic_path(path) as tmp:
        save_fn(tmp)


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Build a folder under a temporary name, then swap it in for ``path``.

    If ``path`` already exists it is moved aside first and removed only after the new folder is in place, so an
    interruption at any moment leaves either the old or the new complete folder. Its contents get the modes the
    umask gives new files and folders, whatever wrote them.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    try:
        yield tmp
        _umask_modes(tmp)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".old", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _umask_modes(root: str) -> None:
    """Give ``root`` and everything in it a new file's / folder's usual modes (links are left alone)."""
    umask = current_umask()
    os.chmod(root, 0o777 & ~umask)
    for folder, dirs, files in os.walk(root):
        for names, mode in ((dirs, 0o777 & ~umask), (files, 0o666 & ~umask)):
            for name in names:
                if not os.path.islink(os.path.join(folder, name)):
                    os.chmod(os.path.join(folder, name), mode)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
